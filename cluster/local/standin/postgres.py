"""PostgreSQL: a private cluster in the state dir, run as an unprivileged OS user, with MLflow's
databases `mlflow` (tracking) and `mlflow_auth` (basic-auth users)."""

from __future__ import annotations

import glob
import hashlib
import os
import pwd
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from .common import LOOPBACK, PG_DB_USER, alive, write_private
from .envs import base_env
from .log import log
from .state import State


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
