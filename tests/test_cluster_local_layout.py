"""The cluster-local stand-in's layout: one module per part under cluster/local/standin/, none over
500 lines, and the old single-file surface (`import cluster_local`, `python cluster_local.py ...`)
still there for the scripts and tests written against it."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LOCAL = REPO / "cluster" / "local"

# Every top-level name the single-file cluster_local.py had that callers use.
OLD_NAMES = (
    "LOOPBACK BUCKET REGION MARKER SERVICES MLFLOW_ADMIN PG_DB_USER WORKER_NODE_TYPE BIN free_port "
    "port_is_free Fatal wait_for http_status basic_auth write_private secret spawn alive State locked "
    "base_env s3_env mlflow_client_env ray_client_env job_runtime_env_file client_env export_lines "
    "weed_binary weed_grpc_sockets start_s3 _s3_client _create_bucket pg_bindir pg_os_user as_pg_user "
    "pg_root start_postgres _check_reachable _create_mlflow_databases stop_postgres start_mlflow _died "
    "_check_mlflow_auth BOOTSTRAP autoscaler_config ray_node_env start_ray _check_ray_auth "
    "owned_processes stop_services running _ray_alive cmd_up summary _down cmd_down cmd_status "
    "RESTARTABLE cmd_restart worker_raylets cmd_kill_worker cmd_env main"
).split()


@pytest.fixture
def cluster_local(monkeypatch):
    monkeypatch.syspath_prepend(str(LOCAL))
    return importlib.import_module("cluster_local")


def test_no_module_of_the_stand_in_is_over_500_lines() -> None:
    modules = sorted((LOCAL / "standin").glob("*.py"))
    assert len(modules) >= 10  # the parts are split out, not one file
    long = {
        m.name: n
        for m in [*modules, LOCAL / "cluster_local.py"]
        if (n := len(m.read_text().splitlines())) > 500
    }
    assert not long, long


def test_old_import_surface_re_exports_the_parts(cluster_local) -> None:
    missing = [name for name in OLD_NAMES if not hasattr(cluster_local, name)]
    assert not missing, missing
    from standin import faults, postgres, s3, state

    # the same objects, not copies: a caller of cluster_local.start_s3 runs the package's code
    assert cluster_local.start_s3 is s3.start_s3
    assert cluster_local.start_postgres is postgres.start_postgres
    assert cluster_local.State is state.State
    assert cluster_local.cmd_restart is faults.cmd_restart


def test_command_line_entry_still_answers() -> None:
    out = subprocess.run([sys.executable, str(LOCAL / "cluster_local.py"), "--help"], capture_output=True,
                         text=True, timeout=60, check=True).stdout  # fmt: skip
    for command in ("up", "down", "status", "env", "restart", "kill-worker"):
        assert command in out
