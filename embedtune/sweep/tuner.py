"""Building the Tune experiment of a sweep from Tune's own scheduler and searcher registries."""

from __future__ import annotations

from typing import Any

from embedtune import env
from embedtune.specs import SweepSpec
from embedtune.sweep.budget import Left
from embedtune.sweep.identity import explicit_space, param_space, trial_dirname

# Spec name -> the name in Ray Tune's registries (`create_scheduler`, `create_searcher`). To add
# one, add its spec name here (and to the spec's Literal); its settings go through the kwargs.
SCHEDULERS = {"asha": "async_hyperband"}
SEARCHERS = {"optuna": "optuna", "auto": "optuna"}  # auto: TPE within a budget (sweep.budget)


def scheduler_for(spec: SweepSpec):
    """Branch mode: one ASHA over all trials (each trains to the same maximum with a schedule that
    does not depend on the total, so ASHA prunes whole configurations). Separate mode: one ASHA per
    epoch budget (`scheduler.BudgetASHA`), so runs of different lengths are never ranked against
    each other at the same epoch."""
    from ray.tune.schedulers import create_scheduler

    from embedtune.sweep.scheduler import BudgetASHA

    if spec.scheduler.type == "none":
        return None
    if spec.scheduler.type == "asha" and not spec.search.branch:
        return BudgetASHA(
            grace_period=spec.scheduler.grace_period, reduction_factor=spec.scheduler.reduction_factor
        )
    max_epochs = spec.search.max_epochs
    return create_scheduler(
        SCHEDULERS[spec.scheduler.type],
        time_attr="epoch",
        max_t=max_epochs,
        grace_period=min(spec.scheduler.grace_period, max_epochs),
        reduction_factor=spec.scheduler.reduction_factor,
    )


def _shown(spec: SweepSpec) -> tuple[str, str]:
    return spec.scheduler.tune_metric, spec.scheduler.mode


def build_tuner(
    spec: SweepSpec,
    trainable,
    storage: str,
    callback,
    name: str,
    configs: list[dict[str, Any]] | None = None,
    num_samples: int | None = None,
    budget: Left | None = None,
    scheduled: bool = True,
):
    """A Tuner over `configs` (grid mode: an explicit list, each run once) or, for sampled modes
    (`configs` None), `num_samples` draws from the spec's space, ended early (auto mode) when
    `budget` is spent: its epochs by a stopper, its seconds by Tune's time budget. `scheduled`
    False: no scheduler (every trial runs to its end)."""
    from ray import tune
    from ray.tune.search import create_searcher

    from embedtune.sweep.loggers import result_loggers
    from embedtune.sweep.progress import SweepProgress
    from embedtune.sweep.scheduler import EpochBudgetStopper

    if configs is not None:
        space, search_alg = explicit_space(configs, spec.max_concurrent_trials)
        samples = len(configs)
    else:
        space, samples = param_space(spec), num_samples or spec.search.num_samples
        mode = SEARCHERS.get(spec.search.mode)
        search_alg = create_searcher(mode, seed=0) if mode else None
    return tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=spec.scheduler.tune_metric,
            mode=spec.scheduler.mode,
            scheduler=scheduler_for(spec) if scheduled else None,
            search_alg=search_alg,
            num_samples=samples,
            max_concurrent_trials=None if configs is not None else spec.max_concurrent_trials,
            time_budget_s=budget.seconds if budget is not None else None,
            # A finished trial's process takes the next trial (same resources): no second torch /
            # sentence-transformers import per trial. Measured on a 4-trial, 2-at-a-time tiny sweep
            # on 2 cores: 70 instead of 88 CPU-seconds, 41 instead of 54 s. A trial whose thread
            # does not stop within 2 s (one the scheduler stopped mid-epoch) gets a fresh process.
            reuse_actors=True,
            trial_dirname_creator=trial_dirname if configs is not None else None,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage,
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=spec.checkpoints_to_keep,
                checkpoint_score_attribute=spec.scheduler.metric,
                checkpoint_score_order=spec.scheduler.mode,
            ),
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            stop=EpochBudgetStopper(budget.epochs) if budget is not None and budget.epochs else None,
            # one progress line instead of Tune's status tables, unless --verbose
            callbacks=[callback, *result_loggers()]
            + ([] if env.verbose() else [SweepProgress(samples, *_shown(spec))]),
            verbose=1 if env.verbose() else 0,
        ),
    )
