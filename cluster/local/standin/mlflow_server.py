"""MLflow: `mlflow server --app-name basic-auth` on PostgreSQL, artifacts proxied to the bucket."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .common import (
    BUCKET,
    LOOPBACK,
    MLFLOW_ADMIN,
    PG_DB_USER,
    basic_auth,
    died,
    http_status,
    spawn,
    wait_for,
    write_private,
)
from .envs import base_env, mlflow_client_env_file, s3_env
from .log import log
from .state import State


def start_mlflow(state: State) -> dict[str, Any]:
    root = state.dir / "mlflow"
    root.mkdir(parents=True, exist_ok=True)
    port = state.port("mlflow")
    pg_port = state.ports["postgres"]
    admin_pw = state.secret("mlflow_admin_password")
    auth_ini = state.dir / "secrets" / "mlflow_auth.ini"
    write_private(
        auth_ini,
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = postgresql+psycopg2://{PG_DB_USER}@{LOOPBACK}:{pg_port}/mlflow_auth\n"
        f"admin_username = {MLFLOW_ADMIN}\n"
        f"admin_password = {admin_pw}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # as cluster/make-secrets.sh: a login's slow hash checked once a minute per worker, not per request
        "auth_cache_ttl_seconds = 60\n",
    )
    env = base_env(state, "mlflow")
    env.update(s3_env(state))  # the server does the S3 writes (--serve-artifacts)
    env.update(
        {
            "MLFLOW_S3_ENDPOINT_URL": env["AWS_ENDPOINT_URL"],
            "MLFLOW_AUTH_CONFIG_PATH": str(auth_ini),
            "MLFLOW_FLASK_SERVER_SECRET_KEY": state.secret("mlflow_flask_secret_key"),
            "PGPASSFILE": str(state.dir / "secrets" / "pgpass"),
            # MLflow 3.x's GenAI job runner: 7 huey consumer processes (~1.7 GB) and a temp dir in
            # /dev/shm that outlives a killed server; embedtune runs no server-side jobs.
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        }
    )
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--host", LOOPBACK,
        "--port", str(port),
        "--workers", "2",
        "--backend-store-uri", f"postgresql+psycopg2://{PG_DB_USER}@{LOOPBACK}:{pg_port}/mlflow",
        "--artifacts-destination", f"s3://{BUCKET}/mlartifacts",
        "--serve-artifacts",
        "--app-name", "basic-auth",
    ]  # fmt: skip
    proc = spawn(cmd, env, state.dir / "logs" / "mlflow.log", root)
    url = f"http://{LOOPBACK}:{port}"
    info = {"pid": proc.pid, "sid": proc.pid, "started": time.time(), "url": url}
    state.services["mlflow"] = info
    state.save()
    wait_for(
        lambda: not died(proc, "mlflow server") and http_status(url + "/health") == 200,
        180,
        "MLflow /health",
    )
    _check_mlflow_auth(url, admin_pw)
    ensure_driver_user(state, url, auth_ini)
    log.info("mlflow: %s (basic auth on, artifacts -> s3://%s/mlartifacts)", url, BUCKET)
    return info


# The production clusters' script, run as they run it (README, "Running on a Ray cluster").
DRIVER_USER_SCRIPT = Path(__file__).resolve().parents[2] / "mlflow_driver_user.py"


def ensure_driver_user(state: State, url: str, auth_ini: Path) -> None:
    """The sweep driver's own user (secrets/mlflow_client.env), created by the admin: every sweep of
    this cluster logs in as it, never as the admin."""
    env = base_env(state, "mlflow")
    cmd = [sys.executable, str(DRIVER_USER_SCRIPT), "--tracking-uri", url, "--auth-ini", str(auth_ini),
           "--client-env", str(mlflow_client_env_file(state))]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(
            f"creating the MLflow driver user failed: {(done.stderr or done.stdout).strip()[-2000:]}"
        )
    log.info("%s", done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "driver user ready")


def _check_mlflow_auth(url: str, admin_pw: str) -> None:
    """An unauthenticated write must be refused; the admin's read must work."""
    body = json.dumps({"name": "cluster-local-auth-probe"}).encode()
    hdr = {"Content-Type": "application/json"}
    anon = http_status(url + "/api/2.0/mlflow/experiments/create", "POST", hdr, body)
    if anon != 401:
        raise RuntimeError(f"MLflow accepted an unauthenticated write (HTTP {anon}): basic auth is not on")
    ok = http_status(
        url + "/api/2.0/mlflow/experiments/search?max_results=1", headers=basic_auth(MLFLOW_ADMIN, admin_pw)
    )
    if ok != 200:
        raise RuntimeError(f"MLflow refused the admin (HTTP {ok})")
