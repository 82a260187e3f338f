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
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from embedtune import lease, storage
from embedtune import report_store as store
from embedtune.data import PreparedData
from embedtune.errors import EmbedtuneError
from embedtune.records import HarmCheck, TrialRecord, dump_trials, load_trials
from embedtune.specs import DataSpec, SweepSpec
from embedtune.specs.load import validation_error_line

log = logging.getLogger(__name__)

MARKER = ".embedtune-run"
TRAIN_MARKER = ".embedtune-train"  # in what `embedtune train --out` wrote: `--overwrite` may replace it
SPEC = "spec.json"
STATE = "sweep_state.json"
TRIALS = "trials.json"
BASE_METRICS = "base_metrics.json"
JOURNAL = "mlflow_pending.json"
DATA = "data"
REPORT = "report"
LOCK = ".lock"
LEASE = "lock.json"  # remote run dirs: a lease refreshed while the sweep runs
LEASE_TTL_S = lease.TTL_S


def protected_path(
    path: Path, flag: str = "--fresh", instead: str = "the --run-dir of a sweep (e.g. runs/<name>)"
) -> None:
    """Refuse to delete `path` when it is `/`, $HOME, the checkout embedtune runs from or the
    working directory, or a parent of one of them (EmbedtuneError naming `flag` and which)."""
    target = Path(path).resolve()
    keep = {
        "/": Path("/"),
        "$HOME": Path.home().resolve(),
        "the embedtune checkout": Path(__file__).resolve().parent.parent,  # embedtune/rundir.py
        "the working directory": Path.cwd().resolve(),
    }
    for what, where in keep.items():
        if target == where or target in where.parents:
            raise EmbedtuneError(
                f"{flag}: refusing to delete {target}: it is {what}"
                + ("" if target == where else f" or holds it ({where})")
                + f"; pass {instead}"
            )


def check_train_overwrite(out: Path) -> None:
    """`embedtune train --out OUT --overwrite` replaces OUT whole: only a folder an earlier `embedtune
    train` wrote (it holds TRAIN_MARKER), never `/`, $HOME, the checkout, the working directory or a
    parent of one (`--out ..`, `--out ~/projects` must not delete a user's files)."""
    protected_path(out, "--overwrite", "a new --out folder")
    if not (Path(out) / TRAIN_MARKER).exists():
        raise EmbedtuneError(
            f"--overwrite: {Path(out).resolve()} was not written by `embedtune train` (no {TRAIN_MARKER} in "
            "it), so it is not deleted; pick a new --out folder, or remove this one yourself"
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

    @staticmethod
    def data_name(label: str) -> str:
        return f"{DATA}/{label}.json"

    def data_file(self, label: str) -> str:
        return self.uri(self.data_name(label))

    def report_file(self, name: str) -> Path:
        """Local path of a file of the stored report (names: `embedtune.report_store`)."""
        return self.report_dir / name

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

    # ---------------------------------------------------------------- typed state

    def trials(self) -> list[TrialRecord]:
        """`trials.json`: the run's trial records (none yet: an empty list)."""
        return load_trials(self.read_json(TRIALS, []))

    def save_trials(self, records: list[TrialRecord]) -> None:
        self.write_json(TRIALS, dump_trials(records))

    def spec(self) -> SweepSpec | None:
        """`spec.json`: the sweep spec this run dir was made by; None when it holds none. One that
        does not validate (written by another embedtune version, or edited) is an EmbedtuneError
        naming the file and the first problem."""
        raw = self.read_json(SPEC)
        if not raw:
            return None
        try:
            return SweepSpec.model_validate(raw)
        except ValidationError as exc:
            raise EmbedtuneError(validation_error_line(self.uri(SPEC), exc)) from None

    def dataset_specs(self) -> dict[str, DataSpec]:
        """Dataset label -> its DataSpec, from `spec.json` read leniently: an entry that no longer
        validates (another embedtune version) is skipped with a warning, so a served table or a
        search still finds the rest."""
        out: dict[str, DataSpec] = {}
        for raw in (self.read_json(SPEC) or {}).get("datasets") or []:
            try:
                ds = DataSpec.model_validate(raw)
            except ValueError as exc:
                log.warning("stored dataset spec %s in %s is not readable: %s", raw, self.uri(SPEC), exc)
                continue
            out.setdefault(ds.label, ds)
        return out

    def lancedb_uri(self) -> str | None:
        """`final.lancedb_uri` of the stored spec (None: the run dir's own `lancedb/`, or no spec)."""
        final = (self.read_json(SPEC) or {}).get("final")
        return final.get("lancedb_uri") if isinstance(final, dict) else None

    def base_metrics(self) -> dict[tuple[str, str, str], dict[str, float]]:
        """`base_metrics.json`: (model, dataset label, data fingerprint) -> the base model's
        per-epoch evaluator metrics, as the sweep scored them before its trials."""
        return {
            (r["model"], r["dataset"], r["fingerprint"]): dict(r["metrics"])
            for r in self.read_json(BASE_METRICS, []) or []
            if isinstance(r, dict) and {"model", "dataset", "fingerprint", "metrics"} <= r.keys()
        }

    def save_base_metrics(self, metrics: dict[tuple[str, str, str], dict[str, float]]) -> None:
        self.write_json(
            BASE_METRICS,
            [{"model": m, "dataset": d, "fingerprint": f, "metrics": v} for (m, d, f), v in metrics.items()],
        )

    def save_spec(self, spec: SweepSpec) -> None:
        self.write_json(SPEC, spec.model_dump(mode="json"))

    def data(self, label: str) -> PreparedData | None:
        """`data/<label>.json`: the split the run's trials saw; None when it was not stored."""
        raw = self.read_json(self.data_name(label))
        return PreparedData.from_dict(raw) if raw else None

    def save_data(self, data: PreparedData) -> None:
        self.write_json(self.data_name(data.label), data.to_dict())

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

    def update_report(self, files: dict[str, bytes]) -> None:
        """Replace some files of the existing report (name -> content), each atomically (and in the
        remote run dir): for what is known only once the report is built, such as the run's times."""
        for name, data in files.items():
            storage.write_local_atomic(self.report_dir / name, data)
            if self.remote:
                storage.write_bytes(self.uri(REPORT, name), data)

    # The report's stored inputs (their formats: report_store.py)
    def report_meta(self) -> dict[str, Any]:
        """`report/meta.json`: what the report was built with (metric, sweep_metric, probe_size,
        encode_backend, timings, reranker_gates, winners ...); {} when there is none."""
        return store.load_json(self.report_file(store.META_FILE), {})

    def results(self):
        """`report/results.csv` with its per-query values (a pandas DataFrame); one line naming the
        file when the final stage never stored it."""
        return store.load_results(self.report_dir)

    def harm(self) -> HarmCheck:
        """`report/harm.json`: the do-no-harm check (empty when the run had none)."""
        return store.load_harm(self.report_dir)

    def probe_cache(self) -> dict[str, Any]:
        """`report/probe.json`: the "should you fine-tune?" probe's stored scores ({} when none)."""
        return store.load_json(self.report_file(store.PROBE_FILE), {})

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
        Local: an OS file lock (released by the kernel when the holder dies). Remote (S3): a lease
        object taken and refreshed with conditional writes (embedtune/lease.py); one left unchanged
        for LEASE_TTL_S belongs to a dead driver and is taken over; a driver that loses its lease
        stops with one line."""
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
        # Conditional writes on S3 (embedtune/lease.py): two drivers can never both hold it.
        with lease.hold(self.uri(LEASE), self._owner(), ttl=LEASE_TTL_S):
            yield
