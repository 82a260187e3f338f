"""A child MLflow run per trial, written from records ("ops") that can be replayed.

Every write about a trial is an op: `start` (find or create its run, params, the base model's
scores as step 0), `result` (one epoch's metrics), `close` (final metrics, tags, the model, the
status). Applying an op twice does nothing new: a run is found by its trial tag and completed when
found (params and step 0 the outage cut off after its creation), an epoch already logged (as the
server says after any failed write) is not logged again, a close remembers which of its parts are
done, and a model already logged for the run is not logged again. So ops a tracking server did not
take can be kept and replayed later in any number of attempts, by this driver or the next one.
"""

from __future__ import annotations

import logging
from typing import Any

from embedtune import storage
from embedtune.models import model_label
from embedtune.records import ModelData
from embedtune.tracking import client as mlc
from embedtune.tracking.lineage import log_data_inputs

log = logging.getLogger(__name__)


class TrialRuns:
    """Applies trial ops to MLflow (see the module docstring). `hasher(config)` gives a trial's
    config hash; `epoch_metric` is a metric logged every epoch (it tells which epochs a reopened run
    already has)."""

    def __init__(
        self,
        tracking_uri: str,
        experiment_id: str,
        parent_run_id: str,
        base_metrics: dict[ModelData, dict[str, float]],
        epoch_metric: str,
        log_models: bool = True,
        hasher=None,
        lineage: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.base_metrics = base_metrics
        self.epoch_metric = epoch_metric
        self.log_models = log_models
        self.hasher = hasher
        self.lineage = lineage or {}  # dataset label -> its data inputs (tracking.lineage)
        self.run_ids: dict[str, str] = {}
        self.logged_epochs: dict[str, set[int]] = {}
        self.unsure: set[str] = set()  # trials whose last write failed: ask the server what it has

    def config_hash(self, config: dict[str, Any]) -> str | None:
        return self.hasher(config) if self.hasher else config.get("config_hash")

    def member_hashes(self, config: dict[str, Any]) -> list[str | None]:
        """The (config, epochs) hashes a trial records: one per listed epoch count of a branch trial."""
        members = getattr(self.hasher, "members", None)
        return members(config) if members else [self.config_hash(config)]

    def find_existing(self, trial_id: str) -> str | None:
        """The trial's run, if the server has one. A create_run whose reply was lost (committed, then
        the connection dropped) and that was sent again (MLflow's HTTP retries, or a replay) leaves
        two runs with the trial's tag: the oldest is kept and the others are deleted."""
        runs = mlc.child_runs(
            self.tracking_uri,
            self.experiment_id,
            self.parent_run_id,
            f"tags.`{mlc.TRIAL_TAG}` = '{trial_id}'",
        )
        if not runs:
            return None
        return mlc.keep_oldest(mlc.client(self.tracking_uri), runs, f"trial {trial_id}")

    def answers(self) -> bool:
        """Whether the tracking store answers now (a cheap read). A server that is away is an
        MlflowException (MLflow's REST client wraps the connection error) or an OSError (requests'
        errors are); anything else is a bug and raises."""
        from mlflow.exceptions import MlflowException

        try:
            mlc.client(self.tracking_uri).get_experiment(self.experiment_id)
            return True
        except (MlflowException, OSError) as exc:
            log.debug("tracking store %s does not answer: %s", mlc.redact(self.tracking_uri), exc)
            return False

    def _drop_stale(self, digest: str) -> None:
        """Delete this sweep's earlier child runs of config `digest` (a failed or abandoned
        attempt): the new trial's run is the config's one run."""
        c = mlc.client(self.tracking_uri)
        mine = set(self.run_ids.values())
        for run in mlc.child_runs(
            self.tracking_uri, self.experiment_id, self.parent_run_id, f"tags.`{mlc.CONFIG_TAG}` = '{digest}'"
        ):
            if run.info.run_id not in mine:  # a duplicate draw within this Tuner keeps its run
                log.info("deleting stale run %s of config %s", run.info.run_id, digest)
                c.delete_run(run.info.run_id)

    def run_id(self, trial_id: str, config: dict[str, Any]) -> str:
        """The trial's run: known, found by its tag (reopened), or created with params and step 0."""
        if trial_id in self.run_ids:
            return self.run_ids[trial_id]
        c = mlc.client(self.tracking_uri)
        run_id = self.find_existing(trial_id)
        if run_id:
            c.update_run(run_id, status="RUNNING")
        else:
            epochs = str(config.get("branch_epochs") or config.get("epochs")).replace(",", "+")
            name = f"{model_label(str(config.get('model')))}-{config.get('dataset', 'data')}-e{epochs}-{trial_id}"
            tags = {mlc.PARENT_TAG: self.parent_run_id, mlc.TRIAL_TAG: trial_id, mlc.KIND_TAG: "trial"}
            digest = self.config_hash(config)
            if digest:
                self._drop_stale(digest)
                tags[mlc.CONFIG_TAG] = digest
            created = c.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id
            run_id = self.find_existing(trial_id) or created  # the one run, should the create have gone twice
        # A found run may have been created just before an outage cut off its params and step 0:
        # whatever it lacks is written now (params not there yet, step 0 when not logged).
        params = {k: v for k, v in config.items() if not isinstance(v, dict | list)}
        mlc.log_params(self.tracking_uri, run_id, params)
        label = str(config.get("dataset"))
        lineage = getattr(self, "lineage", {})  # a callback pickled by an older embedtune has none
        log_data_inputs(self.tracking_uri, run_id, label, lineage.get(label))
        self.logged_epochs[trial_id] = self._steps(run_id)
        base = self.base_metrics.get(ModelData(str(config.get("model")), str(config.get("dataset"))), {})
        if base and 0 not in self._steps(run_id, next(iter(base))):
            mlc.log_metrics(self.tracking_uri, run_id, base, step=0)
        self.run_ids[trial_id] = run_id
        return run_id

    def _steps(self, run_id: str, key: str | None = None) -> set[int]:
        """The steps the server has of metric `key` (default: the per-epoch metric)."""
        history = mlc.client(self.tracking_uri).get_metric_history(run_id, key or self.epoch_metric)
        return {m.step for m in history}

    def apply(self, op: dict[str, Any]) -> None:
        trial_id = op["trial_id"]
        try:
            run_id = self.run_id(trial_id, op["config"])
            if trial_id in self.unsure:  # a write that failed may have reached the server anyway
                self.logged_epochs[trial_id] = self._steps(run_id)
                self.unsure.discard(trial_id)
            if op["op"] == "result":
                done = self.logged_epochs.setdefault(trial_id, set())
                if op["epoch"] in done:
                    # A trial restored from a checkpoint older than its last report repeats an epoch
                    # (and a replay may repeat a logged op): one point per epoch keeps curves one line.
                    return
                mlc.log_metrics(self.tracking_uri, run_id, op["metrics"], step=op["epoch"])
                done.add(op["epoch"])
            elif op["op"] == "close":
                self._close(run_id, op)
        except Exception:
            self.unsure.add(trial_id)
            raise

    def _close(self, run_id: str, op: dict[str, Any]) -> None:
        done = op.setdefault("done", [])
        if "metrics" not in done:
            mlc.log_metrics(self.tracking_uri, run_id, op["metrics"], step=op["step"])
            done.append("metrics")
        if "tags" not in done:
            mlc.set_tags(self.tracking_uri, run_id, op["tags"])
            done.append("tags")
        if op.get("checkpoint") and "model" not in done:
            self._log_model(run_id, op)
            done.append("model")
        mlc.finish_run(self.tracking_uri, run_id, op["status"])

    def _logged_model_uri(self, run_id: str) -> str | None:
        """The model already logged from this run (a replay after an outage that hit after
        the upload), if any."""
        models = mlc.client(self.tracking_uri).search_logged_models(
            [self.experiment_id], filter_string=f"source_run_id = '{run_id}'"
        )
        ready = [m for m in models if str(getattr(m.status, "name", m.status)) == "READY"]
        return f"models:/{ready[0].model_id}" if ready else None

    def _log_model(self, run_id: str, op: dict[str, Any]) -> None:
        try:
            uri = self._logged_model_uri(run_id)
            if uri:
                mlc.set_tags(self.tracking_uri, run_id, {"embedtune.model_uri": uri})
                return
            with storage.local_copy(op["checkpoint"]) as ckpt:
                model_dir = ckpt / "model"
                if model_dir.exists():
                    info = mlc.log_sentence_transformer(self.tracking_uri, run_id, model_dir)
                    mlc.set_tags(self.tracking_uri, run_id, {"embedtune.model_uri": info.model_uri})
        except Exception as exc:
            if not self.answers():
                raise  # the server went away: keep the op, log the model on replay
            log.warning(
                "could not log the model of trial %s: %s", op["trial_id"], exc
            )  # not a reason to stop
