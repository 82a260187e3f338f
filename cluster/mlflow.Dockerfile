# The MLflow tracking server of cluster/mlflow-server.yaml (the site file's MLFLOW_IMAGE): the
# official image plus what it lacks for embedtune's setup, the PostgreSQL driver (psycopg2-binary),
# S3 (boto3) and the basic-auth app's Flask-WTF, at embedtune's pins. Every wheel is pinned by its
# sha256 (cluster/mlflow-requirements.txt, --require-hashes), so the image holds exactly the files
# tested, and the pod installs nothing at start. Build from the repository root, push, then set
# MLFLOW_IMAGE and `make cluster-render`:
#   docker build -f cluster/mlflow.Dockerfile -t registry.example.com/ml/embedtune-mlflow:3.17.2-1 .
#   docker push registry.example.com/ml/embedtune-mlflow:3.17.2-1
#
# Not built by the test suite (no Docker engine there): tests/test_mlflow_image.py installs the same
# requirements file the same way into a fresh venv and imports the three packages. The wheels cover
# CPython 3.11-3.13 (the official image's Python is 3.11), x86_64 and aarch64.
FROM ghcr.io/mlflow/mlflow:v3.17.2

COPY cluster/mlflow-requirements.txt /tmp/mlflow-requirements.txt
RUN pip install --no-cache-dir --require-hashes --only-binary=:all: -r /tmp/mlflow-requirements.txt \
    && rm /tmp/mlflow-requirements.txt \
    && useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin mlflow

# The server needs no write access to the image: runs and users are in PostgreSQL, artifacts on S3.
USER 10001
EXPOSE 5000
