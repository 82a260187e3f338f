"""The environments: of every server process, and what S3, MLflow and Ray clients need."""

from __future__ import annotations

import json
import os
import secrets
import shlex
from pathlib import Path

from .common import LOOPBACK, MARKER, MLFLOW_DRIVER, REGION, write_private
from .state import State


def base_env(state: State, service: str) -> dict[str, str]:
    """Environment of every server process: the marker, a private TMPDIR, nothing phoning home."""
    env = dict(os.environ)
    # Drop what would point our servers at another cluster or leak a user's cloud credentials in.
    for key in list(env):
        if key.startswith(("RAY_", "MLFLOW_", "AWS_", "PG")) or key in ("VIRTUAL_ENV_PROMPT",):
            env.pop(key)
    env.update(
        {
            MARKER: f"{state.data['cluster_id']}/{service}",
            "TMPDIR": str(state.runtime_dir / "tmp"),
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "DO_NOT_TRACK": "true",
            "RAY_USAGE_STATS_ENABLED": "0",
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }
    )
    return env


def s3_env(state: State) -> dict[str, str]:
    """What an S3 client (boto3, pyarrow, Ray Tune storage, LanceDB/object_store) needs."""
    return {
        "AWS_ENDPOINT_URL": f"http://{LOOPBACK}:{state.ports['s3']}",
        "AWS_ACCESS_KEY_ID": state.secret("s3_access_key", lambda: "et" + secrets.token_hex(8)),
        "AWS_SECRET_ACCESS_KEY": state.secret("s3_secret_key"),
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
        # boto3/AWS SDKs must not ask the EC2 metadata address (169.254.169.254) for anything.
        "AWS_EC2_METADATA_DISABLED": "true",
        # LanceDB (Rust object_store): the endpoint is plain http.
        "AWS_ALLOW_HTTP": "true",
    }


def mlflow_client_env(state: State) -> dict[str, str]:
    """The sweep driver's MLflow login (its own user, not the admin): the head's and a client's."""
    return {
        "MLFLOW_TRACKING_URI": f"http://{LOOPBACK}:{state.ports['mlflow']}",
        "MLFLOW_TRACKING_USERNAME": MLFLOW_DRIVER,
        "MLFLOW_TRACKING_PASSWORD": state.secret("mlflow_driver_password"),
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }


def mlflow_client_env_file(state: State) -> Path:
    """secrets/mlflow_client.env: the driver's login in the format of cluster/make-secrets.sh's file
    (what cluster/mlflow_driver_user.py reads to create the user)."""
    path = state.dir / "secrets" / "mlflow_client.env"
    env = mlflow_client_env(state)
    write_private(
        path, "".join(f"{k}={env[k]}\n" for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"))
    )
    return path


def ray_client_env(state: State) -> dict[str, str]:
    return {
        "RAY_API_SERVER_ADDRESS": f"http://{LOOPBACK}:{state.ports['ray_dashboard']}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str((state.dir / "secrets" / "ray_auth_token").resolve()),
        "RAY_USAGE_STATS_ENABLED": "0",
        # For clients of the GCS (`ray status --address 127.0.0.1:<gcs>`, `ray.init("127.0.0.1:<gcs>")`):
        # else Ray swaps 127.0.0.1 for this machine's outward IP, where nothing listens.
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    }


def job_runtime_env_file(state: State) -> Path:
    """A `ray job submit --runtime-env` file (0600) carrying what the job's driver and trials need
    when the nodes do not have it (`up --no-node-credentials`): S3 access. Not the MLflow login: a
    job's runtime env reaches every task and trial, and only the driver (on the head, which always
    has the login) writes to MLflow."""
    path = state.dir / "secrets" / "job_runtime_env.yaml"
    env_vars = s3_env(state)
    write_private(path, json.dumps({"env_vars": env_vars}, indent=2) + "\n")  # JSON is YAML
    return path


def client_env(state: State) -> dict[str, str]:
    return {**s3_env(state), **mlflow_client_env(state), **ray_client_env(state)}


def export_lines(state: State) -> str:
    return "\n".join(f"export {k}={shlex.quote(v)}" for k, v in client_env(state).items())
