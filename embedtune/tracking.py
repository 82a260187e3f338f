"""MLflow tracking: one experiment per sweep, a parent run, one child run per trial.

All writes happen in the driver (a Tune callback), never in the trial processes: SQLite stores do
not take many concurrent writers, and the driver sees what a trial cannot — whether the scheduler
stopped it (KILLED), it crashed (FAILED) or it finished. A resumed sweep finds the child run of a
trial by its `embedtune.trial_id` tag and reopens it, so there is exactly one run per trial. Child
runs also carry their config's hash (`embedtune.config_hash`); a new trial of a config that already
has a (failed or abandoned) run under the sweep deletes that run, so there is one run per config.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ray.tune import Callback

from embedtune.models import model_label

log = logging.getLogger(__name__)

TRIAL_TAG = "embedtune.trial_id"
CONFIG_TAG = "embedtune.config_hash"
PARENT_TAG = "mlflow.parentRunId"
LOGGED_PREFIXES = ("ir_", "triplet_", "train_loss", "train_samples_per_s", "system/")

# Credentials that can ride in a URI: `scheme://user:password@host` and secret query parameters
# (`?token=`, `&X-Amz-Signature=`, ...). Never logged as MLflow params, never printed.
_URI_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s\"']+):[^@/\s\"']+@")
_URI_SECRET_PARAM = re.compile(
    r"(?i)(?P<head>[?&][\w.-]*(?:token|password|passwd|secret|signature|credential|api[_-]?key|access[_-]?key)"
    r"[\w.-]*=)[^&\s\"']+"
)


def redact(text: str) -> str:
    """`text` with URI passwords and secret query parameters replaced by `***`."""
    text = _URI_PASSWORD.sub(lambda m: f"{m['head']}:***@", str(text))
    return _URI_SECRET_PARAM.sub(lambda m: f"{m['head']}***", text)


def default_tracking_uri(run_dir: Path) -> str:
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


def _no_links_with_secrets(tracking_uri: str) -> None:
    """MLflow prints "View run ... at: <tracking URI>" when a run ends on a tracking server, the
    URI's password included; with a password in the URI those links are off (the CLI prints the
    redacted location instead)."""
    if redact(tracking_uri) != tracking_uri:
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"


def client(tracking_uri: str):
    from mlflow import MlflowClient

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # MLflow's REST client retries a failing request for minutes (7 retries, backoff factor 2),
    # stalling Tune's event loop; the trial callback keeps what fails and retries on its own, so
    # a short budget (unless the user set one).
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    _no_links_with_secrets(tracking_uri)
    return MlflowClient(tracking_uri=tracking_uri)


def check_reachable(tracking_uri: str | None, timeout_s: float = 5.0) -> None:
    """Fail in seconds, before any training, when an http(s) tracking server does not answer (MLflow's
    own client retries for minutes) or refuses our credentials. Other stores are checked by use."""
    if not tracking_uri or not tracking_uri.startswith(("http://", "https://")):
        return
    import requests

    from embedtune.errors import EmbedtuneError

    shown = redact(tracking_uri)
    try:
        answer = requests.get(tracking_uri.rstrip("/") + "/health", timeout=timeout_s)
    except requests.RequestException as exc:
        reason = type(exc).__name__
        raise EmbedtuneError(
            f"MLflow tracking server {shown} is unreachable ({reason}); start it (e.g. `mlflow server "
            "--host 127.0.0.1`) or fix mlflow.tracking_uri / $MLFLOW_TRACKING_URI"
        ) from None
    if answer.status_code in (401, 403):
        raise EmbedtuneError(
            f"MLflow tracking server {shown} refused the credentials (HTTP {answer.status_code}); set "
            "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN"
        )


def ensure_experiment(tracking_uri: str, name: str, artifact_root: Path | None) -> str:
    c = client(tracking_uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    location = (
        artifact_root.resolve().as_uri() if artifact_root and tracking_uri.startswith("sqlite") else None
    )
    return c.create_experiment(name, artifact_location=location)


def start_parent_run(tracking_uri: str, experiment_id: str, run_id: str | None, name: str) -> str:
    """Create the sweep's parent run, or reopen `run_id` when resuming."""
    c = client(tracking_uri)
    if run_id:
        c.update_run(run_id, status="RUNNING")
        return run_id
    run = c.create_run(experiment_id, run_name=name, tags={"embedtune.kind": "sweep"})
    return run.info.run_id


def log_params(tracking_uri: str, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    c = client(tracking_uri)
    existing = c.get_run(run_id).data.params
    items = [Param(k, redact(str(v))[:6000]) for k, v in params.items() if k not in existing]
    for i in range(0, len(items), 100):
        c.log_batch(run_id, params=items[i : i + 100])


def log_metrics(tracking_uri: str, run_id: str, metrics: dict[str, float], step: int) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, int | float)]
    if items:
        client(tracking_uri).log_batch(run_id, metrics=items)


@contextlib.contextmanager
def fluent_uri(tracking_uri: str, registry: bool = False) -> Iterator[None]:
    """Point MLflow's fluent API (`log_model`, `register_model`) at `tracking_uri` for one block.
    `mlflow.set_tracking_uri` also exports MLFLOW_TRACKING_URI (and the registry call
    MLFLOW_REGISTRY_URI) into this process's environment, where every later sweep and every child
    process would pick it up; so the previous values are restored afterwards."""
    import mlflow

    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    _no_links_with_secrets(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    if registry:
        mlflow.set_registry_uri(tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved["MLFLOW_TRACKING_URI"])
        if registry:
            mlflow.set_registry_uri(saved["MLFLOW_REGISTRY_URI"])
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def log_sentence_transformer(tracking_uri: str, run_id: str, model_dir: Path, name: str = "model") -> str:
    """Log a model directory as an MLflow sentence_transformers model; returns its model URI."""
    import mlflow
    import sentence_transformers
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir), device="cpu")
    # Explicit requirements: inferring them starts a subprocess that reloads the model.
    reqs = [
        f"sentence-transformers=={sentence_transformers.__version__}",
        f"torch=={torch.__version__.split('+')[0]}",
    ]
    client(tracking_uri).update_run(run_id, status="RUNNING")
    with fluent_uri(tracking_uri), mlflow.start_run(run_id=run_id):
        info = mlflow.sentence_transformers.log_model(model, name=name, pip_requirements=reqs)
    return info.model_uri


def finish_run(tracking_uri: str, run_id: str, status: str) -> None:
    client(tracking_uri).set_terminated(run_id, status=status)


def close_open_children(
    tracking_uri: str, experiment_id: str, parent_run_id: str, status: str = "KILLED"
) -> int:
    """Mark child runs still RUNNING (the driver died or was interrupted) as `status`."""
    c = client(tracking_uri)
    runs = c.search_runs(
        [experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}' and attributes.status = 'RUNNING'",
    )
    for run in runs:
        c.set_terminated(run.info.run_id, status=status)
    return len(runs)


class MlflowTrialCallback(Callback):
    """Tune callback: a child MLflow run per trial with params, per-epoch metrics, model and status.

    A tracking server that goes away mid-sweep does not stop training: every write is an op
    (start, epoch result, close); an op MLflow refuses is kept, in order, in memory and in the
    journal file (`journal`, rewritten on each change), the outage is reported once, and the
    kept ops are replayed as soon as the server answers again (tried at most every
    `retry_every_s`). Ops left when the trials end are replayed by `replay_journal` (the sweep
    waits a while, and the next run of the same command replays them first), so no record is
    silently lost. Ops are idempotent on replay: a run is found by its trial tag, an epoch
    already logged is not logged twice, and a close remembers which of its parts are done."""

    def __init__(
        self,
        tracking_uri: str,
        experiment_id: str,
        parent_run_id: str,
        base_metrics: dict[tuple[str, str], dict[str, float]],
        log_models: bool = True,
        hasher=None,
        skip=(),
        journal: Path | None = None,
        retry_every_s: float = 10.0,
    ) -> None:
        """`hasher(config)` gives a trial's config hash; trials of configs in `skip` (already done:
        the trial returns without training) get no run."""
        self.hasher = hasher
        self.skip = set(skip)
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.base_metrics = base_metrics
        self.log_models = log_models
        self.journal = Path(journal) if journal else None
        self.retry_every_s = retry_every_s
        self.run_ids: dict[str, str] = {}
        self.logged_epochs: dict[str, set[int]] = {}
        self.pending: list[dict[str, Any]] = []
        self.outage_since: float | None = None
        self.last_try = 0.0

    # -- helpers
    def _hash(self, config: dict[str, Any]) -> str | None:
        hasher = getattr(self, "hasher", None)  # callbacks pickled by older versions lack it
        return hasher(config) if hasher else config.get("config_hash")

    def _skipped(self, trial) -> bool:
        return bool(getattr(self, "skip", None)) and self._hash(trial.config) in self.skip

    def _drop_stale(self, digest: str) -> None:
        """Delete this sweep's earlier child runs of config `digest` (a failed or abandoned
        attempt): the new trial's run is the config's one run."""
        c = client(self.tracking_uri)
        runs = c.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{CONFIG_TAG}` = '{digest}' and tags.`{PARENT_TAG}` = '{self.parent_run_id}'",
        )
        mine = set(self.run_ids.values())
        for run in runs:
            if run.info.run_id in mine:
                continue  # a duplicate draw within this Tuner (sampled modes) keeps its run
            log.info("deleting stale run %s of config %s", run.info.run_id, digest)
            c.delete_run(run.info.run_id)

    def find_existing(self, trial_id: str) -> str | None:
        runs = client(self.tracking_uri).search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{TRIAL_TAG}` = '{trial_id}' and tags.`{PARENT_TAG}` = '{self.parent_run_id}'",
        )
        return runs[0].info.run_id if runs else None

    def run_id_for(self, trial) -> str:
        return self._run_id(trial.trial_id, trial.config)

    def _run_id(self, trial_id: str, cfg: dict[str, Any]) -> str:
        if trial_id in self.run_ids:
            return self.run_ids[trial_id]
        c = client(self.tracking_uri)
        run_id = self.find_existing(trial_id)
        if run_id:
            c.update_run(run_id, status="RUNNING")
            history = c.get_metric_history(run_id, "ir_recall_at_10")
            self.logged_epochs[trial_id] = {m.step for m in history}
        else:
            name = f"{model_label(str(cfg.get('model')))}-{cfg.get('dataset', 'data')}-e{cfg.get('epochs')}-{trial_id}"
            tags = {PARENT_TAG: self.parent_run_id, TRIAL_TAG: trial_id, "embedtune.kind": "trial"}
            digest = self._hash(cfg)
            if digest:
                self._drop_stale(digest)
                tags[CONFIG_TAG] = digest
            run_id = c.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id
            params = {k: v for k, v in cfg.items() if not isinstance(v, dict | list)}
            log_params(self.tracking_uri, run_id, params)
            base = self.base_metrics.get((cfg.get("model"), cfg.get("dataset")), {})
            log_metrics(self.tracking_uri, run_id, base, step=0)
        self.run_ids[trial_id] = run_id
        return run_id

    # -- Tune hooks: each builds an op and submits it
    def on_trial_start(self, iteration, trials, trial, **info):
        if self._skipped(trial):
            return
        self._submit({"op": "start", "trial_id": trial.trial_id, "config": _plain(trial.config)})

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self._skipped(trial):
            return
        metrics = {k: float(v) for k, v in result.items() if k.startswith(LOGGED_PREFIXES) and _number(v)}
        op = {"op": "result", "trial_id": trial.trial_id, "config": _plain(trial.config),
              "epoch": int(result.get("epoch", 0)), "metrics": metrics}  # fmt: skip
        self._submit(op)

    def on_trial_complete(self, iteration, trials, trial, **info):
        if self._skipped(trial):
            return
        last = trial.last_result or {}
        done = int(last.get("epoch", 0))
        planned = int(trial.config.get("epochs", done))
        status = "FINISHED" if done >= planned else "KILLED"  # stopped early by the scheduler
        self._submit(self._close_op(trial, status, done))

    def on_trial_error(self, iteration, trials, trial, **info):
        done = int((trial.last_result or {}).get("epoch", 0))
        self._submit(self._close_op(trial, "FAILED", done, getattr(trial, "error_file", None)))

    def _close_op(self, trial, status: str, done: int, error_file: str | None = None) -> dict[str, Any]:
        duration = (trial.last_result or {}).get("time_total_s")
        metrics: dict[str, float] = {"epochs_done": done}
        if duration is not None:
            metrics["trial_duration_s"] = float(duration)
        tags = {"embedtune.status": status}
        if error_file:
            tags["embedtune.error_file"] = str(error_file)
            reason = _error_line(error_file)
            if reason:
                tags["embedtune.error"] = redact(reason)[:500]
        checkpoint = None
        if status != "FAILED" and self.log_models and trial.checkpoint is not None:
            checkpoint = _checkpoint_uri(trial.checkpoint)
        return {"op": "close", "trial_id": trial.trial_id, "config": _plain(trial.config), "status": status,
                "step": done, "metrics": metrics, "tags": tags, "checkpoint": checkpoint, "done": []}  # fmt: skip

    # -- ops
    def _apply(self, op: dict[str, Any]) -> None:
        run_id = self._run_id(op["trial_id"], op["config"])
        if op["op"] == "result":
            done = self.logged_epochs.setdefault(op["trial_id"], set())
            if op["epoch"] in done:
                # A trial restored from a checkpoint older than its last report repeats an epoch
                # (and a replay may repeat a logged op): one point per epoch keeps curves one line.
                return
            log_metrics(self.tracking_uri, run_id, op["metrics"], step=op["epoch"])
            done.add(op["epoch"])
        elif op["op"] == "close":
            self._apply_close(run_id, op)

    def _apply_close(self, run_id: str, op: dict[str, Any]) -> None:
        c = client(self.tracking_uri)
        done = op.setdefault("done", [])
        if "metrics" not in done:
            log_metrics(self.tracking_uri, run_id, op["metrics"], step=op["step"])
            done.append("metrics")
        if "tags" not in done:
            for key, value in op["tags"].items():
                c.set_tag(run_id, key, value)
            done.append("tags")
        if op.get("checkpoint") and "model" not in done:
            from ray.tune import Checkpoint

            try:
                with Checkpoint(op["checkpoint"]).as_directory() as ckpt:
                    model_dir = Path(ckpt) / "model"
                    if model_dir.exists():
                        uri = log_sentence_transformer(self.tracking_uri, run_id, model_dir)
                        c.set_tag(run_id, "embedtune.model_uri", uri)
            except Exception as exc:
                if not self._answers():
                    raise  # the server went away: keep the op, log the model on replay
                log.warning(
                    "could not log the model of trial %s: %s", op["trial_id"], exc
                )  # not a reason to stop
            done.append("model")
        c.set_terminated(run_id, status=op["status"])

    def _answers(self) -> bool:
        """Whether the tracking store answers now (a cheap read)."""
        try:
            client(self.tracking_uri).get_experiment(self.experiment_id)
            return True
        except Exception:
            return False

    def _submit(self, op: dict[str, Any]) -> None:
        if self.pending and not self.flush():
            self.pending.append(op)
            self._save()
            return
        try:
            self._apply(op)
        except Exception as exc:
            self.pending.append(op)
            self._save()
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
                self._apply(self.pending[0])
            except Exception:
                self._save()  # a close op may have done some of its parts
                return False
            self.pending.pop(0)
            n += 1
        self._save()
        if self.outage_since is not None:
            print(
                f"[embedtune] MLflow at {redact(self.tracking_uri)} answers again after "
                f"{time.time() - self.outage_since:.0f} s: replayed {n} kept record(s)",
                flush=True,
            )
            self.outage_since = None
        return True

    def _report_outage(self, exc: Exception) -> None:
        self.last_try = time.time()
        if self.outage_since is not None:
            return
        self.outage_since = time.time()
        reason = redact(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)[:200]
        where = f" (kept in {self.journal})" if self.journal else ""
        print(
            f"[embedtune] WARNING: MLflow at {redact(self.tracking_uri)} failed ({reason}); training goes "
            f"on, its records are kept{where} and replayed when it answers",
            flush=True,
        )

    def _save(self) -> None:
        if self.journal is None:
            return
        if self.pending:
            write_json(self.journal, self.pending)
        else:
            self.journal.unlink(missing_ok=True)


def replay_journal(callback: MlflowTrialCallback, wait_s: float = 0.0) -> int:
    """Replay the ops kept in `callback.journal` (written by this sweep's callbacks during an
    MLflow outage), waiting up to `wait_s` for the store to answer. Returns how many were
    replayed; raises EmbedtuneError naming the journal when some could not be."""
    from embedtune.errors import EmbedtuneError

    journal = callback.journal
    if journal is None or not journal.exists():
        return 0
    callback.pending = json.loads(journal.read_text())
    total = len(callback.pending)
    deadline = time.time() + wait_s
    if not callback.flush(force=True) and wait_s > 0:
        print(
            f"[embedtune] waiting up to {wait_s:.0f} s for MLflow at {redact(callback.tracking_uri)} "
            f"({len(callback.pending)} record(s) kept)",
            flush=True,
        )
        while time.time() < deadline:
            time.sleep(min(5.0, max(0.1, deadline - time.time())))
            if callback.flush(force=True):
                break
    if callback.pending:
        raise EmbedtuneError(
            f"MLflow at {redact(callback.tracking_uri)} does not answer: {len(callback.pending)} record(s) "
            f"of finished trials are kept in {journal}; when it is back, run the same command again: "
            "it replays them (finished trials are not rerun)"
        )
    return total


def _plain(config: dict[str, Any]) -> dict[str, Any]:
    """A trial config as JSON-safe values (it goes into the journal)."""
    return json.loads(json.dumps(dict(config), default=str))


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _checkpoint_uri(checkpoint) -> str:
    """A path (local storage) or URI (remote storage) that `Checkpoint(...)` opens again."""
    fs = getattr(checkpoint, "filesystem", None)
    kind = getattr(fs, "type_name", "local") if fs is not None else "local"
    return checkpoint.path if kind == "local" or "://" in checkpoint.path else f"{kind}://{checkpoint.path}"


def _error_line(error_file: str) -> str | None:
    """The exception line of a trial's error file (Tune writes the traceback), if readable."""
    try:
        return exception_line(Path(error_file).read_text(errors="replace"))
    except OSError:
        return None


def exception_line(traceback_text: str) -> str | None:
    """The line of a traceback (or Ray's wrapped error text) that says what was raised."""
    lines = [ln.strip() for ln in traceback_text.splitlines() if ln.strip()]
    found = [ln for ln in lines if "Error:" in ln or "Exception:" in ln]
    return (found or lines or [None])[-1]


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)
