"""Finding and stopping what the stand-in started (by session, descendants and the env marker)."""

from __future__ import annotations

import contextlib
import os
import signal

from .common import MARKER, alive
from .log import log
from .postgres import stop_postgres
from .state import State


def owned_processes(state: State) -> dict[int, str]:
    """{pid: service} of every live process this cluster started, found by session (each service
    was started in a session of its own), descendants, and the environment marker."""
    import psutil

    cid = state.data.get("cluster_id")
    sessions = {info["sid"]: name for name, info in state.services.items() if info.get("sid")}
    earliest = min((info.get("started", 0) for info in state.services.values()), default=0) - 60
    found: dict[int, str] = {}
    me = os.getpid()
    for proc in psutil.process_iter(["pid", "create_time"]):
        pid = proc.info["pid"]
        if pid == me:
            continue
        service = None
        with contextlib.suppress(OSError):
            # The create_time bound guards against a reused session id.
            if os.getsid(pid) in sessions and (proc.info["create_time"] or 0) >= earliest:
                service = sessions[os.getsid(pid)]
        if service is None and cid:
            with contextlib.suppress(psutil.Error):
                tag = proc.environ().get(MARKER, "")
                if tag.startswith(cid + "/"):
                    service = tag.split("/", 1)[1]
        if service:
            found[pid] = service
    for pid, service in list(found.items()):
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(pid).children(recursive=True):
                found.setdefault(child.pid, service)
    return found


# Ray's GCS server and autoscaler monitor ignore SIGTERM, and a raylet told to stop while its GCS
# is stopping too waits ~10 s on it: so they go last, killed once every other process of theirs
# has stopped (drivers, which close their runs on SIGTERM, raylets, workers, the dashboard), with
# the GCS still answering. They hold nothing a later `up` needs (no external GCS store here).
LAST_TO_GO = ("gcs_server", "autoscaler/_private/monitor.py")


def _last_to_go(p) -> bool:
    import psutil

    with contextlib.suppress(psutil.Error):
        return any(part in " ".join([p.name(), *p.cmdline()]) for part in LAST_TO_GO)
    return False


def stop_services(state: State, services: tuple[str, ...], grace: float) -> int:
    """SIGTERM the processes of `services` together (but LAST_TO_GO), SIGKILL what is left after
    `grace` s, then the LAST_TO_GO ones. Returns how many processes there were."""
    import psutil

    if "postgres" in services:
        stop_postgres(state)  # a clean shutdown: pg_ctl stop -m fast
    procs = []
    for pid, svc in owned_processes(state).items():
        if svc in services:
            with contextlib.suppress(psutil.Error):
                procs.append(psutil.Process(pid))
    last = [p for p in procs if _last_to_go(p)]
    first = [p for p in procs if p not in last]
    for p in first:
        with contextlib.suppress(psutil.Error):
            p.send_signal(signal.SIGTERM)
    _, left = psutil.wait_procs(first, timeout=grace)
    for p in left:
        with contextlib.suppress(psutil.Error):
            log.info("pid %d (%s) still running %.0fs after SIGTERM: SIGKILL", p.pid, p.name(), grace)
    for p in [*left, *last]:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs([*left, *last], timeout=10)
    return len(procs)


def running(state: State) -> dict[str, bool]:
    return {
        name: alive(info.get("pid")) if name != "ray" else _ray_alive(state)
        for name, info in state.services.items()
    }


def _ray_alive(state: State) -> bool:
    return any(svc == "ray" for svc in owned_processes(state).values())
