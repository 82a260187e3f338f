#!/bin/sh
# Generate the secrets of a real cluster once, locally, into cluster/secrets/ (git-ignored, 0600):
#   ray_auth_token            Ray token authentication (every node and every `ray job submit`)
#   mlflow_auth.ini           MLflow's basic-auth app: the tracking server's admin account
#   mlflow_flask_secret_key   the tracking server's Flask session key
#   mlflow_client.env         MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD of the sweep driver
# `ray up cluster/ray-cluster.yaml` copies the folder to every node; for Kubernetes, turn the files
# into Secrets (README, "Running on a Ray cluster"). Existing files are kept.
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
  printf 'MLFLOW_TRACKING_USERNAME=admin\nMLFLOW_TRACKING_PASSWORD=%s\n' "$password" > secrets/mlflow_client.env
fi
echo "secrets in $(pwd)/secrets: $(ls secrets | tr '\n' ' ')"
