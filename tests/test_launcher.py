"""`ray up cluster/ray-cluster.yaml`, executed: Ray's own cluster launcher runs the shipped file's
`file_mounts`, `setup_commands`, `head_setup_commands` and `head_start_ray_commands` as they are, over
SSH, on this machine; then a sweep is submitted with the README's `ray job submit` line, and
`ray down` tears the cluster down.

Only what cannot exist here is replaced: the provider (Ray's `local` provider, head 127.0.0.1), the
auth section (a user this test creates, logged in over SSH with a generated key) and the `docker`
and node-type sections (no container runtime: the commands run in that user's login shell, whose
PATH holds a Python 3.11 environment as the image's would). The user's login shell also stands in
for an instance profile: it carries the S3 endpoint and keys of SeaweedFS, the cluster-local
object store, holding the shipped file's bucket `embedtune-runs`. The tracking databases are the
cluster-local PostgreSQL, named in `cluster/secrets/` by `cluster/make-secrets.sh` as RDS would be.

SSH: `sshd -i` (inetd mode) is the ssh client's ProxyCommand, so no port is opened; it runs in a
private mount namespace where the venv's base Python and site-packages are bind-mounted where the
unprivileged user can read them (they may sit under a 0700 /root).

Checked: the tracking server starts (`ray up` waits for it), the sweep's trial runs and the
registered model are in PostgreSQL, the report is on S3, the job's last lines name the report's S3
URI and the parent run's MLflow URL, every listening socket of the user's processes is on
127.0.0.1, and after `ray down` none of its processes is left.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import pwd
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "cluster" / "local"))
import cluster_local as cl  # noqa: E402  (the cluster-local server parts: S3, PostgreSQL)
from cluster_site import SAMPLE_SITE, render_sample  # noqa: E402  (what `make cluster-render` writes)

BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
BUCKET = SAMPLE_SITE["BUCKET"]  # the site file's bucket, rendered into the launcher file
SWEEP = "launcher-test"
SHARED_PORTS = (5000, 6379, 8076, 8265)  # fixed by the shipped file


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    return subprocess.run(cmd, **kw)


def _require_host() -> None:
    missing = [
        t
        for t in ("/usr/sbin/sshd", "rsync", "ssh", "ssh-keygen", "unshare", "useradd")
        if not shutil.which(t)
    ]
    if missing:
        pytest.fail(
            f"missing {missing}: apt-get install openssh-server rsync (make setup does)", pytrace=False
        )
    if os.geteuid() != 0:
        pytest.skip("needs root: creates a user and a mount namespace for the launcher's SSH target")
    if _run(["unshare", "--mount", "true"]).returncode != 0:
        pytest.skip("unshare --mount is not allowed here")
    busy = [p for p in SHARED_PORTS if not cl.port_is_free(p)]
    if busy:
        pytest.fail(
            f"ports {busy} (fixed by cluster/ray-cluster.yaml) are taken: run in the test netns",
            pytrace=False,
        )


def _user_pids(uid: int) -> list[int]:
    import psutil

    pids = []
    for proc in psutil.process_iter(["pid", "uids"]):
        with contextlib.suppress(psutil.Error):
            if proc.info["uids"] and proc.info["uids"].real == uid:
                pids.append(proc.info["pid"])
    return pids


def _copy_checkout(dest: Path) -> None:
    """The working tree as a user's checkout has it (tracked and untracked-not-ignored files)."""
    files = _run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO, check=True
    ).stdout
    for rel in filter(None, files.split("\0")):
        src = REPO / rel
        if src.is_file() and not src.is_symlink():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


class Node:
    """The machine `ray up` targets: a fresh unprivileged user reached over SSH."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.user = f"etl{uuid.uuid4().hex[:8]}"
        _run(["useradd", "--create-home", "--shell", "/bin/bash", "--user-group", self.user], check=True)
        try:
            self._prepare()
        except BaseException:
            self.remove()
            raise

    def _prepare(self) -> None:
        tmp = self.tmp
        _run(
            ["usermod", "-p", "*", self.user], check=True
        )  # no password, but not locked (sshd refuses locked)
        pw = pwd.getpwnam(self.user)
        self.uid, self.gid, self.home = pw.pw_uid, pw.pw_gid, Path(pw.pw_dir)
        self.key = tmp / "id_ed25519"
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key)], check=True)
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / "host_key")], check=True)
        ssh_dir = self.home / ".ssh"
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        (ssh_dir / "authorized_keys").write_text(self.key.with_suffix(".pub").read_text())
        (ssh_dir / "authorized_keys").chmod(0o600)
        self.mounts = self._mounts()
        (tmp / "sshd_config").write_text(
            f"HostKey {tmp / 'host_key'}\nAuthorizedKeysFile .ssh/authorized_keys\nPasswordAuthentication no\n"
            f"KbdInteractiveAuthentication no\nUsePAM no\nPermitRootLogin no\nAllowUsers {self.user}\n"
            "PidFile none\nX11Forwarding no\nLogLevel ERROR\n"
        )
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
        proxy = tmp / "sshd-proxy"
        proxy.write_text(
            "#!/bin/sh\n# ssh's ProxyCommand: one sshd in inetd mode per connection, in the node's mount view\n"
            f"exec unshare --mount --propagation private /bin/sh -c '{self._mount_script()} "
            f"exec /usr/sbin/sshd -i -f {tmp / 'sshd_config'}'\n"
        )
        proxy.chmod(0o700)
        self.proxy = proxy
        self._make_python_env()

    def _mounts(self) -> list[str]:
        """Mount commands that show the user the venv's base Python and site-packages at their own
        paths (which rpaths and pyvenv.cfg name) when a parent (a 0700 /root) hides them: the
        hidden parent gets an empty tmpfs with just those paths bound back in."""
        needed = [Path(sys.base_prefix).resolve(), Path(sysconfig.get_paths()["purelib"]).resolve()]
        staging = self.tmp / "mnt"
        staging.mkdir(mode=0o755)
        keep, hide, back = [], [], []  # all staged before any parent is hidden
        for i, path in enumerate(needed):
            if self._can(["test", "-r", str(path)]):
                continue
            hidden = next(a for a in reversed(path.parents) if not self._can(["test", "-x", str(a)]))
            (staging / str(i)).mkdir(mode=0o755)
            keep.append(f"mount --bind {path} {staging / str(i)}")
            if f"mount -t tmpfs -o mode=755 tmpfs {hidden}" not in hide:
                hide.append(f"mount -t tmpfs -o mode=755 tmpfs {hidden}")
            back += [f"mkdir -p {path}", f"mount --bind -o ro {staging / str(i)} {path}"]
        return keep + hide + back

    def _can(self, test: list[str]) -> bool:
        return _run(["runuser", "-u", self.user, "--", *test]).returncode == 0

    def _mount_script(self) -> str:
        return "".join(f"{c} && " for c in self.mounts)

    def as_user(self, script: str, **kw) -> subprocess.CompletedProcess:
        """`script` run as the user in the node's mount view (not over SSH: for preparing the node)."""
        inner = f"{self._mount_script()} exec runuser -u {self.user} -- /bin/bash -c '{script}'"
        return _run(["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", inner], **kw)

    def _make_python_env(self) -> None:
        """~/py: a venv off the same base Python that sees the shared venv's packages (a .pth line),
        with `ray`, `mlflow` & co. on PATH as in the image; install.sh installs the project into it."""
        python = Path(sys._base_executable).resolve()  # type: ignore[attr-defined]
        made = self.as_user(f"{python} -m venv --without-pip $HOME/py", timeout=120)
        assert made.returncode == 0, made.stderr
        venv = self.home / "py"
        site = next(venv.glob("lib/python3*/site-packages"))
        (site / "_embedtune_shared.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
        for script in BIN.iterdir():  # console scripts of the shared venv, re-pointed at ~/py's python
            with contextlib.suppress(UnicodeDecodeError, IsADirectoryError):
                text = script.read_text()
                first, _, rest = text.partition("\n")
                if first.startswith("#!") and "python" in first and not (venv / "bin" / script.name).exists():
                    (venv / "bin" / script.name).write_text(f"#!{venv / 'bin' / 'python'}\n{rest}")
                    (venv / "bin" / script.name).chmod(0o755)
        # the packaged models this test's sweep uses, as the shared test home has them (install.sh
        # materialises the rest); the user's own home, as on a node
        models = self.home / ".cache" / "embedtune" / "models"
        models.mkdir(parents=True)
        shared = Path(os.environ["EMBEDTUNE_HOME"]) / "models"
        for d in shared.iterdir() if shared.is_dir() else ():
            if d.is_dir() and not d.name.startswith("."):
                shutil.copytree(d, models / d.name)
        _run(["chown", "-R", f"{self.user}:{self.user}", str(self.home)], check=True)

    def write_login_env(self, s3: dict[str, str]) -> None:
        """~/.bashrc, which Ray's login shell sources: PATH with the Python env, and S3 as an instance
        profile gives it (here: SeaweedFS's endpoint and keys); the node has no network beyond."""
        env = {
            **s3,
            "TMPDIR": str(self.home / "tmp"),  # Ray's session dir: /tmp/ray may belong to another user
            "EMBEDTUNE_OFFLINE": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "DO_NOT_TRACK": "1",
            # Ray's OOM killer counts the whole machine's memory (here shared with other work) against
            # the node's own workers; an instance is the head's alone
            "RAY_memory_monitor_refresh_ms": "0",
        }
        lines = [f"export PATH={self.home / 'py' / 'bin'}:/usr/local/bin:/usr/bin:/bin"]
        lines += [f"export {k}='{v}'" for k, v in env.items()]
        (self.home / "tmp").mkdir(exist_ok=True)
        (self.home / ".bashrc").write_text("\n".join(lines) + "\n")
        for f in (self.home / "tmp", self.home / ".bashrc"):
            os.chown(f, self.uid, self.gid)

    def remove(self) -> None:
        import psutil

        uid = pwd.getpwnam(self.user).pw_uid
        for pid in _user_pids(uid):  # only processes of the user this test created
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()
        time.sleep(1)
        _run(["userdel", "--remove", self.user])


def _launcher_config(node: Node, tmp: Path) -> dict:
    """The shipped file as a user applies it (rendered with a site file, `make cluster-render`), with
    only provider, auth, docker and node types replaced."""
    cfg = yaml.safe_load((render_sample(tmp) / "ray-cluster.yaml").read_text())
    cfg["provider"] = {"type": "local", "head_ip": "127.0.0.1", "worker_ips": []}
    cfg["auth"] = {
        "ssh_user": node.user,
        "ssh_private_key": str(node.key),
        "ssh_proxy_command": str(node.proxy),
    }
    cfg["docker"] = {}
    for key in ("available_node_types", "head_node_type"):
        cfg.pop(key)  # the local provider's single node type
    return cfg


def _spec() -> dict:
    """A tiny sweep with the shipped GPU specs' storage and tracking lines (from the head's env)."""
    raw = yaml.safe_load((REPO / "sweeps" / "cluster-local.yaml").read_text())
    gooaq = yaml.safe_load((REPO / "sweeps" / "gooaq.yaml").read_text())
    raw.update(
        name=SWEEP,
        storage_path=gooaq["storage_path"],
        resources={"cpu": 1, "gpu": 0},
        max_concurrent_trials=1,
    )
    raw["mlflow"] = {
        **raw["mlflow"],
        "tracking_uri": gooaq["mlflow"]["tracking_uri"],
        "experiment": f"embedtune-{SWEEP}",
    }
    raw["search"] = {**raw["search"], "epochs": [1], "lr": [1.0e-4]}
    raw["train"] = {**raw["train"], "hard_negatives": False}
    raw["datasets"][0]["max_train_pairs"] = 32
    return raw


@pytest.fixture(scope="module")
def launched():
    _require_host()
    tmp = Path(tempfile.mkdtemp(prefix="etest-launcher-", dir="/tmp"))
    tmp.chmod(0o711)  # the user reaches tmp/mnt; nothing else here is readable to it
    state = cl.State(tmp / "state")
    state.data.update(
        cluster_id=uuid.uuid4().hex[:12],
        services={},
        runtime_dir=tempfile.mkdtemp(prefix="etcl-", dir="/tmp"),
    )
    (state.runtime_dir / "tmp").mkdir()
    state.save()
    state.dir.chmod(0o755)  # the PostgreSQL OS user keeps its data in there
    node = None
    try:
        cl.start_s3(state)
        s3 = cl.s3_env(state)
        cl._s3_client(s3).create_bucket(Bucket=BUCKET)
        pg = cl.start_postgres(state, cl.pg_os_user(None))
        pg_pw = state.secret("pg_mlflow_password")
        db = (
            pg["dsn"]
            .replace("postgresql://mlflow@", f"postgresql+psycopg2://mlflow:{pg_pw}@")
            .rsplit("/", 1)[0]
        )

        node = Node(tmp)
        node.write_login_env(s3)
        checkout = tmp / "checkout"
        _copy_checkout(checkout)
        made = _run([str(checkout / "cluster" / "make-secrets.sh")], env={**os.environ, "MLFLOW_BACKEND_URI": f"{db}/mlflow",
                                                                     "MLFLOW_AUTH_DB_URI": f"{db}/mlflow_auth"})  # fmt: skip
        assert made.returncode == 0, made.stderr
        (checkout / "sweeps" / f"{SWEEP}.yaml").write_text(yaml.safe_dump(_spec()))
        config = tmp / "ray-cluster.yaml"
        config.write_text(yaml.safe_dump(_launcher_config(node, tmp)))
        client_env = {
            k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "AWS_", "PYTHONPATH"))
        }
        client_env.update(TMPDIR=str(tmp), RAY_TMPDIR=str(tmp), PATH=f"{BIN}:{os.environ['PATH']}")
        up = _run(
            [RAY, "up", "-y", "--no-config-cache", str(config)], cwd=checkout, env=client_env, timeout=900
        )
        yield {"tmp": tmp, "state": state, "node": node, "checkout": checkout, "config": config, "env": client_env,
               "up": up, "db": f"{db}/mlflow", "s3": s3}  # fmt: skip
    finally:
        if node is not None:
            _run([RAY, "down", "-y", str(tmp / "ray-cluster.yaml")], cwd=tmp / "checkout", timeout=300,
                 env={**os.environ, "TMPDIR": str(tmp), "RAY_TMPDIR": str(tmp)})  # fmt: skip
            node.remove()
        cl._down(state, purge=True)
        shutil.rmtree(tmp, ignore_errors=True)


def test_ray_up_runs_the_shipped_file_and_a_sweep_job_completes(launched) -> None:
    import psutil

    up, node = launched["up"], launched["node"]
    assert up.returncode == 0, (up.stdout[-6000:], up.stderr[-3000:])
    # the tracking server on the head answers, on loopback
    import urllib.request

    with urllib.request.urlopen("http://127.0.0.1:5000/health", timeout=10) as r:
        assert r.status == 200

    checkout, env = launched["checkout"], launched["env"]
    submit = [RAY, "job", "submit", "--address", "http://127.0.0.1:8265", "--working-dir", ".", "--",
              "embedtune", "sweep", f"sweeps/{SWEEP}.yaml"]  # fmt: skip
    job_env = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": "cluster/secrets/ray_auth_token"}
    done = _run(submit, cwd=checkout, env=job_env, timeout=1200)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-6000:]

    # the job log ends with where the user finds the results: the report on S3, the parent run in MLflow
    tail = [line for line in done.stdout.splitlines() if line.startswith("[embedtune]")][-2:]
    assert tail[0].startswith(f"[embedtune] report: s3://{BUCKET}/sweeps/{SWEEP}/report/leaderboard.md"), tail
    url = re.match(
        r"\[embedtune\] MLflow: (http://127\.0\.0\.1:5000/#/experiments/(\d+)/runs/([0-9a-f]{32})) ", tail[1]
    )
    assert url, tail
    assert ".cache/embedtune" not in "\n".join(tail)

    # runs, registered model: in PostgreSQL (outside the cluster)
    import psycopg2

    conn = psycopg2.connect(launched["db"].replace("postgresql+psycopg2://", "postgresql://"))
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT r.run_uuid, r.status, r.experiment_id FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                        "AND t.key = 'embedtune.kind' AND t.value = 'trial'")  # fmt: skip
            trials = cur.fetchall()
            cur.execute("SELECT status, experiment_id FROM runs WHERE run_uuid = %s", (url[3],))
            parent = cur.fetchone()
            cur.execute("SELECT name FROM model_versions WHERE name = %s", (f"embedtune-{SWEEP}",))
            versions = cur.fetchall()
    finally:
        conn.close()
    assert len(trials) == 1 and trials[0][1] == "FINISHED", trials
    assert parent == ("FINISHED", int(url[2])), parent
    assert versions

    # the report on S3 (the printed URI)
    s3 = cl._s3_client(launched["s3"])
    board = s3.get_object(Bucket=BUCKET, Key=f"sweeps/{SWEEP}/report/leaderboard.md")["Body"].read().decode()
    assert "## medquad" in board and "**Winner**" in board

    # every listening socket of the node user's processes is on loopback (MLflow and the dashboard too)
    pids = set(_user_pids(node.uid))
    listening = [c for c in psutil.net_connections("inet") if c.status == "LISTEN" and c.pid in pids]
    ports = {c.laddr.port for c in listening}
    assert {5000, 8265, 6379} <= ports, ports
    off = [c for c in listening if _ipv4(c.laddr.ip) != "127.0.0.1"]
    assert not off, off

    # `ray down` stops Ray on the head (`ray stop`); what is left is the tracking server alone, which
    # goes with the instance on AWS (here: with the node user, below)
    mlflow_sid = os.getsid(next(c.pid for c in listening if c.laddr.port == 5000))
    down = _run([RAY, "down", "-y", str(launched["config"])], cwd=checkout, env=env, timeout=300)
    assert down.returncode == 0, down.stdout[-3000:] + down.stderr[-2000:]
    deadline = time.time() + 60
    while time.time() < deadline and [p for p in _user_pids(node.uid) if _sid(p) != mlflow_sid]:
        time.sleep(2)
    left = {p: _cmdline(p) for p in _user_pids(node.uid) if _sid(p) != mlflow_sid}
    assert not left, left
    assert any("mlflow" in _cmdline(p) for p in _user_pids(node.uid))


def _ipv4(ip: str) -> str:
    """`::ffff:127.0.0.1` (an IPv6 socket bound to the IPv4-mapped loopback) is 127.0.0.1."""
    addr = ipaddress.ip_address(ip)
    mapped = getattr(addr, "ipv4_mapped", None)
    return str(mapped or addr)


def _sid(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def _cmdline(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
    return ""
