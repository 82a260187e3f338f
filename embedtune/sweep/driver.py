"""The sweep driver: a SweepSpec becomes parallel Ray Tune trials, each an MLflow child run.

`run_sweep` reads as its five steps (each in its module of `embedtune.sweep`):
1. preflight (`preflight`) — what the run dir holds (a new sweep, one to resume, one to extend),
   and the checks that need no data (tracking server, writable storage, placeable trials,
   resolvable models);
2. prepare (`inputs`) — every dataset split, hard negatives mined once per (dataset, miner), every
   base model scored once per dataset (epoch 0 of every curve);
3. tracking (`parent_run`) — the sweep's MLflow experiment and parent run; records an earlier run
   could not send are replayed;
4. trials (`trials`) — an interrupted Tune experiment resumes first (finished trials are not rerun,
   unfinished ones continue from their last checkpoint, into the same MLflow runs); then the
   configs that have no done trial yet run as a new experiment (`tune`, `tune-2`, ...);
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

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embedtune import storage
from embedtune.clock import StageClock
from embedtune.records import TrialRecord
from embedtune.rundir import RunDir
from embedtune.specs import SweepSpec
from embedtune.sweep import preflight as pf
from embedtune.sweep.inputs import Inputs, prepare_inputs
from embedtune.sweep.parent_run import Tracking, open_tracking
from embedtune.sweep.results import merge_records
from embedtune.sweep.trials import TrialsStep
from embedtune.tracking import client as mlc

if TYPE_CHECKING:
    from embedtune.final.cross_encoder_early import EarlyCrossEncoders

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
    timings: dict[str, float] = field(default_factory=dict)  # "<stage>_s" and "total_s" (StageClock.flat)
    launched: int = 0  # trials of the Tune experiments this call ran or resumed
    experiments: list[str] = field(default_factory=list)  # Tune experiments of the run dir
    location: str = ""  # the run dir as given: a folder or a URI
    clock: StageClock = field(default_factory=StageClock)  # where the time went (`clock.line()`)


# ---------------------------------------------------------------- the sweep


def run_sweep(
    spec: SweepSpec,
    run_dir: str | Path,
    resume: bool | None = None,
    final: bool = True,
    ray_address: str | None = None,
    on_trials: Callable[[list[TrialRecord]], None] | None = None,
) -> SweepResult:
    """Run (or resume, or extend) a sweep into `run_dir` (a folder or a URI). `resume=None` resumes
    when the run dir holds a run of the same spec, and extends it when the spec only grew (more
    models, datasets, search values): then only configs without a done trial run. True insists on
    resuming; False refuses to reuse a run dir. `on_trials(records)` is called when the trials are
    done, before the final stage (the CLI shows them as a table)."""
    rundir = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    spec = pf.without_secrets(spec)  # no password in spec.json, the state or Tune's pickles
    with rundir.lock():
        return _run(spec, rundir, resume, final, ray_address, on_trials)


def _run(
    spec: SweepSpec,
    rundir: RunDir,
    resume: bool | None,
    final: bool,
    ray_address: str | None,
    on_trials: Callable[[list[TrialRecord]], None] | None = None,
):
    clock = StageClock()  # each stage's wall time: meta.json, the parent run, the report's summary
    # 1. preflight
    with clock.stage("preflight"):
        stored = pf.SweepState.load(rundir)
        extending = pf.check_run_dir(spec, rundir, stored, resume)
        joins = bool(ray_address or spec.ray.address or os.environ.get("RAY_ADDRESS"))
        tracking_uri = pf.preflight(spec, rundir, stored, joins)
        pf.check_gpu_memory(spec, ray_address or spec.ray.address)  # before data work; skipped without a GPU
    # 2. prepare (data, mining, base_scores)
    inputs = prepare_inputs(spec, rundir, stored, final, clock)
    # 3. tracking
    with clock.stage("tracking"):
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
    # 4. trials (records of earlier runs in this dir first), the final stage's cross-encoders beside them
    early = start_early_cross_encoders(spec, inputs) if final and spec.final.enabled else None
    try:
        with clock.stage("trials"):
            records = merge_records([], rundir.trials())
            step = TrialsStep(spec, rundir, state, inputs, tracking, records)
            ran = step.run(ray_address)
            step.link_runs()
    except BaseException:
        if early is not None:
            early.cancel()
        raise
    if not ran:
        clock.skip("trials", "all done before")
    if on_trials is not None:
        on_trials(step.records)
    result = SweepResult(
        rundir.path,
        step.records,
        tracking.parent,
        tracking_uri,
        tracking.experiment_id,
        bool(stored),
        None,
        {},
        step.launched,
        state.experiments,
        rundir.location,
        clock,
    )
    # 5. final stage
    if final and spec.final.enabled:
        with clock.stage("final"):
            result.final = final_stage(spec, rundir, step.records, inputs, tracking, clock, early)
    else:
        clock.skip("final", "--no-final" if not final else "final.enabled off")
    result.timings = clock.flat()
    mlc.log_metrics(tracking_uri, tracking.parent, clock.metrics(), step=0)
    if result.final is not None:  # the report's summary line and meta.json, now that all is timed
        from embedtune.final import stamp_timings

        stamp_timings(rundir, result.final, clock.to_dict(), tracking_uri, tracking.parent)
    log.info("sweep %s took %s", spec.name, clock.line())
    mlc.finish_run(tracking_uri, tracking.parent, "FINISHED")
    state.finished = True
    state.save(rundir)
    return result


def final_stage(
    spec: SweepSpec,
    rundir: RunDir,
    trials: list[TrialRecord],
    inputs: Inputs,
    tracking: Tracking,
    clock: StageClock | None = None,
    early: EarlyCrossEncoders | None = None,
):
    """Step 5: the final stage; the sweep's parent run never stays RUNNING if it fails, and rerunning
    the same command redoes only this stage. `early`: its cross-encoders, trained beside the trials
    (what is left of that training counts as the final stage's cross-encoder time)."""
    from embedtune.final import run_final_stage

    try:
        made = None
        if early is not None:
            with (clock or StageClock()).stage("final/cross_encoder"):
                made = early.wait()
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
            clock=clock,
            early_cross_encoders=made,
            matryoshka_dims=spec.train.matryoshka_dims,
        )
    except BaseException as exc:
        interrupted = isinstance(exc, KeyboardInterrupt)
        mlc.finish_run(tracking.uri, tracking.parent, "KILLED" if interrupted else "FAILED")
        log.warning(
            "final stage %s; the trials are done: run the same command to redo only the final stage",
            "interrupted" if interrupted else "failed",
        )
        raise


def start_early_cross_encoders(spec: SweepSpec, inputs: Inputs) -> EarlyCrossEncoders | None:
    """Start training the final stage's cross-encoders in a thread while the trials run (they need
    only the data and its negatives); None when the spec trains none."""
    from embedtune.final.cross_encoder_early import EarlyCrossEncoders
    from embedtune.final.stage import with_eval_cut

    final = with_eval_cut(spec.final, spec.train.max_seq_length)  # as run_final_stage scores
    # each dataset's cross-encoder must beat its first base model's ordering (pick_models' order)
    bi_encoders = dict.fromkeys(inputs.datasets, spec.models[0])
    return EarlyCrossEncoders.start(final, inputs.datasets, inputs.triplets, bi_encoders)


def default_run_dir(spec: SweepSpec, run_dir: str | None) -> str:
    """`--run-dir` as given; else, for a sweep whose Tune storage is on object storage, next to its
    Tune experiments (`<storage_path>/<name>`, so the state outlives the driver); else `runs/<name>`."""
    if run_dir:
        return run_dir
    if spec.storage_path and storage.is_remote(spec.storage_path):
        return storage.join(spec.storage_path, spec.name)
    return str(Path("runs") / spec.name)
