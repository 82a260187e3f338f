"""Faults a sweep must survive, injected for real: a server crashed and restarted, a worker node lost."""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

from .log import log
from .mlflow_server import start_mlflow
from .processes import owned_processes
from .s3 import start_s3, weed_grpc_sockets
from .state import State, locked

RESTARTABLE = {"s3": lambda state: start_s3(state), "mlflow": lambda state: start_mlflow(state)}


def cmd_restart(args: argparse.Namespace) -> int:
    """Crash a server (SIGKILL, as a node failure would) and start it again on the same port and
    data after `--down-for` seconds: the faults a sweep must survive."""
    import psutil

    state_dir = Path(args.state_dir).resolve()
    with locked(state_dir):
        state = State(state_dir)
        if not state.services.get(args.service):
            log.error("%s is not up in %s", args.service, state_dir)
            return 3
        procs = [psutil.Process(pid) for pid, svc in owned_processes(state).items() if svc == args.service]
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(procs, timeout=30)
        log.info("%s killed (%d processes); down for %.0f s", args.service, len(procs), args.down_for)
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
