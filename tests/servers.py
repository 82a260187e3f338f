"""Real MLflow tracking servers on loopback ports, for the tests that talk to one."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def closed_port() -> Iterator[int]:
    """A loopback port where nothing listens for the whole block: bound here but never listening,
    so a connection is refused and no other process can take the port meanwhile (a port from
    `free_port` can be taken by any server another test starts between the pick and the use)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


class MlflowServer:
    """`mlflow server` (or `mlflow ui`, as `make mlflow-ui` starts it) on a free loopback port, in
    its own process group: `kill()` takes it away, workers included, like a crashed server, and
    `start()` brings it back on the same port and store."""

    def __init__(
        self,
        backend_store_uri: str,
        command: str = "server",
        artifacts: Path | None = None,
        log: Path | None = None,
        auth: tuple[str, str] | None = None,
        auth_dir: Path | None = None,
    ) -> None:
        self.backend_store_uri = backend_store_uri
        self.command = command
        self.artifacts = artifacts
        self.log = log
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        # MLflow's basic-auth app (every request but /health needs a login): `auth` is the admin's
        # (user, password); its config and user database go in `auth_dir`.
        self.auth = auth
        self.auth_dir = auth_dir

    def start(self, timeout: float = 90) -> None:
        args = [
            str(Path(sys.executable).parent / "mlflow"),
            self.command,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
            "--backend-store-uri",
            self.backend_store_uri,
        ]
        if self.artifacts is not None:
            args += ["--artifacts-destination", str(self.artifacts)]
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
        if self.auth is not None:
            assert self.auth_dir is not None, "auth needs auth_dir"
            ini = self.auth_dir / "basic_auth.ini"
            ini.write_text(
                "[mlflow]\ndefault_permission = READ\n"
                f"database_uri = sqlite:///{self.auth_dir / 'auth.db'}\n"
                f"admin_username = {self.auth[0]}\nadmin_password = {self.auth[1]}\n"
                "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                "auth_cache_ttl_seconds = 60\n"  # as the cluster's (cluster/make-secrets.sh)
            )
            ini.chmod(0o600)
            args += ["--app-name", "basic-auth"]
            env.update(
                MLFLOW_AUTH_CONFIG_PATH=str(ini),
                MLFLOW_FLASK_SERVER_SECRET_KEY=os.urandom(16).hex(),
                MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",  # no GenAI job runner processes
            )
        out = self.log.open("a") if self.log else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            args,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never an env proxy
        deadline = time.time() + timeout
        while True:
            assert self.proc.poll() is None, f"mlflow {self.command} exited with {self.proc.returncode}"
            try:
                with direct.open(f"{self.uri}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"mlflow {self.command} did not answer /health within {timeout:.0f} s")
            time.sleep(0.3)

    def kill(self) -> None:
        """SIGKILL the server and its workers (all ours: its own process group)."""
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not go within 20 s."""
        try:
            self._signal(signal.SIGTERM)
        except subprocess.TimeoutExpired:
            self.kill()

    def _signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=20)
        self.proc = None


class SeaweedS3:
    """SeaweedFS's S3 gateway on loopback, started as `make cluster-local` starts it (its
    `start_s3`), with a bucket `embedtune`; `kill()` crashes it, `start()` brings it back on the same
    ports and data."""

    def __init__(self, where: Path) -> None:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "cluster" / "local"))
        import cluster_local

        self.cl = cluster_local
        self.state = cluster_local.State(where / "state")
        self.state.data.update(cluster_id=f"tests-{os.getpid()}", runtime_dir=str(where / "run"))
        (where / "run" / "tmp").mkdir(parents=True, exist_ok=True)
        self.info: dict | None = None

    @property
    def env(self) -> dict[str, str]:
        return self.cl.s3_env(self.state)

    def client(self):
        return self.cl._s3_client(self.env)

    def start(self) -> None:
        self.info = self.cl.start_s3(self.state)

    def kill(self) -> None:
        if self.info is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.info["sid"], signal.SIGKILL)
            self.info = None
            time.sleep(1)

    def stop(self) -> None:
        self.kill()
        for sock in self.cl.weed_grpc_sockets(self.state):
            sock.unlink(missing_ok=True)
