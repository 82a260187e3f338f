"""The state dir's state.json (what `up` started) and the per-state-dir lock."""

from __future__ import annotations

import contextlib
import fcntl
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .common import free_port, port_is_free, secret


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
