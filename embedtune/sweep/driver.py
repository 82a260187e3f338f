"""The sweep driver: a SweepSpec becomes parallel Ray Tune trials, each an MLflow child run.

`run_sweep` reads as its five steps:
1. preflight — what the run dir holds (a new sweep, one to resume, one to extend), and the checks
   that need no data (tracking server, writable storage, placeable trials, resolvable models);
2. prepare — every dataset split, hard negatives mined once per (dataset, miner), every base model
   scored once per dataset (epoch 0 of every curve);
3. tracking — the sweep's MLflow experiment and parent run; records an earlier run could not send
   are replayed;
4. trials — an interrupted Tune experiment resumes first (finished trials are not rerun, unfinished
   ones continue from their last checkpoint, into the same MLflow runs); then the configs that
   have no done trial yet run as a new experiment (`tune`, `tune-2`, ...);
5. final stage — LanceDB retrieval, the leaderboard, the registry (`embedtune.final`).

Idempotence: a trial's identity is the hash of its resolved config (`identity.config_hash`).
Rerunning a sweep, or running a grown spec (more models, datasets or search values; everything else
equal) into the same run dir, launches only the configs whose hash has no done trial (FINISHED, or
KILLED by the scheduler; FAILED ones run again). `trials.json` keeps one record per config hash and
the MLflow experiment one child run per Tune trial. In branch mode (`search.epochs_mode`) a config's
epoch counts are one Tune trial recorded once per count: it runs again only when one of its counts
has no done record. Sampled modes (random/optuna) cannot list their configs: there `num_samples`
counts the run dir's done Tune trials, and a drawn config already done is skipped.
"""

from __future__ import annotations

import importlib.metadata as md
import logging
import os
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from embedtune import storage
from embedtune.data import PreparedData, prepare
from embedtune.errors import EmbedtuneError
from embedtune.evaluate import check_depth
from embedtune.models import model_label, resolve_model, truncate
from embedtune.negatives import Triplets, mine
from embedtune.records import ModelData, TrialRecord, dump_trials, load_trials
from embedtune.rundir import BASE_METRICS, DATA, SPEC, TRIALS, RunDir
from embedtune.specs import SweepSpec
from embedtune.sweep import preflight as pf
from embedtune.sweep.identity import ConfigHasher, is_done, trial_configs
from embedtune.sweep.results import (
    collect_trials,
    done_configs,
    done_runs,
    merge_records,
    print_results_table,
    tune_score,
)
from embedtune.sweep.trainable import TrialPayload, run_trial
from embedtune.sweep.tuner import build_tuner
from embedtune.tracking import client as mlc
from embedtune.tracking.callback import MlflowTrialCallback, replay_journal
from embedtune.tracking.journal import Journal
from embedtune.tracking.lineage import data_lineage
from embedtune.tracking.trial_runs import TrialRuns

log = logging.getLogger(__name__)


@dataclass
class SweepResult:
    run_dir: Path  # the local folder (the run dir itself, or the work folder of a remote one)
    trials: list[TrialRecord]
    parent_run_id: str
    tracking_uri: str
    experiment_id: str
    resumed: bool = False
    final: Any = None
    timings: dict[str, float] = field(default_factory=dict)
    launched: int = 0  # trials of the Tune experiments this call ran or resumed
    experiments: list[str] = field(default_factory=list)  # Tune experiments of the run dir
    location: str = ""  # the run dir as given: a folder or a URI


@dataclass
class Inputs:
    """What step 2 prepared for the trials and the final stage."""

    datasets: dict[str, PreparedData]
    triplets: dict[str, Triplets]
    base: dict[ModelData, dict[str, float]]
    hasher: ConfigHasher


@dataclass
class Tracking:
    """Step 3's MLflow handles; `callback()` makes the Tune callback of one experiment."""

    uri: str
    experiment_id: str
    parent: str
    runs_args: dict[str, Any]
    journal: Journal

    def callback(self, skip=()) -> MlflowTrialCallback:
        return MlflowTrialCallback(TrialRuns(**self.runs_args), self.journal, skip)


# ---------------------------------------------------------------- step 2: prepare


def prepare_inputs(
    spec: SweepSpec, rundir: RunDir, state: pf.SweepState | None, final: bool, timings: dict[str, float]
) -> Inputs:
    t0 = time.time()
    old_fingerprints = state.fingerprints if state else {}
    datasets: dict[str, PreparedData] = {}
    for ds in spec.datasets:
        data = prepare(ds)
        was = old_fingerprints.get(data.label)
        if was and was != data.fingerprint:  # the trials done in this run dir trained on other data
            raise EmbedtuneError(
                f"the data of {data.label!r} changed since the sweep in {rundir} (fingerprint {was} -> "
                f"{data.fingerprint}); use another --run-dir or --fresh"
            )
        datasets[data.label] = data
        if final and spec.final.enabled:
            check_depth(spec.final.eval, data, "final.eval.ks")
    rundir.create()
    rundir.write_json(SPEC, spec.model_dump(mode="json"))
    for data in datasets.values():
        rundir.write_json(f"{DATA}/{data.label}.json", data.to_dict())
        log.info(
            "data %s (%s): %s",
            data.label,
            data.fingerprint,
            ", ".join(f"{k}={v}" for k, v in data.counts.items()),
        )
    triplets: dict[str, Triplets] = {}
    if spec.train.hard_negatives:
        for label, data in datasets.items():
            triplets[label] = mine(data, spec.mining)
            how = "mined" if triplets[label].mined else "loaded from cache"
            log.info(
                "hard negatives %s (%s, key %s): %s", label, how, triplets[label].key, triplets[label].counts
            )
    timings["prepare_s"] = time.time() - t0
    base = base_metrics(spec, datasets, triplets, rundir)
    timings["base_eval_s"] = time.time() - t0 - timings["prepare_s"]
    hasher = ConfigHasher(
        {k: v.fingerprint for k, v in datasets.items()},
        spec.train.model_dump(),
        {k: v.key for k, v in triplets.items()},
    )
    return Inputs(datasets, triplets, base, hasher)


def base_metrics(
    spec: SweepSpec, datasets: dict[str, PreparedData], triplets: dict[str, Triplets], rundir: RunDir
) -> dict[ModelData, dict[str, float]]:
    """Epoch-0 scores: every base model on every dataset, once (kept in the run dir by model,
    dataset and data fingerprint)."""
    from embedtune.models import load_model
    from embedtune.train import build_evaluator, evaluator_metrics

    stored = {
        (r["model"], r["dataset"], r["fingerprint"]): r["metrics"]
        for r in rundir.read_json(BASE_METRICS, []) or []
        if isinstance(r, dict)
    }
    out: dict[ModelData, dict[str, float]] = {}
    for model in spec.models:
        st = None
        for label, data in datasets.items():
            key = (model, label, data.fingerprint)
            if key not in stored:
                if st is None:
                    st = load_model(resolve_model(model))
                    truncate(st, spec.train.max_seq_length)
                stored[key] = evaluator_metrics(build_evaluator(data, triplets.get(label))(st))
                log.info(
                    "base %s on %s: %s=%.4f",
                    model_label(model),
                    label,
                    spec.scheduler.metric,
                    stored[key].get(spec.scheduler.metric, float("nan")),
                )
            out[ModelData(model, label)] = stored[key]
    rundir.write_json(
        BASE_METRICS,
        [{"model": m, "dataset": d, "fingerprint": f, "metrics": v} for (m, d, f), v in stored.items()],
    )
    return out


# ---------------------------------------------------------------- step 3: tracking


def _git_commit() -> str:
    try:
        here = Path(__file__).resolve().parent
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except Exception:
        return "unknown"


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in (
        "embedtune",
        "torch",
        "ray",
        "mlflow",
        "lancedb",
        "sentence-transformers",
        "transformers",
        "datasets",
    ):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def open_tracking(
    spec: SweepSpec,
    rundir: RunDir,
    state: pf.SweepState | None,
    tracking_uri: str,
    inputs: Inputs,
    extending: bool,
) -> Tracking:
    experiment_id = mlc.ensure_experiment(tracking_uri, spec.experiment, rundir.mlartifacts)
    parent = mlc.start_parent_run(
        tracking_uri, experiment_id, state.parent_run_id if state else None, spec.name
    )
    params = {
        "spec": spec.model_dump_json(),
        "git_commit": _git_commit(),
        **{f"fingerprint.{k}": v.fingerprint for k, v in inputs.datasets.items()},
        **{f"version.{k}": v for k, v in _versions().items()},
        **{f"negatives.{k}": v.key for k, v in inputs.triplets.items()},
    }
    if extending:  # the parent run's `spec` stays the first one; each extension adds its own
        params[f"spec.{pf.spec_hash(spec)}"] = params.pop("spec")
    mlc.log_params(tracking_uri, parent, params)
    runs_args = {
        "tracking_uri": tracking_uri,
        "experiment_id": experiment_id,
        "parent_run_id": parent,
        "base_metrics": inputs.base,
        "epoch_metric": spec.scheduler.metric,
        "log_models": spec.mlflow.log_models,
        "hasher": inputs.hasher,
        "lineage": data_lineage(spec.datasets, {k: v.fingerprint for k, v in inputs.datasets.items()}),
    }
    tracking = Tracking(tracking_uri, experiment_id, parent, runs_args, Journal(rundir))
    # Records an earlier run kept while the tracking server was away go in first.
    replayed = replay_journal(tracking.callback())
    if replayed:
        log.info("replayed %d MLflow record(s) kept by the last run", replayed)
    return tracking


# ---------------------------------------------------------------- step 4: trials


def _todo(spec: SweepSpec, hasher: ConfigHasher, records: list[TrialRecord], attempted: list[TrialRecord]):
    """What is left to run: (grid trial configs with a (config, epochs) neither done nor attempted in
    this call, their count), or for sampled modes (None, draws left: num_samples minus the run dir's
    done/attempted Tune trials)."""
    if spec.search.mode == "grid":
        skip = done_configs(records) | {r.config_hash for r in attempted}
        todo = [c for c in trial_configs(spec, hasher) if not is_done(c, hasher, skip)]
        return todo, len(todo)
    runs = done_runs(records) | {r.run_trial_id for r in attempted}
    return None, max(0, spec.search.num_samples - len(runs))


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
        )

    def path(self, name: str) -> str:
        return storage.join(self.storage, name)

    def trainable(self, skip: set[str]):
        from dataclasses import replace

        from ray import tune

        scores = {r.config_hash: tune_score(r, self.spec) for r in self.records}
        payload = replace(self.payload, skip={h: scores.get(h, 0.0) for h in skip})
        return tune.with_resources(
            tune.with_parameters(run_trial, payload=payload),
            {"cpu": self.spec.resources.cpu, "gpu": self.spec.resources.gpu},
        )

    def save(self, new: list[TrialRecord]) -> None:
        self.records = merge_records(self.records, new)
        self.rundir.write_json(TRIALS, dump_trials(self.records))

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
        new = _fit(tuner, restore_path, self.spec, self.inputs, callback, skip)
        known = {r.run_trial_id for r in self.records if r.done}
        self.launched += len({r.run_trial_id for r in new} - known)
        self.save(new)
        return new

    def run_new(self, todo: list[dict[str, Any]] | None, n_todo: int, attempted: list[TrialRecord]) -> None:
        """Run what is left as a new Tune experiment."""
        name = self.state.next_experiment()
        self.state.save(self.rundir)
        skip = done_configs(self.records) | {r.config_hash for r in attempted} if todo is None else set()
        callback = self.tracking.callback(skip)
        log.info("running %d trial(s) as Tune experiment %s", n_todo, name)
        tuner = build_tuner(self.spec, self.trainable(skip), self.storage, callback, name, todo, n_todo)
        new = _fit(tuner, self.path(name), self.spec, self.inputs, callback, skip)
        self.launched += len({r.run_trial_id for r in new})
        self.save(new)

    def run(self, ray_address: str | None) -> None:
        from ray import tune

        from embedtune import ray_env

        state, spec = self.state, self.spec
        restore_path = (
            self.path(state.experiments[-1]) if state.experiments and not state.trials_done else None
        )
        if restore_path and not tune.Tuner.can_restore(restore_path):
            restore_path = None
        todo, n_todo = _todo(spec, self.inputs.hasher, self.records, [])
        if self.records and not restore_path:
            log.info(
                "%d config(s) already done in %s; %d to run",
                len(done_configs(self.records)),
                self.rundir,
                n_todo,
            )
        if not (restore_path or n_todo):
            return
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
                    todo, n_todo = _todo(spec, self.inputs.hasher, self.records, attempted)
                if n_todo:
                    self.run_new(todo, n_todo, attempted)
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
        self.rundir.write_json(TRIALS, dump_trials(self.records))


# ---------------------------------------------------------------- the sweep


def run_sweep(
    spec: SweepSpec,
    run_dir: str | Path,
    resume: bool | None = None,
    final: bool = True,
    ray_address: str | None = None,
) -> SweepResult:
    """Run (or resume, or extend) a sweep into `run_dir` (a folder or a URI). `resume=None` resumes
    when the run dir holds a run of the same spec, and extends it when the spec only grew (more
    models, datasets, search values): then only configs without a done trial run. True insists on
    resuming; False refuses to reuse a run dir."""
    rundir = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    spec = pf.without_secrets(spec)  # no password in spec.json, the state or Tune's pickles
    with rundir.lock():
        return _run(spec, rundir, resume, final, ray_address)


def _run(spec: SweepSpec, rundir: RunDir, resume: bool | None, final: bool, ray_address: str | None):
    timings: dict[str, float] = {}
    t0 = time.time()
    # 1. preflight
    stored = pf.SweepState.load(rundir)
    extending = pf.check_run_dir(spec, rundir, stored, resume)
    joins = bool(ray_address or spec.ray.address or os.environ.get("RAY_ADDRESS"))
    tracking_uri = pf.preflight(spec, rundir, stored, joins)
    pf.check_gpu_memory(spec, ray_address or spec.ray.address)  # before data work; skipped without a GPU
    # 2. prepare
    inputs = prepare_inputs(spec, rundir, stored, final, timings)
    # 3. tracking
    tracking = open_tracking(spec, rundir, stored, tracking_uri, inputs, extending)
    state = pf.SweepState(
        spec_hash=pf.spec_hash(spec),
        parent_run_id=tracking.parent,
        experiment_id=tracking.experiment_id,
        tracking_uri=tracking_uri,
        storage=spec.storage_path or rundir.location,
        finished=False,
        trials_done=bool(stored.trials_done or stored.finished) if stored else False,
        experiments=list(stored.experiments) if stored else [],
        fingerprints={**(stored.fingerprints if stored else {}), **inputs.hasher.fingerprints},
    )
    state.save(rundir)
    # 4. trials (records of earlier runs in this dir first)
    records = merge_records([], load_trials(rundir.read_json(TRIALS, [])))
    step = TrialsStep(spec, rundir, state, inputs, tracking, records)
    t1 = time.time()
    step.run(ray_address)
    timings["trials_s"] = time.time() - t1
    step.link_runs()
    print_results_table(step.records, spec.scheduler.metric)
    result = SweepResult(
        rundir.path,
        step.records,
        tracking.parent,
        tracking_uri,
        tracking.experiment_id,
        bool(stored),
        None,
        timings,
        step.launched,
        state.experiments,
        rundir.location,
    )
    # 5. final stage
    if final and spec.final.enabled:
        t2 = time.time()
        result.final = final_stage(spec, rundir, step.records, inputs, tracking)
        timings["final_s"] = time.time() - t2
    timings["total_s"] = time.time() - t0
    mlc.log_metrics(tracking_uri, tracking.parent, {f"timing.{k}": v for k, v in timings.items()}, step=0)
    mlc.finish_run(tracking_uri, tracking.parent, "FINISHED")
    state.finished = True
    state.save(rundir)
    return result


def final_stage(
    spec: SweepSpec, rundir: RunDir, trials: list[TrialRecord], inputs: Inputs, tracking: Tracking
):
    """Step 5: the final stage; the sweep's parent run never stays RUNNING if it fails, and rerunning
    the same command redoes only this stage."""
    from embedtune.final import run_final_stage

    try:
        return run_final_stage(
            rundir,
            trials,
            inputs.datasets,
            inputs.triplets,
            spec.models,
            spec.final,
            tracking.parent,
            tracking.uri,
            max_seq_length=spec.train.max_seq_length,
            sweep_name=spec.name,
            sweep_metric=spec.scheduler.metric,
        )
    except BaseException as exc:
        interrupted = isinstance(exc, KeyboardInterrupt)
        mlc.finish_run(tracking.uri, tracking.parent, "KILLED" if interrupted else "FAILED")
        log.warning(
            "final stage %s; the trials are done: run the same command to redo only the final stage",
            "interrupted" if interrupted else "failed",
        )
        raise


def default_run_dir(spec: SweepSpec, run_dir: str | None) -> str:
    """`--run-dir` as given; else, for a sweep whose Tune storage is on object storage, next to its
    Tune experiments (`<storage_path>/<name>`, so the state outlives the driver); else `runs/<name>`."""
    if run_dir:
        return run_dir
    if spec.storage_path and storage.is_remote(spec.storage_path):
        return storage.join(spec.storage_path, spec.name)
    return str(Path("runs") / spec.name)
