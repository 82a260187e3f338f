"""Run the cluster_local checks against a running cluster, or a whole up/checks/down lifecycle.

    python cluster/local/checks/verify.py                      # cluster already up (default state dir)
    python cluster/local/checks/verify.py --lifecycle          # up, checks, down, leftovers
    unshare --net sh -c 'ip link set lo up; python cluster/local/checks/verify.py --lifecycle \
        --state-dir runs/cluster-netns'                       # the same with only loopback (h)

Checks: (a) s3_pyarrow.py, (c) lancedb_s3.py, (d) mlflow_auth_s3.py, (f) `ray job submit` without /
with a wrong / with the token, (b) jobs/tune_s3.py through `ray job submit`, (e) jobs/autoscale.py
(--autoscale; ~5 min), the listening sockets of every cluster process (loopback only), and after
`down` (--lifecycle) that no process, listening socket or /tmp entry of the cluster is left.
Prints one line per check and a JSON summary (timings) at the end; exit status 0 when all passed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CLI = HERE.parent / "cluster_local.py"
PY = sys.executable
results: list[tuple[str, bool, str]] = []
timings: dict[str, float] = {}


def auth_error(proc) -> str:
    """The AuthenticationError line of a refused `ray job submit`, or ""."""
    lines = (proc.stdout + proc.stderr).splitlines()
    return next((ln for ln in lines if "ray.exceptions.AuthenticationError" in ln), "")


def record(name: str, ok: bool, detail: str = "") -> bool:
    results.append((name, ok, detail))
    print(f"{'PASS' if ok else 'FAIL'} {name}" + (f": {detail}" if detail else ""), flush=True)
    return ok


def cli(state_dir: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, str(CLI), "--state-dir", state_dir, *args], capture_output=True, text=True)


def client_env(state_dir: str, home: str) -> dict[str, str]:
    out = cli(state_dir, "env").stdout
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "MLFLOW_"))}
    for line in out.splitlines():
        m = re.match(r"export (\w+)=(.*)", line)
        if m:
            env[m.group(1)] = m.group(2).strip("'")
    env["HOME"] = home  # the ray CLI writes nothing into the real HOME
    env["PATH"] = f"{Path(PY).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def run_check(name: str, script: Path, env: dict[str, str], timeout: int = 900) -> None:
    t0 = time.monotonic()
    proc = subprocess.run([PY, str(script)], env=env, capture_output=True, text=True, timeout=timeout)
    timings[name] = round(time.monotonic() - t0, 1)
    for line in proc.stdout.strip().splitlines():
        print("    " + line)
    record(
        name,
        proc.returncode == 0,
        f"{timings[name]}s" + ("" if proc.returncode == 0 else " " + proc.stderr[-500:]),
    )


def submit(
    env: dict[str, str], entrypoint: list[str], extra: list[str] | None = None, timeout: int = 900
) -> subprocess.CompletedProcess:
    cmd = ["ray", "job", "submit", "--working-dir", str(HERE / "jobs"), *(extra or []), "--", *entrypoint]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def job_result(proc: subprocess.CompletedProcess) -> dict:
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    return {}


def check_token(env: dict[str, str]) -> None:
    no_token = {
        k: v for k, v in env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN")
    }
    proc = submit(no_token, ["python", "-c", "print('should not run')"], timeout=120)
    err = auth_error(proc)
    record(
        "ray job submit without the token is refused",
        proc.returncode != 0 and "Missing authentication token" in err,
        err.strip()[:200],
    )
    wrong = {**no_token, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}
    proc = submit(wrong, ["python", "-c", "print('should not run')"], timeout=120)
    err = auth_error(proc)
    record(
        "ray job submit with a wrong token is refused",
        proc.returncode != 0 and "Invalid authentication token" in err,
        err.strip()[:200],
    )
    t0 = time.monotonic()
    proc = submit(
        env,
        ["python", "-c", "import ray; ray.init(); print('NODE', ray.get_runtime_context().get_node_id())"],
        timeout=300,
    )
    timings["trivial_job"] = round(time.monotonic() - t0, 1)
    record(
        "ray job submit with RAY_AUTH_MODE=token + RAY_AUTH_TOKEN_PATH works",
        proc.returncode == 0 and "NODE" in proc.stdout,
        f"{timings['trivial_job']}s",
    )


def loopback_only() -> bool:
    """In a network namespace with only `lo` (nothing can leave the machine by mistake)."""
    return [name for _, name in socket.if_nameindex()] == ["lo"]  # (sysfs shows the host's)


def check_tune(env: dict[str, str], state_dir: str, node_credentials: bool) -> None:
    extra: list[str] = []
    if not node_credentials:
        # The nodes have no S3 settings: the job brings them in its runtime env.
        extra = ["--runtime-env", str(Path(state_dir).resolve() / "secrets" / "job_runtime_env.yaml")]
        if loopback_only():  # without an endpoint pyarrow would try real AWS: only where it cannot
            proc = submit(env, ["python", "tune_s3.py"], timeout=600)
            tail = [line for line in (proc.stdout + proc.stderr).splitlines() if "Error" in line][-1:]
            record(
                "without node credentials, a job without a runtime env fails",
                proc.returncode != 0,
                tail[0][:300] if tail else "",
            )
    t0 = time.monotonic()
    proc = submit(env, ["python", "tune_s3.py"], extra)
    timings["tune_job"] = round(time.monotonic() - t0, 1)
    res = job_result(proc)
    trials = res.get("trials", [])
    ok = proc.returncode == 0 and len(trials) == 2
    detail = (
        f"{timings['tune_job']}s; trials on nodes {sorted({t['node'][-5:] for t in trials})} (head {res.get('head', '?')[-5:]}), "
        f"resumed_from {[t['resumed_from'] for t in trials]}, final step {[t['step'] for t in trials]}, "
        f"checkpoint fs {[t['checkpoint_fs'] for t in trials]}, fit {res.get('seconds_first_fit')}s + restore {res.get('seconds_restore_fit')}s"
    )
    record(
        "Tune on s3:// through ray job submit, trials on autoscaled workers, restore from S3",
        ok,
        detail if res else proc.stdout[-1500:] + proc.stderr[-500:],
    )


def check_autoscale(env: dict[str, str]) -> None:
    t0 = time.monotonic()
    proc = submit(env, ["python", "autoscale.py"], timeout=1200)
    timings["autoscale_job"] = round(time.monotonic() - t0, 1)
    res = job_result(proc)
    record("autoscaler: 2 x 0.5 GPU share one new worker; idle worker removed; killed raylet replaced",
           proc.returncode == 0, json.dumps(res) if res else proc.stdout[-1500:])  # fmt: skip


def check_loopback(state_dir: str) -> None:
    import psutil

    sys.path.insert(0, str(CLI.parent))
    import cluster_local  # noqa: E402

    state = cluster_local.State(Path(state_dir).resolve())
    pids = cluster_local.owned_processes(state)
    bad, listening = [], 0
    for conn in psutil.net_connections(kind="inet"):
        if conn.pid in pids and conn.laddr:
            if conn.status == psutil.CONN_LISTEN or conn.type == 2:  # TCP listeners and UDP sockets
                listening += 1
                host = conn.laddr.ip.removeprefix("::ffff:")
                if not (host.startswith("127.") or host == "::1"):
                    bad.append(f"{pids[conn.pid]} pid {conn.pid} on {conn.laddr.ip}:{conn.laddr.port}")
            elif conn.raddr and not (
                conn.raddr.ip.removeprefix("::ffff:").startswith("127.") or conn.raddr.ip == "::1"
            ):
                bad.append(f"{pids[conn.pid]} pid {conn.pid} connected to {conn.raddr.ip}:{conn.raddr.port}")
    record(
        "every socket of the cluster's processes is on loopback",
        not bad,
        f"{listening} listening sockets, {len(pids)} processes" + (f"; off loopback: {bad}" if bad else ""),
    )


def leftovers(cluster_id: str, tmp_before: set[str]) -> None:
    import psutil

    marked = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("EMBEDTUNE_CLUSTER_LOCAL", "").startswith(cluster_id + "/"):
                marked.append(proc.pid)
        except psutil.Error:
            pass
    new_tmp = sorted(set(os.listdir("/tmp")) - tmp_before)
    ours = [n for n in new_tmp if n.startswith(("etcl-", "seaweedfs-", "ray"))]
    shm = [n for n in os.listdir("/dev/shm") if n.startswith("tmp")]
    record(
        "after down: no cluster process, no /tmp leftovers",
        not marked and not ours,
        f"processes {marked}, new /tmp entries of ours {ours} (others' new entries: {len(new_tmp) - len(ours)}); /dev/shm tmp* dirs (any owner): {shm}",
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--state-dir", default="runs/cluster-local")
    parser.add_argument("--lifecycle", action="store_true", help="run up before and down after the checks")
    parser.add_argument("--autoscale", action="store_true", help="also the autoscaler check (~5 min)")
    parser.add_argument(
        "--no-node-credentials",
        dest="node_credentials",
        action="store_false",
        help="(with --lifecycle) up --no-node-credentials; the Tune job passes S3 settings in its runtime env",
    )
    parser.add_argument(
        "--skip", default="", help="comma-separated: s3,lancedb,mlflow,mlflow-endpoint,token,tune"
    )
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    home = tempfile.mkdtemp(prefix="etcl-client-home-")
    tmp_before = set(os.listdir("/tmp"))
    cluster_id = ""
    try:
        if args.lifecycle:
            t0 = time.monotonic()
            up = cli(args.state_dir, "up", *([] if args.node_credentials else ["--no-node-credentials"]))
            timings["up"] = round(time.monotonic() - t0, 1)
            record(
                "up",
                up.returncode == 0,
                f"{timings['up']}s" + ("" if up.returncode == 0 else up.stderr[-2000:]),
            )
            if up.returncode != 0:
                return 1
        state = json.loads((Path(args.state_dir) / "state.json").read_text())
        cluster_id = state["cluster_id"]
        timings["up_breakdown"] = state.get("up_timings_s")
        env = client_env(args.state_dir, home)
        check_loopback(args.state_dir)
        if "s3" not in skip:
            run_check("(a) pyarrow S3FileSystem", HERE / "s3_pyarrow.py", env)
        if "lancedb" not in skip:
            run_check("(c) LanceDB on s3://", HERE / "lancedb_s3.py", env)
        if "mlflow" not in skip:
            run_check("(d) MLflow basic auth + artifacts in S3", HERE / "mlflow_auth_s3.py", env)
        if "mlflow-endpoint" not in skip and loopback_only():
            run_check(
                "MLflow server with AWS_ENDPOINT_URL only (no MLFLOW_S3_ENDPOINT_URL)",
                HERE / "mlflow_server_endpoint_env.py",
                env,
            )
        if "token" not in skip:
            check_token(env)
        if "tune" not in skip:
            check_tune(env, args.state_dir, args.node_credentials)
        if args.autoscale:
            check_autoscale(env)
        check_loopback(args.state_dir)
        status = cli(args.state_dir, "status")
        print(status.stdout)
        timings["status"] = status.stdout.strip().splitlines()
    finally:
        if args.lifecycle:
            t0 = time.monotonic()
            down = cli(args.state_dir, "down")
            timings["down"] = round(time.monotonic() - t0, 1)
            record(
                "down",
                down.returncode == 0,
                f"{timings['down']}s" + ("" if down.returncode == 0 else down.stderr[-1500:]),
            )
            leftovers(cluster_id, tmp_before)
        import shutil

        shutil.rmtree(home, ignore_errors=True)
    print(
        "SUMMARY "
        + json.dumps(
            {
                "passed": sum(ok for _, ok, _ in results),
                "failed": [n for n, ok, _ in results if not ok],
                "timings": timings,
            }
        )
    )
    return 0 if all(ok for _, ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
