"""Constants and small helpers shared by every part of the stand-in (ports, polling, files, spawning)."""

from __future__ import annotations

import base64
import os
import secrets
import shlex
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .log import log

LOOPBACK = "127.0.0.1"
BUCKET = "embedtune"
REGION = "us-east-1"  # SeaweedFS accepts any region in SigV4; clients must agree on one
MARKER = "EMBEDTUNE_CLUSTER_LOCAL"
SERVICES = ("s3", "postgres", "mlflow", "ray")  # start order; stopped in reverse
MLFLOW_ADMIN = "admin"  # the tracking server's admin: only cluster_local itself logs in as it
# The sweep driver's own MLflow user (cluster/mlflow_driver_user.py): READ on everything, MANAGE on
# the experiments and registered models it creates; never on a worker node.
MLFLOW_DRIVER = "sweeper"
# What a worker node must not carry: MLflow logins (workers never write to MLflow).
MLFLOW_LOGIN_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
PG_DB_USER = "mlflow"
# The fake provider pins the head's node id (RAY_OVERRIDE_NODE_ID_FOR_TESTING under RAY_FAKE_CLUSTER).
WORKER_NODE_TYPE = "ray.worker.gpu"
BIN = Path(sys.executable).parent  # the venv's bin: weed, ray, mlflow console scripts


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        # As the servers bind: a port in TIME_WAIT from our last run is reusable.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


class Fatal(RuntimeError):
    """A server died while we waited for it: no point waiting longer."""


def wait_for(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
    """Poll `check` until it returns something truthy (returned) or raise after `timeout` s."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except Fatal:
            raise
        except Exception as exc:  # noqa: BLE001 - the server is still coming up
            last_exc = exc
        time.sleep(interval)
    raise RuntimeError(
        f"timed out after {timeout:.0f}s waiting for {what}"
        + (f" (last error: {last_exc})" if last_exc else "")
    )


def http_status(
    url: str, method: str = "GET", headers: dict[str, str] | None = None, body: bytes | None = None
) -> int:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    # No proxies: the servers are on loopback and a proxy from the environment must not see them.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def basic_auth(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def write_private(path: Path, text: str) -> None:
    """Write a file readable by its owner only (created 0600, never briefly world-readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(path, 0o600)


def secret(state_dir: Path, name: str, make: Callable[[], str] = lambda: secrets.token_urlsafe(24)) -> str:
    """A secret kept in <state>/secrets/<name> (0600), created on first use and reused after."""
    path = state_dir / "secrets" / name
    if path.exists():
        return path.read_text().strip()
    (state_dir / "secrets").mkdir(mode=0o700, parents=True, exist_ok=True)
    value = make()
    write_private(path, value)
    return value


def spawn(cmd: list[str], env: dict[str, str], log_path: Path, cwd: Path) -> subprocess.Popen:
    """Start a server in its own session (so `down` can find all it spawns) with output to a log."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log.info("starting: %s", shlex.join(cmd))
    with open(log_path, "ab") as out:
        return subprocess.Popen(
            cmd,
            env=env,
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def died(proc: subprocess.Popen, what: str) -> bool:
    if proc.poll() is not None:
        raise Fatal(f"{what} exited with {proc.returncode}: see its log in the state dir's logs/")
    return False
