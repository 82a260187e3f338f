#!/usr/bin/env python3
"""Local stand-in for embedtune's production cluster: the command line, and the old import surface.

    python cluster/local/cluster_local.py up|down|status|env|restart|kill-worker ...

The parts live in the `standin` package next to this file (one module per server, see its
__init__); this module re-exports their names so `import cluster_local` (with cluster/local on
sys.path) keeps working for scripts and tests written against the single-file version.
"""

from __future__ import annotations

import sys

from standin.cli import (
    SCRIPT,
    cmd_down,
    cmd_env,
    cmd_status,
    cmd_up,
    main,
    summary,
)
from standin.cli import _down as _down
from standin.common import (
    BIN,
    BUCKET,
    LOOPBACK,
    MARKER,
    MLFLOW_ADMIN,
    MLFLOW_DRIVER,
    MLFLOW_LOGIN_VARS,
    PG_DB_USER,
    REGION,
    SERVICES,
    WORKER_NODE_TYPE,
    Fatal,
    alive,
    basic_auth,
    died,
    free_port,
    http_status,
    port_is_free,
    secret,
    spawn,
    wait_for,
    write_private,
)
from standin.envs import (
    base_env,
    client_env,
    export_lines,
    job_runtime_env_file,
    mlflow_client_env,
    mlflow_client_env_file,
    ray_client_env,
    s3_env,
)
from standin.faults import RESTARTABLE, cmd_kill_worker, cmd_restart, worker_raylets
from standin.log import log
from standin.mlflow_server import _check_mlflow_auth as _check_mlflow_auth
from standin.mlflow_server import ensure_driver_user, start_mlflow
from standin.postgres import _check_reachable as _check_reachable
from standin.postgres import _create_mlflow_databases as _create_mlflow_databases
from standin.postgres import as_pg_user, pg_bindir, pg_os_user, pg_root, start_postgres, stop_postgres
from standin.processes import _ray_alive as _ray_alive
from standin.processes import owned_processes, running, stop_services
from standin.ray_head import BOOTSTRAP, autoscaler_config, ray_node_env, start_ray
from standin.ray_head import _check_ray_auth as _check_ray_auth
from standin.s3 import _create_bucket as _create_bucket
from standin.s3 import _s3_client as _s3_client
from standin.s3 import start_s3, weed_binary, weed_grpc_sockets
from standin.state import State, locked

_died = died  # its name in the single-file version

__all__ = [
    "BIN", "BOOTSTRAP", "BUCKET", "LOOPBACK", "MARKER", "MLFLOW_ADMIN", "MLFLOW_DRIVER", "MLFLOW_LOGIN_VARS", "PG_DB_USER", "REGION",
    "RESTARTABLE", "SCRIPT", "SERVICES", "WORKER_NODE_TYPE", "Fatal", "State", "alive", "as_pg_user",
    "autoscaler_config", "base_env", "basic_auth", "client_env", "cmd_down", "cmd_env",
    "cmd_kill_worker", "cmd_restart", "cmd_status", "cmd_up", "died", "export_lines", "free_port",
    "http_status", "job_runtime_env_file", "locked", "log", "main", "mlflow_client_env", "mlflow_client_env_file", "ensure_driver_user",
    "owned_processes", "pg_bindir", "pg_os_user", "pg_root", "port_is_free", "ray_client_env",
    "ray_node_env", "running", "s3_env", "secret", "spawn", "start_mlflow", "start_postgres",
    "start_ray", "start_s3", "stop_postgres", "stop_services", "summary", "wait_for",
    "weed_binary", "weed_grpc_sockets", "worker_raylets", "write_private",
]  # fmt: skip

if __name__ == "__main__":
    sys.exit(main())
