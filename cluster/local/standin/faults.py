"""Faults a sweep must survive, injected for real: a server crashed and restarted, a worker node lost,
the Ray head lost with its disk and replaced."""

from __future__ import annotations

import argparse
import contextlib
import shutil
import time
from pathlib import Path

from .log import log
from .mlflow_server import start_mlflow
from .processes import owned_processes
from .ray_head import head_disk, start_ray
from .s3 import start_s3, weed_grpc_sockets
from .state import State, locked

RESTARTABLE = {"s3": lambda state: start_s3(state), "mlflow": lambda state: start_mlflow(state)}


def kill_service(state: State, service: str) -> int:
    """SIGKILL every process of `service` at once (as a dead machine); returns how many there were."""
    import psutil

    procs = []
    for pid, svc in owned_processes(state).items():
        if svc == service:
            with contextlib.suppress(psutil.Error):
                procs.append(psutil.Process(pid))
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(procs, timeout=30)
    return len(procs)


def cmd_replace_head(args: argparse.Namespace) -> int:
    """Lose the Ray head with its disk, as a dead machine: SIGKILL every Ray process (the head, the
    worker nodes it started, job drivers, trials), delete the head's local state (ray_head.head_disk:
    Ray's temp dir, HOME with Tune's staging dir and embedtune's caches, TMPDIR), and after
    `--down-for` s start a new head with the same token, ports (when free) and autoscaler settings,
    against the same S3, PostgreSQL and MLflow. Jobs of the old head are gone: submit them again."""
    state_dir = Path(args.state_dir).resolve()
    with locked(state_dir):
        state = State(state_dir)
        if not state.services.get("ray") or "ray_args" not in state.data:
            log.error("ray is not up in %s", state_dir)
            return 3
        killed = kill_service(state, "ray")
        for path in head_disk(state):
            shutil.rmtree(path, ignore_errors=True)
        log.info("head lost: %d Ray processes killed, %s deleted; down for %.0f s", killed,
                 ", ".join(str(p) for p in head_disk(state)), args.down_for)  # fmt: skip
        time.sleep(args.down_for)
        start_ray(state, argparse.Namespace(**state.data["ray_args"]))
        return 0


def cmd_restart(args: argparse.Namespace) -> int:
    """Crash a server (SIGKILL, as a node failure would) and start it again on the same port and
    data after `--down-for` seconds: the faults a sweep must survive."""
    state_dir = Path(args.state_dir).resolve()
    with locked(state_dir):
        state = State(state_dir)
        if not state.services.get(args.service):
            log.error("%s is not up in %s", args.service, state_dir)
            return 3
        killed = kill_service(state, args.service)
        log.info("%s killed (%d processes); down for %.0f s", args.service, killed, args.down_for)
        if args.service == "s3":
            for sock in weed_grpc_sockets(state):
                sock.unlink(missing_ok=True)
        time.sleep(args.down_for)
        RESTARTABLE[args.service](state)
        return 0


def worker_raylets(state: State) -> dict[str, int]:
    """{node id: raylet pid} of the autoscaled worker nodes (the fake provider starts each with its
    node id in RAY_OVERRIDE_NODE_ID_FOR_TESTING)."""
    import psutil

    out: dict[str, int] = {}
    for pid, svc in owned_processes(state).items():
        if svc != "ray":
            continue
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            node = proc.environ().get("RAY_OVERRIDE_NODE_ID_FOR_TESTING")
            if node and proc.name() == "raylet":
                out[node] = pid
    return out


def cmd_kill_worker(args: argparse.Namespace) -> int:
    """Lose a worker node under its trials, as a dead machine would: SIGKILL its raylet and every
    process on it (workers, agents) at once. `--node-id`, else the first worker."""
    import psutil

    state = State(Path(args.state_dir).resolve())
    raylets = worker_raylets(state)
    node = args.node_id or next(iter(sorted(raylets)), None)
    if node not in raylets:
        log.error("no live worker node %s (workers: %s)", node, ", ".join(sorted(raylets)) or "none")
        return 3
    raylet = psutil.Process(raylets[node])
    procs = [*raylet.children(recursive=True), raylet]
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(procs, timeout=30)
    log.info("killed worker node %s (raylet pid %d and %d processes on it)", node, raylet.pid, len(procs) - 1)
    print(node)
    return 0
