#!/usr/bin/env python3
"""Create (or re-key) the sweep driver's own MLflow user on a basic-auth tracking server.

    python cluster/mlflow_driver_user.py --tracking-uri http://127.0.0.1:5000 \
        --auth-ini cluster/secrets/mlflow_auth.ini --client-env cluster/secrets/mlflow_client.env

The admin login comes from the server's auth ini (`admin_username` / `admin_password`), the driver's
from the env file the driver's node sources (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD);
no password is ever on a command line or in the output. The driver user is an ordinary user: the
server's `default_permission` (READ) on everything, and MANAGE on what it creates, because MLflow's
auth app grants the creator MANAGE on a new experiment or registered model. So a sweep creates its
experiment and registered model and writes to them, and gets 403 on anyone else's. Idempotent: an
existing user keeps its grants and gets the password of the env file.
"""

from __future__ import annotations

import argparse
import configparser
import logging
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

log = logging.getLogger("mlflow_driver_user")


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines (the format `set -a; . file` and `kubectl --from-env-file` read)."""
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def wait_healthy(tracking_uri: str, timeout_s: float) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with opener.open(tracking_uri.rstrip("/") + "/health", timeout=5) as resp:
                if resp.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        if time.monotonic() > deadline:
            raise SystemExit(
                f"mlflow_driver_user: no answer from {tracking_uri}/health within {timeout_s:.0f} s"
            )
        time.sleep(1)


def ensure_user(tracking_uri: str, admin: tuple[str, str], user: str, password: str) -> str:
    """Create `user` (or set its password if it exists), as the admin. Returns "created"/"updated"."""
    from mlflow.exceptions import RestException
    from mlflow.server import get_app_client

    from embedtune.env import patched_environ

    if user == admin[0]:
        raise SystemExit(f"mlflow_driver_user: the driver's user must not be the admin ({user!r})")
    # The auth client reads its login from the environment, for these calls only.
    with patched_environ({"MLFLOW_TRACKING_USERNAME": admin[0], "MLFLOW_TRACKING_PASSWORD": admin[1]}):
        client = get_app_client("basic-auth", tracking_uri=tracking_uri)
        try:
            client.get_user(user)
        except RestException:  # no such user (MLflow answers RESOURCE_DOES_NOT_EXIST)
            client.create_user(user, password)
            return "created"
        client.update_user_password(user, password)
        return "updated"


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--auth-ini", type=Path, required=True, help="the server's basic-auth ini (admin)")
    parser.add_argument("--client-env", type=Path, required=True, help="the driver's MLFLOW_TRACKING_* file")
    parser.add_argument("--wait", type=float, default=0, help="seconds to wait for the server's /health")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    ini = configparser.ConfigParser()
    ini.read(args.auth_ini)
    if not ini.has_option("mlflow", "admin_username") or not ini.has_option("mlflow", "admin_password"):
        raise SystemExit(f"mlflow_driver_user: {args.auth_ini} has no [mlflow] admin_username/admin_password")
    env = read_env_file(args.client_env)
    missing = [k for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD") if not env.get(k)]
    if missing:
        raise SystemExit(f"mlflow_driver_user: {args.client_env} lacks {', '.join(missing)}")
    if args.wait:
        wait_healthy(args.tracking_uri, args.wait)
    admin = (ini["mlflow"]["admin_username"], ini["mlflow"]["admin_password"])
    what = ensure_user(
        args.tracking_uri, admin, env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"]
    )
    log.info("%s MLflow user %s on %s", what, env["MLFLOW_TRACKING_USERNAME"], args.tracking_uri)
    return 0


if __name__ == "__main__":
    sys.exit(main())
