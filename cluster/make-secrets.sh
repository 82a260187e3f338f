#!/bin/sh
# Generate the secrets of a real cluster once, locally, into cluster/secrets/ (git-ignored, 0600):
#   ray_auth_token            Ray token authentication (every node and every `ray job submit`)
#   mlflow_auth.ini           MLflow's basic-auth app: the tracking server's admin account
#   mlflow_flask_secret_key   the tracking server's Flask session key
#   mlflow_client.env         MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD of the sweep driver:
#                             its own user `sweeper` (not the admin), created on the server by
#                             cluster/mlflow_driver_user.py: READ on everything, MANAGE on the
#                             experiments and registered models it creates
# `ray up cluster/ray-cluster.yaml` copies the folder to every node, and the worker nodes' setup
# deletes the MLflow files (workers never write to MLflow); for Kubernetes, turn the files into
# Secrets (README, "Running on a Ray cluster"): only the head pods get embedtune-mlflow-client.
# Existing files are kept.
set -eu
cd "$(dirname "$0")"
umask 077
mkdir -p secrets
rand() { python3 -c 'import secrets; print(secrets.token_urlsafe(32))'; }
[ -s secrets/ray_auth_token ] || python3 -c 'import secrets; print(secrets.token_hex(32))' > secrets/ray_auth_token
[ -s secrets/mlflow_flask_secret_key ] || rand > secrets/mlflow_flask_secret_key
if [ ! -s secrets/mlflow_auth.ini ]; then
  password=$(rand)
  printf '[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///basic_auth.db\nadmin_username = admin\nadmin_password = %s\nauthorization_function = mlflow.server.auth:authenticate_request_basic_auth\n' "$password" > secrets/mlflow_auth.ini
fi
if [ ! -s secrets/mlflow_client.env ] || grep -q '^MLFLOW_TRACKING_USERNAME=admin$' secrets/mlflow_client.env; then
  printf 'MLFLOW_TRACKING_USERNAME=sweeper\nMLFLOW_TRACKING_PASSWORD=%s\n' "$(rand)" > secrets/mlflow_client.env
fi
echo "secrets in $(pwd)/secrets: $(ls secrets | tr '\n' ' ')"
