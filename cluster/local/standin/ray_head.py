"""Ray: a head with token auth and the autoscaler on the loopback fake multi-node provider."""

from __future__ import annotations

import argparse
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

from .common import BIN, LOOPBACK, MLFLOW_LOGIN_VARS, WORKER_NODE_TYPE, http_status, spawn, wait_for
from .envs import base_env, mlflow_client_env, s3_env
from .log import log
from .state import State

FAKE_PROVIDER_DIR = Path(__file__).resolve().parent.parent / "fake_provider"

BOOTSTRAP = "# written by cluster_local: a manually started cluster, so Ray skips cloud detection\nprovider:\n  type: local\n"


def autoscaler_config(state: State, args: argparse.Namespace) -> dict[str, Any]:
    """Ray's fake multi-node provider: worker "nodes" are extra raylets on this machine."""
    worker_resources = {
        "CPU": args.worker_cpus,
        "GPU": args.worker_gpus,
        "object_store_memory": 256 * 1024**2,
    }
    return {
        "cluster_name": "embedtune-local",
        "max_workers": args.max_workers,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": args.idle_timeout_minutes,
        "provider": {
            # Ray's fake multi-node provider with two fixes for nodes sharing one machine (see
            # fake_provider/cluster_local_fake_provider.py); imported by the autoscaler from PYTHONPATH.
            "type": "external",
            "module": "cluster_local_fake_provider.LoopbackFakeMultiNodeProvider",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            # Without it the provider joins workers to <this machine's outward IP>:6379.
            "gcs_address": f"{LOOPBACK}:{state.ports['ray_gcs']}",
            "node_ip_address": LOOPBACK,
            # Worker nodes are started by the autoscaler, which has the head's environment: it
            # drops these first, so no worker node (raylet, trials) has the driver's MLflow login.
            "worker_env_remove": list(MLFLOW_LOGIN_VARS),
        },
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0, "GPU": 0}, "node_config": {}, "max_workers": 0},
            WORKER_NODE_TYPE: {
                "resources": worker_resources,
                "node_config": {},
                "min_workers": 0,
                "max_workers": args.max_workers,
            },
        },
        "head_node_type": "ray.head.default",
        "auth": {},
        "docker": {},
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
    }


# What `up` was asked for the Ray part: kept in state.json, so a new head gets the same shape.
RAY_ARGS = (
    "head_cpus",
    "worker_cpus",
    "worker_gpus",
    "max_workers",
    "idle_timeout_minutes",
    "node_credentials",
)


def head_tmp(state: State) -> Path:
    return state.runtime_dir / "ray-tmp"


def head_disk(state: State) -> list[Path]:
    """The head machine's local state: Ray's temp dir (sessions, logs, job packages, spilled
    objects), the Ray processes' HOME (~/.ray, ~/ray_results: Tune's staging dir, embedtune's
    caches), their TMPDIR and the autoscaler config. Nothing of S3, PostgreSQL or MLflow."""
    return [state.runtime_dir / "ray", head_tmp(state), state.dir / "ray"]


def ray_node_env(state: State, args: argparse.Namespace) -> dict[str, str]:
    """Environment of the head and (inherited through the autoscaler) every worker node, and so of
    job drivers and trials: the cluster's own settings plus what the nodes of the production
    cluster get from their instance profile / secrets: S3 access (unless `--no-node-credentials`)
    and, on the head only, the driver's MLflow login (the autoscaler removes it before it starts a
    worker node: `worker_env_remove` in autoscaler_config)."""
    home = state.dir / "ray" / "home"
    env = base_env(state, "ray")
    env.update(
        {
            # Ray probes cloud metadata addresses at start unless ~/ray_bootstrap_config.yaml exists,
            # and writes ~/.ray: a private HOME holds the bootstrap config.
            "HOME": str(home),
            # The head's own disk (on one machine, shared with its worker nodes): embedtune's caches
            # (materialised models, mined negatives) and temp files, which `replace-head` deletes
            # with Ray's temp dir, as a lost machine would take them.
            "EMBEDTUNE_HOME": str(home / ".cache" / "embedtune"),
            "TMPDIR": str(head_tmp(state)),
            "RAY_FAKE_CLUSTER": "1",
            "AUTOSCALER_UPDATE_INTERVAL_S": "2",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(state.dir.resolve() / "secrets" / "ray_auth_token"),
            # Off: Ray would replace 127.0.0.1 by this machine's outward IP when drivers connect and
            # when the autoscaler starts worker raylets (node IP detection); on loopback it must not.
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "TOKENIZERS_PARALLELISM": "false",
            # Ray's memory monitor kills workers when the *machine* is at 95%: every node here shares
            # one machine with whatever else runs on it (seen: a job driver killed for other
            # processes' memory). Off; the kernel's OOM killer still guards the machine.
            "RAY_memory_monitor_refresh_ms": "0",
            # Job entrypoints (`python ...`, `embedtune sweep ...`) resolve through PATH: the venv first.
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            # For the autoscaler (monitor.py) to import the node provider.
            "PYTHONPATH": str(FAKE_PROVIDER_DIR),
        }
    )
    if args.node_credentials:
        env.update(s3_env(state))
    env.update(mlflow_client_env(state))  # job drivers run on the head: its login is theirs
    return env


def start_ray(state: State, args: argparse.Namespace) -> dict[str, Any]:
    root = state.dir / "ray"
    home = root / "home"
    home.mkdir(parents=True, exist_ok=True)
    head_tmp(state).mkdir(parents=True, exist_ok=True)
    state.data["ray_args"] = {k: getattr(args, k) for k in RAY_ARGS}
    (home / "ray_bootstrap_config.yaml").write_text(BOOTSTRAP)
    state.secret(
        "ray_auth_token", lambda: secrets.token_hex(32)
    )  # the format `ray get-auth-token --generate` writes
    for name in ("ray_gcs", "ray_dashboard", "ray_client", "ray_agent_listen", "ray_agent_grpc", "ray_runtime_env_agent",
                 "ray_metrics", "ray_node_manager", "ray_object_manager"):  # fmt: skip
        state.port(name)
    config_path = root / "autoscaler.json"  # JSON is YAML
    config_path.write_text(json.dumps(autoscaler_config(state, args), indent=2))
    temp_dir = state.runtime_dir / "ray"
    p = state.ports
    cmd = [
        str(BIN / "ray"), "start", "--head",
        f"--node-ip-address={LOOPBACK}",
        f"--port={p['ray_gcs']}",
        "--include-dashboard=true",
        f"--dashboard-host={LOOPBACK}",
        f"--dashboard-port={p['ray_dashboard']}",
        f"--ray-client-server-port={p['ray_client']}",
        f"--dashboard-agent-listen-port={p['ray_agent_listen']}",
        f"--dashboard-agent-grpc-port={p['ray_agent_grpc']}",
        f"--runtime-env-agent-port={p['ray_runtime_env_agent']}",
        f"--metrics-export-port={p['ray_metrics']}",
        f"--node-manager-port={p['ray_node_manager']}",
        f"--object-manager-port={p['ray_object_manager']}",
        f"--num-cpus={args.head_cpus}",  # 0: no trial lands on the head; job drivers need none
        "--num-gpus=0",
        f"--object-store-memory={256 * 1024**2}",
        f"--temp-dir={temp_dir}",
        f"--autoscaling-config={config_path}",
        "--disable-usage-stats",
    ]  # fmt: skip
    started = time.time()
    proc = spawn(cmd, ray_node_env(state, args), state.dir / "logs" / "ray-start.log", root)
    info = {
        "pid": proc.pid,
        "sid": proc.pid,
        "started": started,
        "temp_dir": str(temp_dir),
        "gcs": f"{LOOPBACK}:{p['ray_gcs']}",
        "dashboard": f"http://{LOOPBACK}:{p['ray_dashboard']}",
    }
    state.services["ray"] = info
    state.save()
    rc = proc.wait(timeout=300)  # `ray start` returns once the head is up (its servers stay in our session)
    if rc != 0:
        raise RuntimeError(f"`ray start --head` exited with {rc}: see {state.dir / 'logs' / 'ray-start.log'}")
    _check_ray_auth(state, info["dashboard"])
    log.info("ray: dashboard/job API %s, GCS %s (token auth on)", info["dashboard"], info["gcs"])
    return info


def _check_ray_auth(state: State, dashboard: str) -> None:
    token = state.secret("ray_auth_token")
    ok = wait_for(lambda: http_status(dashboard + "/api/jobs/", headers={"Authorization": f"Bearer {token}"}) == 200,
                  120, "the Ray job API")  # fmt: skip
    anon = http_status(dashboard + "/api/jobs/")
    if not ok or anon not in (401, 403):
        raise RuntimeError(f"the Ray job API answered {anon} without a token: token auth is not on")
