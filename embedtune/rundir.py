"""The run directory: the one object that knows a run's file layout and reads and writes it.

A run directory holds a sweep's (or an evaluation's) own state and results:

    .embedtune-run        marker: this folder was made by embedtune (`--fresh` only deletes such)
    spec.json             the sweep spec
    sweep_state.json      progress: parent MLflow run, Tune experiments, fingerprints, finished
    trials.json           one record per trial config (`embedtune.records.TrialRecord`)
    base_metrics.json     epoch-0 scores of every base model on every dataset
    mlflow_pending.json   MLflow records a tracking server that was away did not take yet
    data/<label>.json     the split each trial saw
    report/               leaderboard, plots and the stored inputs of a rebuild
    tune/, tune-2/, ...   Ray Tune's experiments (when `storage_path` is not set)
    lancedb/, mlflow.db, mlartifacts/, checkpoints/   local-only defaults

Its `location` is a local folder or a URI on shared object storage (`s3://bucket/sweeps/<name>`),
so that on a cluster the state outlives the driver: then the JSON state is read from and written
to the object store (each write one atomic PUT), the report is built in a local work folder and
uploaded whole, and the local-only defaults (SQLite MLflow store) do not apply.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from embedtune import storage
from embedtune.errors import EmbedtuneError

log = logging.getLogger(__name__)

MARKER = ".embedtune-run"
SPEC = "spec.json"
STATE = "sweep_state.json"
TRIALS = "trials.json"
BASE_METRICS = "base_metrics.json"
JOURNAL = "mlflow_pending.json"
DATA = "data"
REPORT = "report"
LOCK = ".lock"
LEASE = "lock.json"  # remote run dirs: a lease refreshed while the sweep runs
LEASE_TTL_S = 30.0


def protected_path(path: Path) -> None:
    """Refuse to delete `path` when it is `/`, $HOME, the checkout embedtune runs from or the
    working directory, or a parent of one of them (EmbedtuneError naming which)."""
    import embedtune

    target = Path(path).resolve()
    keep = {
        "/": Path("/"),
        "$HOME": Path.home().resolve(),
        "the embedtune checkout": Path(embedtune.__file__).resolve().parent.parent,
        "the working directory": Path.cwd().resolve(),
    }
    for what, where in keep.items():
        if target == where or target in where.parents:
            raise EmbedtuneError(
                f"--fresh: refusing to delete {target}: it is {what}"
                + ("" if target == where else f" or holds it ({where})")
                + "; pass the --run-dir of a sweep (e.g. runs/<name>)"
            )


def _remote_children(location: str) -> list[str]:
    from pyarrow import fs as pafs

    fs, root = storage._fs(location)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=False, allow_not_found=True))
    return [i.base_name for i in infos]


class RunDir:
    """Paths and atomic reads/writes of one run directory (see the module docstring)."""

    def __init__(self, location: str | Path, work: Path | None = None) -> None:
        self.remote = storage.is_remote(location)
        if self.remote:
            self.location = str(location).rstrip("/")
            digest = hashlib.sha256(self.location.encode()).hexdigest()[:16]
            from embedtune import env

            self.path = Path(work) if work else env.home() / "runs" / digest
        else:
            self.path = storage.local_path(location).resolve()
            self.location = str(self.path)

    def __repr__(self) -> str:
        return f"RunDir({self.location!r})"

    def __str__(self) -> str:
        return self.location

    # ---------------------------------------------------------------- layout

    def uri(self, *parts: str) -> str:
        """Canonical location of a file of the run (remote when the run dir is)."""
        return storage.join(self.location, *parts)

    def local(self, *parts: str) -> Path:
        """Path of a file in the local work folder (the run dir itself when it is local)."""
        return self.path.joinpath(*parts)

    @property
    def report_dir(self) -> Path:
        return self.local(REPORT)

    @property
    def plots_dir(self) -> Path:
        return self.local(REPORT, "plots")

    def data_file(self, label: str) -> str:
        return self.uri(DATA, f"{label}.json")

    def tune_storage(self, storage_path: str | None, sweep_name: str) -> str:
        """Where Ray Tune keeps this sweep's experiments: `<storage_path>/<sweep name>` (so two sweeps
        sharing a bucket never share Tune state), else the run dir itself."""
        if storage_path:
            return storage.join(storage_path, sweep_name)
        return self.location

    @property
    def default_lancedb(self) -> str:
        return self.uri("lancedb")

    @property
    def mlartifacts(self) -> Path:
        return self.local("mlartifacts")

    @property
    def checkpoints(self) -> Path:
        """Local copies of remote checkpoints (for the final stage)."""
        return self.local("checkpoints")

    def sqlite_tracking_uri(self) -> str:
        if self.remote:
            raise EmbedtuneError(
                f"run dir {self.location} is on object storage, where a SQLite MLflow store cannot live: "
                "set mlflow.tracking_uri (or $MLFLOW_TRACKING_URI) to a tracking server"
            )
        return f"sqlite:///{self.local('mlflow.db')}"

    # ---------------------------------------------------------------- existence

    def exists(self) -> bool:
        return storage.exists(self.uri(MARKER)) or storage.exists(self.uri(STATE))

    def create(self) -> None:
        """Make the run dir (and its marker); nothing when it exists."""
        self.path.mkdir(parents=True, exist_ok=True)
        if not storage.exists(self.uri(MARKER)):
            storage.write_json(self.uri(MARKER), {"created": time.time(), "by": "embedtune"})

    def clear_for_fresh(self) -> None:
        """Empty the run dir for `--fresh`, holding its lock (never under a running sweep). Refuses a
        folder embedtune did not make (no MARKER: `--run-dir ~/data --fresh` must not delete data),
        and always the checkout, the working directory, $HOME, `/` and their parents."""
        if not self.remote:
            protected_path(self.path)
            if not self.path.exists() or not any(self.path.iterdir()):
                return  # nothing to lose
        if not storage.exists(self.uri(MARKER)):
            raise EmbedtuneError(
                f"--fresh: {self.location} is not an embedtune run dir (no {MARKER} in it), so it is not "
                "deleted; pass the --run-dir of a sweep, or remove the folder yourself"
            )
        with self.lock():
            if self.remote:
                for name in _remote_children(self.location):
                    if name != LEASE:
                        storage.delete(self.uri(name))
                shutil.rmtree(self.path, ignore_errors=True)  # the local work folder
                return
            for child in self.path.iterdir():
                if child.name != LOCK:  # the lock we hold stays until the context ends
                    storage.delete(child)

    # ---------------------------------------------------------------- JSON state

    def read_json(self, name: str, default: Any = None) -> Any:
        try:
            return storage.read_json(self.uri(name), default)
        except ValueError as exc:
            raise EmbedtuneError(
                f"{self.uri(name)} is not valid JSON ({exc}); remove it or use --fresh"
            ) from exc

    def write_json(self, name: str, obj: Any) -> None:
        storage.write_json(self.uri(name), obj)
        if self.remote:  # a local copy for the tools that read files (report rebuild, users)
            storage.write_json(self.local(name), obj)

    def delete(self, name: str) -> None:
        storage.delete(self.uri(name))
        if self.remote:
            storage.delete(self.local(name))

    def has(self, name: str) -> bool:
        return storage.exists(self.uri(name))

    # ---------------------------------------------------------------- report

    def write_report(self, build: Callable[[Path], None]) -> Path:
        """Build a complete report with `build(folder)` in a staging folder, then put it in place of
        the old one as a whole (and upload it when the run dir is remote)."""
        self.path.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{REPORT}.new.", dir=self.path))
        try:
            build(staging)
            storage.swap_dir(staging, self.report_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if self.remote:
            storage.upload_dir(self.report_dir, self.uri(REPORT))
        return self.report_dir

    def pull_report(self) -> None:
        """Fetch the stored report of a remote run dir into the local work folder."""
        old = self.path / f".{REPORT}.old"
        if not self.report_dir.exists() and old.exists():  # a swap cut short
            old.rename(self.report_dir)
        if self.remote:
            self.path.mkdir(parents=True, exist_ok=True)
            storage.download_dir(self.uri(REPORT), self.report_dir)

    # ---------------------------------------------------------------- lock

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the run dir for one sweep at a time: a second sweep into it fails with one line.
        Local: an OS file lock (released by the kernel when the holder dies). Remote: a lease file
        refreshed every few seconds; one not refreshed for LEASE_TTL_S belongs to a dead driver."""
        with self._local_lock() if not self.remote else self._lease():
            yield

    def _owner(self) -> dict[str, Any]:
        return {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}

    @contextlib.contextmanager
    def _local_lock(self) -> Iterator[None]:
        from filelock import FileLock, Timeout

        made = [p for p in (self.path, *self.path.parents) if not p.exists()]
        self.path.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.local(LOCK)), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            owner = storage.read_json(self.local(LEASE), {}) or {}
            who = f" by pid {owner['pid']} on {owner['host']}" if owner.get("pid") else ""
            raise EmbedtuneError(
                f"run dir {self.location} is in use{who}: another sweep runs into it; wait for it to end "
                "or use another --run-dir"
            ) from None
        try:
            storage.write_json(self.local(LEASE), self._owner())
            yield
        finally:
            storage.delete(self.local(LEASE))
            lock.release()
            # A sweep refused before it wrote anything leaves no folder behind.
            if made and {p.name for p in self.path.iterdir()} <= {LOCK}:
                self.local(LOCK).unlink(missing_ok=True)
                for folder in made:
                    folder.rmdir()

    @contextlib.contextmanager
    def _lease(self) -> Iterator[None]:
        me = self._owner()
        deadline = time.time() + LEASE_TTL_S + 5
        while True:
            held = storage.read_json(self.uri(LEASE))
            if not held or time.time() - float(held.get("beat", 0)) > LEASE_TTL_S:
                break
            if time.time() > deadline:
                raise EmbedtuneError(
                    f"run dir {self.location} is in use by pid {held.get('pid')} on {held.get('host')} "
                    "(its lease is fresh): another sweep runs into it; wait for it to end or use another name"
                )
            time.sleep(2)
        stop = threading.Event()

        def beat() -> None:
            while True:
                try:
                    storage.write_json(self.uri(LEASE), {**me, "beat": time.time()})
                except Exception as exc:  # an object-store outage must not end the heartbeat for good
                    log.warning("object store: could not refresh the lease %s (%s); retrying", self.uri(LEASE),
                                f"{type(exc).__name__}: {exc}".splitlines()[0][:200])  # fmt: skip
                if stop.wait(LEASE_TTL_S / 3):
                    return

        beat_once = {**me, "beat": time.time()}
        storage.write_json(self.uri(LEASE), beat_once)
        thread = threading.Thread(target=beat, name="embedtune-lease", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=10)
            storage.delete(self.uri(LEASE))
