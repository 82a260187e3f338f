"""The Tune callback that turns a sweep's trials into MLflow child runs.

All MLflow writes happen in the driver, never in the trial processes: SQLite stores do not take
many concurrent writers, and the driver sees what a trial cannot — whether the scheduler stopped it
(KILLED), it crashed (FAILED) or it finished. A tracking server that goes away mid-sweep does not
stop training: an op (see `trial_runs`) MLflow refuses is kept, in order, in memory and in the
journal, the outage is reported once, and the kept ops are replayed as soon as the server answers
again (tried at most every `retry_every_s`). Ops left when the trials end are replayed by
`replay_journal` (the sweep waits a while, and the next run of the same command replays them first).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback

from embedtune.errors import EmbedtuneError
from embedtune.specs.metrics import ERROR_LINE_CHARS, FINAL_ERROR, LOGGED_PREFIXES
from embedtune.tracking.client import exception_line, is_number, redact
from embedtune.tracking.journal import Journal
from embedtune.tracking.trial_runs import TrialRuns

log = logging.getLogger(__name__)


class MlflowTrialCallback(Callback):
    """Tune hooks → trial ops → MLflow (see the module docstring). Trials of configs in `skip`
    (already done in the run dir: the trial returns without training) get no run."""

    def __init__(self, runs: TrialRuns, journal: Journal, skip=(), retry_every_s: float = 10.0) -> None:
        self.runs = runs
        self.journal = journal
        self.skip = set(skip)
        self.retry_every_s = retry_every_s
        self.pending: list[dict[str, Any]] = []
        self.outage_since: float | None = None
        self.last_try = 0.0

    @property
    def run_ids(self) -> dict[str, str]:
        return self.runs.run_ids

    def _skipped(self, trial) -> bool:
        return bool(self.skip) and all(h in self.skip for h in self.runs.member_hashes(trial.config))

    # -- Tune hooks: each builds an op and submits it
    def on_trial_start(self, iteration, trials, trial, **info):
        if not self._skipped(trial):
            self._submit({"op": "start", "trial_id": trial.trial_id, "config": _plain(trial.config)})

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self._skipped(trial) or FINAL_ERROR in result:  # a failed trial's last result: no epoch
            return
        metrics = {k: float(v) for k, v in result.items() if k.startswith(LOGGED_PREFIXES) and is_number(v)}
        self._submit(
            {
                "op": "result",
                "trial_id": trial.trial_id,
                "config": _plain(trial.config),
                "epoch": int(result.get("epoch", 0)),
                "metrics": metrics,
            }
        )

    def on_trial_complete(self, iteration, trials, trial, **info):
        if self._skipped(trial):
            return
        done = int(_last_epoch(trial))
        planned = int(trial.config.get("epochs", done))
        status = "FINISHED" if done >= planned else "KILLED"  # stopped early by the scheduler
        final = (trial.last_result or {}).get(FINAL_ERROR)
        self._submit(self._close_op(trial, "FAILED" if final else status, done, reason=final))

    def on_trial_error(self, iteration, trials, trial, **info):
        done = int((trial.last_result or {}).get("epoch", 0))
        self._submit(self._close_op(trial, "FAILED", done, getattr(trial, "error_file", None)))

    def _close_op(
        self, trial, status: str, done: int, error_file: str | None = None, reason: str | None = None
    ) -> dict[str, Any]:
        duration = (trial.last_result or {}).get("time_total_s")
        metrics: dict[str, float] = {"epochs_done": done}
        if duration is not None:
            metrics["trial_duration_s"] = float(duration)
        tags = {"embedtune.status": status}
        if error_file:
            tags["embedtune.error_file"] = str(error_file)
            reason = reason or _error_line(error_file)
        if reason:
            tags["embedtune.error"] = redact(reason)[:ERROR_LINE_CHARS]
        checkpoint = None
        if status != "FAILED" and self.runs.log_models and trial.checkpoint is not None:
            checkpoint = checkpoint_uri(trial.checkpoint)
        return {
            "op": "close",
            "trial_id": trial.trial_id,
            "config": _plain(trial.config),
            "status": status,
            "step": done,
            "metrics": metrics,
            "tags": tags,
            "checkpoint": checkpoint,
            "done": [],
        }

    # -- keeping and replaying
    def _submit(self, op: dict[str, Any]) -> None:
        if self.pending and not self.flush():
            self.pending.append(op)
            self.journal.save(self.pending)
            return
        try:
            self.runs.apply(op)
        except Exception as exc:
            self.pending.append(op)
            self.journal.save(self.pending)
            self._report_outage(exc)

    def flush(self, force: bool = False) -> bool:
        """Replay the kept ops in order; True when none is left. During an outage, tried at most
        every `retry_every_s` unless `force`."""
        if not self.pending:
            return True
        if not force and time.time() - self.last_try < self.retry_every_s:
            return False
        self.last_try = time.time()
        n = 0
        while self.pending:
            try:
                self.runs.apply(self.pending[0])
            except Exception:
                self.journal.save(self.pending)  # a close op may have done some of its parts
                return False
            self.pending.pop(0)
            n += 1
        self.journal.save(self.pending)
        if self.outage_since is not None:
            log.info(
                "MLflow at %s answers again after %.0f s: replayed %d kept record(s)",
                redact(self.runs.tracking_uri),
                time.time() - self.outage_since,
                n,
            )
            self.outage_since = None
        return True

    def _report_outage(self, exc: Exception) -> None:
        self.last_try = time.time()
        if self.outage_since is not None:
            return
        self.outage_since = time.time()
        reason = redact(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)[:200]
        where = f" (kept in {self.journal.location})" if self.journal.location else ""
        log.warning(
            "MLflow at %s failed (%s); training goes on, its records are kept%s and replayed when it answers",
            redact(self.runs.tracking_uri),
            reason,
            where,
        )


def replay_journal(callback: MlflowTrialCallback, wait_s: float = 0.0) -> int:
    """Replay the ops kept in the callback's journal (written by this sweep's callbacks during an
    MLflow outage), waiting up to `wait_s` for the store to answer. Returns how many were
    replayed; raises EmbedtuneError naming the journal when some could not be."""
    callback.pending = callback.journal.load()
    total = len(callback.pending)
    if not total:
        return 0
    deadline = time.time() + wait_s
    if not callback.flush(force=True) and wait_s > 0:
        log.info(
            "waiting up to %.0f s for MLflow at %s (%d record(s) kept)",
            wait_s,
            redact(callback.runs.tracking_uri),
            len(callback.pending),
        )
        while time.time() < deadline:
            time.sleep(min(5.0, max(0.1, deadline - time.time())))
            if callback.flush(force=True):
                break
    if callback.pending:
        raise EmbedtuneError(
            f"MLflow at {redact(callback.runs.tracking_uri)} does not answer: {len(callback.pending)} record(s) "
            f"of finished trials are kept in {callback.journal.location}; when it is back, run the same command "
            "again: it replays them (finished trials are not rerun)"
        )
    return total


def _last_epoch(trial) -> int:
    """The last epoch a trial reported (a failed trial's last result has none: its epochs count)."""
    last = trial.last_result or {}
    if FINAL_ERROR in last:
        return int((trial.metric_analysis or {}).get("epoch", {}).get("max", 0) or 0)
    return int(last.get("epoch", 0))


def _plain(config: dict[str, Any]) -> dict[str, Any]:
    """A trial config as JSON-safe values (it goes into the journal)."""
    return json.loads(json.dumps(dict(config), default=str))


def checkpoint_uri(checkpoint) -> str:
    """A path (local storage) or URI (remote storage) of a Tune checkpoint."""
    fs = getattr(checkpoint, "filesystem", None)
    kind = getattr(fs, "type_name", "local") if fs is not None else "local"
    return checkpoint.path if kind == "local" or "://" in checkpoint.path else f"{kind}://{checkpoint.path}"


def _error_line(error_file: str) -> str | None:
    """The exception line of a trial's error file (Tune writes the traceback), if readable."""
    try:
        return exception_line(Path(error_file).read_text(errors="replace"))
    except OSError:
        return None
