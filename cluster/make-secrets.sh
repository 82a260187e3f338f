#!/bin/sh
# Generate the secrets of a real cluster once, locally, into cluster/secrets/ (git-ignored, 0600):
#   ray_auth_token            Ray token authentication (every node and every `ray job submit`)
#   mlflow_backend_uri        the tracking database (from $MLFLOW_BACKEND_URI)
#   mlflow_auth.ini           MLflow's basic-auth app: the tracking server's admin account, and its
#                             users' database (database_uri, from $MLFLOW_AUTH_DB_URI)
#   mlflow_flask_secret_key   the tracking server's Flask session key
#   mlflow_client.env         MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD of the sweep driver:
#                             its own user `sweeper` (not the admin), created on the server by
#                             cluster/mlflow_driver_user.py: READ on everything, MANAGE on the
#                             experiments and registered models it creates
# `ray up cluster/ray-cluster.yaml` copies the folder to every node, and the worker nodes' setup
# deletes the MLflow files (workers never write to MLflow); for Kubernetes, turn the files into
# Secrets (README, "Running on a Ray cluster"): only the head pods get embedtune-mlflow-client.
# Existing files are kept.
#
# Both databases must outlive the cluster: PostgreSQL outside it (RDS), e.g.
#   MLFLOW_BACKEND_URI=postgresql+psycopg2://USER:PASSWORD@HOST:5432/mlflow \
#   MLFLOW_AUTH_DB_URI=postgresql+psycopg2://USER:PASSWORD@HOST:5432/mlflow_auth cluster/make-secrets.sh
# (a sqlite:/// URI puts them on the head: `ray down` or a lost head loses every run and user).
set -eu
cd "$(dirname "$0")"
umask 077
need() {  # checked before anything is written
  echo "cluster/make-secrets.sh: set $1 (e.g. postgresql+psycopg2://USER:PASSWORD@HOST:5432/$2): the $3 database, PostgreSQL outside the cluster (RDS)" >&2
  exit 1
}
[ -s secrets/mlflow_backend_uri ] || [ -n "${MLFLOW_BACKEND_URI:-}" ] || need MLFLOW_BACKEND_URI mlflow tracking
[ -s secrets/mlflow_auth.ini ] || [ -n "${MLFLOW_AUTH_DB_URI:-}" ] || need MLFLOW_AUTH_DB_URI mlflow_auth "MLflow users'"
mkdir -p secrets
rand() { python3 -c 'import secrets; print(secrets.token_urlsafe(32))'; }
[ -s secrets/ray_auth_token ] || python3 -c 'import secrets; print(secrets.token_hex(32))' > secrets/ray_auth_token
[ -s secrets/mlflow_flask_secret_key ] || rand > secrets/mlflow_flask_secret_key
if [ ! -s secrets/mlflow_backend_uri ]; then
  printf '%s\n' "$MLFLOW_BACKEND_URI" > secrets/mlflow_backend_uri
fi
# auth_cache_ttl_seconds: a login checked once per minute per server worker, not on every request
# (each check is a deliberately slow scrypt hash, ~0.1 s of CPU; a sweep makes thousands of
# requests). A password changed or a user deleted is refused by every worker within that minute.
if [ ! -s secrets/mlflow_auth.ini ]; then
  password=$(rand)
  printf '[mlflow]\ndefault_permission = READ\ndatabase_uri = %s\nadmin_username = admin\nadmin_password = %s\nauthorization_function = mlflow.server.auth:authenticate_request_basic_auth\nauth_cache_ttl_seconds = 60\n' "$MLFLOW_AUTH_DB_URI" "$password" > secrets/mlflow_auth.ini
fi
if [ ! -s secrets/mlflow_client.env ] || grep -q '^MLFLOW_TRACKING_USERNAME=admin$' secrets/mlflow_client.env; then
  printf 'MLFLOW_TRACKING_USERNAME=sweeper\nMLFLOW_TRACKING_PASSWORD=%s\n' "$(rand)" > secrets/mlflow_client.env
fi
echo "secrets in $(pwd)/secrets: $(ls secrets | tr '\n' ' ')"
