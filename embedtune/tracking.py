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
    """Tune callback: a child MLflow run per trial with params, per-epoch metrics, model and status."""

    def __init__(
        self,
        tracking_uri: str,
        experiment_id: str,
        parent_run_id: str,
        base_metrics: dict[tuple[str, str], dict[str, float]],
        log_models: bool = True,
        hasher=None,
        skip=(),
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
        self.run_ids: dict[str, str] = {}
        self.started: dict[str, float] = {}
        self.logged_epochs: dict[str, set[int]] = {}

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
        if trial.trial_id in self.run_ids:
            return self.run_ids[trial.trial_id]
        c = client(self.tracking_uri)
        run_id = self.find_existing(trial.trial_id)
        if run_id:
            c.update_run(run_id, status="RUNNING")
            history = c.get_metric_history(run_id, "ir_recall_at_10")
            self.logged_epochs[trial.trial_id] = {m.step for m in history}
        else:
            cfg = trial.config
            name = f"{model_label(str(cfg.get('model')))}-{cfg.get('dataset', 'data')}-e{cfg.get('epochs')}-{trial.trial_id}"
            tags = {PARENT_TAG: self.parent_run_id, TRIAL_TAG: trial.trial_id, "embedtune.kind": "trial"}
            digest = self._hash(cfg)
            if digest:
                self._drop_stale(digest)
                tags[CONFIG_TAG] = digest
            run_id = c.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id
            params = {k: v for k, v in cfg.items() if not isinstance(v, dict | list)}
            log_params(self.tracking_uri, run_id, params)
            base = self.base_metrics.get((cfg.get("model"), cfg.get("dataset")), {})
            log_metrics(self.tracking_uri, run_id, base, step=0)
        self.run_ids[trial.trial_id] = run_id
        return run_id

    # -- Tune hooks
    def on_trial_start(self, iteration, trials, trial, **info):
        if self._skipped(trial):
            return
        self.started.setdefault(trial.trial_id, time.time())
        self.run_id_for(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self._skipped(trial):
            return
        run_id = self.run_id_for(trial)
        epoch = int(result.get("epoch", 0))
        done = self.logged_epochs.setdefault(trial.trial_id, set())
        if epoch in done:
            # A trial restored from a checkpoint older than its last report repeats an epoch;
            # keep one point per epoch so the run's curves stay one line.
            return
        done.add(epoch)
        metrics = {k: v for k, v in result.items() if k.startswith(LOGGED_PREFIXES)}
        log_metrics(self.tracking_uri, run_id, metrics, step=epoch)

    def on_trial_complete(self, iteration, trials, trial, **info):
        if self._skipped(trial):
            return
        last = trial.last_result or {}
        done = int(last.get("epoch", 0))
        planned = int(trial.config.get("epochs", done))
        status = "FINISHED" if done >= planned else "KILLED"  # stopped early by the scheduler
        self._close(trial, status, {"epochs_done": done})

    def on_trial_error(self, iteration, trials, trial, **info):
        error = getattr(trial, "error_file", None)
        self._close(trial, "FAILED", {"epochs_done": int((trial.last_result or {}).get("epoch", 0))}, error)

    def _close(self, trial, status: str, extra: dict[str, float], error_file: str | None = None) -> None:
        run_id = self.run_id_for(trial)
        c = client(self.tracking_uri)
        duration = (trial.last_result or {}).get("time_total_s")
        metrics = dict(extra)
        if duration is not None:
            metrics["trial_duration_s"] = float(duration)
        log_metrics(self.tracking_uri, run_id, metrics, step=int(extra.get("epochs_done", 0)))
        c.set_tag(run_id, "embedtune.status", status)
        if error_file:
            c.set_tag(run_id, "embedtune.error_file", str(error_file))
            reason = _error_line(error_file)
            if reason:
                c.set_tag(run_id, "embedtune.error", redact(reason)[:500])
        if status != "FAILED" and self.log_models and trial.checkpoint is not None:
            try:
                with trial.checkpoint.as_directory() as ckpt:
                    model_dir = Path(ckpt) / "model"
                    if model_dir.exists():
                        uri = log_sentence_transformer(self.tracking_uri, run_id, model_dir)
                        c.set_tag(run_id, "embedtune.model_uri", uri)
            except Exception as exc:  # a logging failure must not end the sweep
                log.warning("could not log the model of trial %s: %s", trial.trial_id, exc)
        c.set_terminated(run_id, status=status)


def _error_line(error_file: str) -> str | None:
    """The exception line of a trial's error file (Tune writes the traceback), if readable."""
    try:
        lines = [ln.strip() for ln in Path(error_file).read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return None
    found = [ln for ln in lines if "Error:" in ln or "Exception:" in ln]
    return (found or lines or [None])[-1]


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)
