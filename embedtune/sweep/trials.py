"""Step 4 of a sweep (`driver.run_sweep`): the run dir's Tune experiments. An interrupted one
resumes first (finished trials are not rerun, unfinished ones continue from their last checkpoint,
into the same MLflow runs); then the configs that have no done trial yet run as a new experiment
(`tune`, `tune-2`, ...). See `driver` for how a trial's identity makes this idempotent."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from embedtune import storage
from embedtune.records import TrialRecord
from embedtune.rundir import RunDir
from embedtune.specs import Resources, SweepSpec
from embedtune.sweep import preflight as pf
from embedtune.sweep.budget import Left
from embedtune.sweep.budget import left as budget_left
from embedtune.sweep.identity import ConfigHasher, is_done, trial_configs
from embedtune.sweep.inputs import Inputs
from embedtune.sweep.parent_run import Tracking
from embedtune.sweep.results import collect_trials, done_configs, done_runs, merge_records, tune_score
from embedtune.sweep.second_seed import twin_configs, twin_resources
from embedtune.sweep.trainable import TrialPayload, run_trial
from embedtune.sweep.tuner import build_tuner
from embedtune.tracking import client as mlc
from embedtune.tracking.callback import replay_journal
from embedtune.tracking.trial_runs import TrialRuns

log = logging.getLogger(__name__)


def _todo(
    spec: SweepSpec,
    hasher: ConfigHasher,
    records: list[TrialRecord],
    attempted: list[TrialRecord],
    trial_seconds: float = 0.0,
) -> tuple[list[dict[str, Any]] | None, int, Left | None]:
    """What is left to run: (grid trial configs with a (config, epochs) neither done nor attempted in
    this call, their count, None), or for sampled modes (None, draws left: num_samples minus the run
    dir's done/attempted Tune trials, None), or in auto mode (None, draws left, the budget left)."""
    if spec.search.mode == "grid":
        skip = done_configs(records) | {r.config_hash for r in attempted}
        todo = [c for c in trial_configs(spec, hasher) if not is_done(c, hasher, skip)]
        return todo, len(todo), None
    runs = done_runs(records) | {r.run_trial_id for r in attempted}
    if spec.search.mode == "auto":
        budget = budget_left(spec, merge_records(records, attempted), len(runs), trial_seconds)
        return None, budget.draws, budget
    return None, max(0, spec.search.draws - len(runs)), None


def _fit(tuner, tune_path: str, spec: SweepSpec, inputs: Inputs, callback, skip) -> list[TrialRecord]:
    """Run a Tuner to its end; the records of its trials. Tune catches SIGINT itself, saves its
    state one last time and returns early (stopping the running trials in memory): unfinished
    trials in the saved state mean an interruption, raised as KeyboardInterrupt."""
    from ray import tune

    grid = tuner.fit()
    saved = tune.ExperimentAnalysis(tune_path).trials
    if any(t.status not in ("TERMINATED", "ERROR") for t in saved):
        raise KeyboardInterrupt
    return collect_trials(grid, spec, inputs.base, callback.run_ids, inputs.hasher, skip)


class TrialsStep:
    """Step 4: the run dir's Tune experiments, resumed and extended (see the module docstring)."""

    def __init__(
        self,
        spec: SweepSpec,
        rundir: RunDir,
        state: pf.SweepState,
        inputs: Inputs,
        tracking: Tracking,
        records: list[TrialRecord],
    ) -> None:
        self.spec, self.rundir, self.state = spec, rundir, state
        self.inputs, self.tracking, self.records = inputs, tracking, records
        storage_root = rundir.tune_storage(spec.storage_path, spec.name)
        self.storage = storage_root if storage.is_remote(storage_root) else str(Path(storage_root).resolve())
        self.launched = 0
        datasets = inputs.datasets
        self.payload = TrialPayload(
            metric=spec.scheduler.metric,
            tune_metric=spec.scheduler.tune_metric,
            base_scores={
                k: v[spec.scheduler.metric] for k, v in inputs.base.items() if spec.scheduler.metric in v
            },
            datasets=datasets,
            triplets={k: v.in_memory() for k, v in inputs.triplets.items()},
            train=spec.train,
            resources=spec.resources,
            hasher=inputs.hasher,
            mode=spec.scheduler.mode,
            storage=self.storage,
        )

    def path(self, name: str) -> str:
        return storage.join(self.storage, name)

    def trainable(self, skip: set[str], resources: Resources | None = None):
        from dataclasses import replace

        from ray import tune

        resources = resources or self.spec.resources
        scores = {r.config_hash: tune_score(r, self.spec) for r in self.records}
        payload = replace(self.payload, skip={h: scores.get(h, 0.0) for h in skip}, resources=resources)
        return tune.with_resources(
            tune.with_parameters(run_trial, payload=payload), {"cpu": resources.cpu, "gpu": resources.gpu}
        )

    def save(self, new: list[TrialRecord]) -> None:
        self.records = merge_records(self.records, new)
        self.rundir.save_trials(self.records)

    def resume(self, restore_path: str) -> list[TrialRecord]:
        """Finish the interrupted experiment at `restore_path`; the records of what it attempted."""
        from ray import tune

        log.info("resuming sweep from %s", restore_path)
        # Sampled modes may draw a config already done in another experiment: skip it.
        skip = done_configs(self.records) if self.spec.search.mode != "grid" else set()
        callback = self.tracking.callback(skip)
        tuner = tune.Tuner.restore(
            restore_path, trainable=self.trainable(skip), resume_unfinished=True, resume_errored=True
        )
        with self.timed():
            new = _fit(tuner, restore_path, self.spec, self.inputs, callback, skip)
        known = {r.run_trial_id for r in self.records if r.done}
        self.launched += len({r.run_trial_id for r in new} - known)
        self.save(new)
        return new

    @contextmanager
    def timed(self):
        """Count a trial phase's wall time in the run dir's state (an auto sweep's time budget)."""
        started = time.time()
        try:
            yield
        finally:
            self.state.trial_seconds += time.time() - started
            self.state.save(self.rundir)

    def run_new(
        self,
        todo: list[dict[str, Any]] | None,
        n_todo: int,
        attempted: list[TrialRecord],
        budget: Left | None = None,
        scheduled: bool = True,
        resources: Resources | None = None,
    ) -> None:
        """Run what is left as a new Tune experiment (`budget`: what an auto sweep may spend;
        `scheduled` False: no early stopping, every trial runs to its end; `resources`: each trial's,
        instead of the spec's)."""
        name = self.state.next_experiment()
        self.state.save(self.rundir)
        skip = done_configs(self.records) | {r.config_hash for r in attempted} if todo is None else set()
        callback = self.tracking.callback(skip)
        if budget is None:
            log.info("running %d trial(s) as Tune experiment %s", n_todo, name)
        else:
            log.info("searching (auto) as Tune experiment %s until %s are spent", name, budget.text)
        tuner = build_tuner(
            self.spec,
            self.trainable(skip, resources),
            self.storage,
            callback,
            name,
            todo,
            n_todo,
            budget,
            scheduled,
        )
        with self.timed():
            new = _fit(tuner, self.path(name), self.spec, self.inputs, callback, skip)
        self.launched += len({r.run_trial_id for r in new})
        self.save(new)

    def run(self, ray_address: str | None) -> bool:
        """Resume and extend the run dir's Tune experiments; False when there was nothing to run."""
        from ray import tune

        from embedtune import ray_env

        state, spec = self.state, self.spec
        restore_path = (
            self.path(state.experiments[-1]) if state.experiments and not state.trials_done else None
        )
        if restore_path and not tune.Tuner.can_restore(restore_path):
            restore_path = None
        todo, n_todo, budget = _todo(spec, self.inputs.hasher, self.records, [], state.trial_seconds)
        if self.records and not restore_path:
            log.info(
                "%d config(s) already done in %s; %d to run",
                len(done_configs(self.records)),
                self.rundir,
                n_todo,
            )
        twins = twin_configs(spec, self.records, self.inputs.hasher)  # left by an earlier run
        if not (restore_path or n_todo or twins):
            return False
        state.trials_done = False
        state.save(self.rundir)
        # Disconnects from a joined cluster, or stops the private local Ray and removes its files.
        with ray_env.session(
            address=ray_address or spec.ray.address, num_cpus=spec.ray.num_cpus, num_gpus=spec.ray.num_gpus
        ):
            try:
                attempted: list[TrialRecord] = []
                if restore_path:
                    attempted = self.resume(restore_path)
                    todo, n_todo, budget = _todo(
                        spec, self.inputs.hasher, self.records, attempted, state.trial_seconds
                    )
                if n_todo:
                    self.run_new(todo, n_todo, attempted, budget)
                self.run_second_seed()
            except KeyboardInterrupt:
                self._close_interrupted()
                raise KeyboardInterrupt from None
        state.trials_done = True
        state.save(self.rundir)
        # The trials are done; what MLflow did not take during an outage goes in now (or the
        # command fails naming the journal, and its next run replays it).
        replayed = replay_journal(self.tracking.callback(), spec.mlflow.outage_wait_s)
        if replayed:
            log.info("replayed %d kept MLflow record(s)", replayed)
        return True

    def run_second_seed(self) -> None:
        """`search.second_seed`: each dataset's best configuration again with another seed, as one
        Tune experiment without early stopping (a twin is judged against its original, not ranked
        against the other twins)."""
        twins = twin_configs(self.spec, self.records, self.inputs.hasher)
        if not twins:
            return
        import ray

        nodes = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
        total = ray.cluster_resources().get("CPU", 0.0)
        resources = twin_resources(self.spec, len(twins), max(nodes, default=0.0), total)
        log.info(
            "second seed: training the best configuration of %s again (seed %s; %g CPU each)",
            ", ".join(str(c["dataset"]) for c in twins),
            ", ".join(str(c["seed"]) for c in twins),
            resources.cpu,
        )
        self.run_new(twins, len(twins), [], scheduled=False, resources=resources)

    def _close_interrupted(self) -> None:
        t = self.tracking
        try:
            n = mlc.close_open_children(t.uri, t.experiment_id, t.parent, "KILLED")
            mlc.finish_run(t.uri, t.parent, "KILLED")
            closed = f"{n} open trial run(s) marked KILLED"
        except Exception as exc:  # the tracking server is away too: the next run closes them
            closed = f"open trial runs not closed (MLflow: {mlc.redact(str(exc))[:120]})"
        log.warning("interrupted: %s; run the same command to resume", closed)

    def link_runs(self) -> None:
        """Fill in MLflow run ids a restored Tuner's own callback (or an outage) left unknown."""
        runs = TrialRuns(**self.tracking.runs_args)
        for record in self.records:
            if not record.mlflow_run_id:
                record.mlflow_run_id = runs.find_existing(record.run_trial_id)
        self.rundir.save_trials(self.records)
