"""Local stand-in for embedtune's production cluster, every server on 127.0.0.1.

    python cluster/local/cluster_local.py up       # start S3, PostgreSQL, MLflow, Ray (+ autoscaler)
    eval "$(python cluster/local/cluster_local.py env)"
    ray job submit --working-dir . -- embedtune sweep sweeps/cluster-local.yaml
    python cluster/local/cluster_local.py status
    python cluster/local/cluster_local.py down     # stop exactly what `up` started

What runs (each a real server process; cluster/local/NOTES.md says why):
  s3        SeaweedFS `weed server -s3` (master, volume, filer, S3 gateway), bucket `embedtune`,
            one access key (SeaweedFS identities JSON).
  postgres  a private PostgreSQL cluster (initdb into the state dir, run as an unprivileged user),
            databases `mlflow` (tracking) and `mlflow_auth` (MLflow basic-auth users).
  mlflow    `mlflow server --app-name basic-auth`, backend store in PostgreSQL, artifacts proxied
            to s3://embedtune/mlartifacts (clients need no S3 credentials for MLflow).
  ray       a Ray head with token authentication and the autoscaler on Ray's fake multi-node
            provider: the head has no CPUs/GPUs for trials; worker nodes of type
            `ray.worker.gpu` ({CPU: 1, GPU: 1} logical) start when tasks need them.

The state dir (default runs/cluster-local) keeps state.json (PIDs, ports, dirs), secrets/ (0600
files), logs/, and the data of S3 and PostgreSQL (kept across down/up; `down --purge` removes all).
Ray's temp dir and every process's TMPDIR live in a short /tmp/etcl-XXXXXXXX (Unix socket paths are
length-limited), removed by `down`.

Processes are found for `down` by the session each service was started in (start_new_session),
by their descendants, and by an environment marker (EMBEDTUNE_CLUSTER_LOCAL=<id>/<service>)
inherited by everything they spawn (Ray's autoscaled worker raylets, job drivers in their own
sessions), never by name.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import BIN, BUCKET, MARKER, MLFLOW_ADMIN, MLFLOW_DRIVER, REGION, SERVICES
from .envs import export_lines, job_runtime_env_file
from .faults import RESTARTABLE, cmd_kill_worker, cmd_replace_head, cmd_restart
from .log import log
from .mlflow_server import start_mlflow
from .postgres import pg_os_user, start_postgres
from .processes import owned_processes, running, stop_services
from .ray_head import ray_node_env, start_ray
from .s3 import start_s3, weed_grpc_sockets
from .state import State, locked

SCRIPT = Path(__file__).resolve().parent.parent / "cluster_local.py"  # the entry the docs name


def cmd_up(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir).resolve()
    with locked(state_dir):
        state = State(state_dir)
        status = running(state)
        if status and all(status.values()) and set(status) == set(SERVICES):
            log.info("already up (state dir %s)", state_dir)
            print(summary(state))
            return 0
        if any(status.values()):
            log.error(
                "partly up (%s): run `down` first",
                ", ".join(f"{k}={'up' if v else 'down'}" for k, v in status.items()),
            )
            return 1
        t0 = time.monotonic()
        state.data.update({"cluster_id": secrets.token_hex(6), "services": {}, "state_dir": str(state_dir.resolve()),
                           "node_credentials": args.node_credentials})  # fmt: skip
        state.data["runtime_dir"] = tempfile.mkdtemp(prefix="etcl-", dir="/tmp")
        (state.runtime_dir / "tmp").mkdir()
        (state.runtime_dir / "owner").write_text(str(state_dir.resolve()) + "\n")
        state.save()
        timings: dict[str, float] = {}
        try:
            for name, start in (("s3", lambda: start_s3(state)),
                                ("postgres", lambda: start_postgres(state, pg_os_user(args.pg_user))),
                                ("mlflow", lambda: start_mlflow(state)),
                                ("ray", lambda: start_ray(state, args))):  # fmt: skip
                t = time.monotonic()
                start()
                timings[name] = round(time.monotonic() - t, 1)
        except BaseException:
            log.exception("up failed: stopping what was started (logs kept in %s)", state_dir / "logs")
            _down(state, purge=False)
            return 1
        job_runtime_env_file(state)
        timings["total"] = round(time.monotonic() - t0, 1)
        state.data["up_timings_s"] = timings
        state.save()
        log.info("up in %.1fs: %s", timings["total"], timings)
        print(summary(state))
        return 0


def summary(state: State) -> str:
    s, pg = state.services, state.services["postgres"]
    script = SCRIPT
    env_cmd = f"{sys.executable} {script} env --state-dir {state.dir}"
    ray = shutil.which("ray") or str(BIN / "ray")
    lines = [
        "cluster-local is up:",
        f"  S3 endpoint     {s['s3']['endpoint']}  (bucket s3://{BUCKET}, region {REGION}, path-style)",
        f"  MLflow          {s['mlflow']['url']}  (basic auth: sweeps log in as {MLFLOW_DRIVER}, password in {state.dir / 'secrets' / 'mlflow_client.env'};",
        f"                  the UI's admin: {MLFLOW_ADMIN}, password in {state.dir / 'secrets' / 'mlflow_admin_password'})",
        f"  Ray job API     {s['ray']['dashboard']}  (token auth: token in {state.dir / 'secrets' / 'ray_auth_token'})",
        f"  Ray GCS         {s['ray']['gcs']}",
        f"  PostgreSQL      {pg['dsn']}  (password via PGPASSFILE={state.dir / 'secrets' / 'pgpass'})",
        "",
        "# the client environment (S3 keys, the sweep driver's MLflow login, the Ray token path):",
        f'eval "$({env_cmd})"',
        "# submit the sweep:",
        f"{ray} job submit --working-dir . "
        + (
            ""
            if state.data.get("node_credentials", True)
            else f"--runtime-env {job_runtime_env_file(state)} "
        )
        + "-- embedtune sweep sweeps/cluster-local.yaml",
        "# stop everything: make cluster-local-down",
    ]
    return "\n".join(lines)


def _down(state: State, purge: bool) -> int:
    found = owned_processes(state)
    stopped = 0
    # Ray (its drivers and trials write to MLflow and S3) and MLflow first, then the stores.
    # `weed server` takes ~30s to stop on SIGTERM (it drains gRPC streams), hence the short grace:
    # SIGKILL loses nothing (tests/test_cluster_local.py kills it mid-sweep and finds every object).
    stopped += stop_services(state, ("ray", "mlflow"), grace=15)
    stopped += stop_services(state, ("postgres", "s3"), grace=2)
    left = owned_processes(state)
    for sock in weed_grpc_sockets(state):
        sock.unlink(missing_ok=True)
    if state.data.get("runtime_dir"):
        shutil.rmtree(state.data["runtime_dir"], ignore_errors=True)
    for pidfile in (Path(state.data.get("pg_root") or state.dir / "postgres") / "run").glob(".s.PGSQL.*"):
        pidfile.unlink(missing_ok=True)
    if left:
        log.error("still running after down: %s", left)
        return 1
    log.info("stopped %d processes (%d found at start)", stopped, len(found))
    if purge:
        if state.data.get("pg_root") and not Path(state.data["pg_root"]).is_relative_to(state.dir):
            shutil.rmtree(Path(state.data["pg_root"]).parent, ignore_errors=True)
        shutil.rmtree(state.dir, ignore_errors=True)
        log.info("removed %s", state.dir)
    else:
        state.data["services"] = {}
        state.data.pop("runtime_dir", None)
        state.save()
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir).resolve()
    if not (state_dir / "state.json").exists():
        log.info("nothing recorded in %s", state_dir)
        return 0
    with locked(state_dir):
        t0 = time.monotonic()
        rc = _down(State(state_dir), purge=args.purge)
        log.info("down in %.1fs", time.monotonic() - t0)
        return rc


def cmd_status(args: argparse.Namespace) -> int:
    import psutil

    state = State(Path(args.state_dir).resolve())
    if not state.services:
        print(f"not up (no services recorded in {state.dir})")
        return 3
    procs = owned_processes(state)
    up = running(state)
    for name, info in state.services.items():
        pids = [p for p, s in procs.items() if s == name]
        rss = 0
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                rss += psutil.Process(pid).memory_info().rss
        where = info.get("endpoint") or info.get("url") or info.get("dashboard") or info.get("dsn")
        print(
            f"{name:9} {'up' if up.get(name) else 'DOWN':5} {where:45} {len(pids):3} processes  {rss / 2**20:7.0f} MiB RSS"
        )
    if args.ray and up.get("ray"):
        env = ray_node_env(state, argparse.Namespace(node_credentials=False)) | {MARKER: "status"}
        subprocess.run(
            [str(BIN / "ray"), "status", f"--address={state.services['ray']['gcs']}"], env=env, check=False
        )
    return 0 if set(up) == set(SERVICES) and all(up.values()) else 1


def cmd_env(args: argparse.Namespace) -> int:
    state = State(Path(args.state_dir).resolve())
    if not state.services:
        print(f"echo 'cluster-local is not up in {state.dir}' >&2; false")
        return 3
    print(export_lines(state))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="cluster_local.py",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    state_help = "where state, secrets, logs and data live (default: runs/cluster-local, relative to cwd)"
    parser.add_argument("--state-dir", default="runs/cluster-local", help=state_help)
    parser.add_argument("-v", "--verbose", action="store_true")
    # --state-dir also after the subcommand (`... env --state-dir X`).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state-dir", default=argparse.SUPPRESS, help=state_help)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", parents=[common], help="start the servers (a no-op when already up)")
    up.add_argument(
        "--pg-user", help="OS user running PostgreSQL when root (default: postgres, else a new embedtune-pg)"
    )
    up.add_argument(
        "--head-cpus",
        type=float,
        default=0,
        help="logical CPUs of the Ray head (default 0: no trial lands there)",
    )
    up.add_argument(
        "--worker-cpus", type=float, default=1, help="logical CPUs per autoscaled worker (default 1)"
    )
    up.add_argument(
        "--worker-gpus", type=float, default=1, help="logical GPUs per autoscaled worker (default 1)"
    )
    up.add_argument("--max-workers", type=int, default=2, help="most autoscaled worker nodes (default 2)")
    up.add_argument(
        "--idle-timeout-minutes",
        type=float,
        default=1,
        help="an idle worker node goes after this (default 1)",
    )
    up.add_argument("--no-node-credentials", dest="node_credentials", action="store_false",
                    help="do not put S3 keys and the MLflow login into the Ray nodes' environment "
                         "(jobs then pass them in their runtime env)")  # fmt: skip
    down = sub.add_parser(
        "down", parents=[common], help="stop every process `up` started and remove runtime files"
    )
    down.add_argument("--purge", action="store_true", help="also remove the state dir (data, secrets, logs)")
    status = sub.add_parser("status", parents=[common], help="what is running (processes, memory)")
    status.add_argument(
        "--ray", action="store_true", help="also print `ray status` (nodes, autoscaler demand)"
    )
    sub.add_parser("env", parents=[common], help='print the client `export` lines: eval "$(... env)"')
    restart = sub.add_parser(
        "restart", parents=[common], help="crash a server (SIGKILL) and start it again (faults)"
    )
    restart.add_argument("service", choices=sorted(RESTARTABLE))
    restart.add_argument("--down-for", type=float, default=5, help="seconds it stays down (default 5)")
    kill = sub.add_parser(
        "kill-worker", parents=[common], help="SIGKILL a worker node's raylet (a lost node)"
    )
    kill.add_argument("--node-id", help="the node to kill (default: the first live worker)")
    head = sub.add_parser("replace-head", parents=[common],
                          help="lose the Ray head with its disk (SIGKILL, local state deleted), start a new one")  # fmt: skip
    head.add_argument("--down-for", type=float, default=2, help="seconds without a head (default 2)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")  # fmt: skip
    commands = {"up": cmd_up, "down": cmd_down, "status": cmd_status, "env": cmd_env, "restart": cmd_restart,
                "kill-worker": cmd_kill_worker, "replace-head": cmd_replace_head}  # fmt: skip
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
