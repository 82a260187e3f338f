"""Real MLflow tracking servers on loopback ports, for the tests that talk to one."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    ) -> None:
        self.backend_store_uri = backend_store_uri
        self.command = command
        self.artifacts = artifacts
        self.log = log
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

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
        out = self.log.open("a") if self.log else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            args,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
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
