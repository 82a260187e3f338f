"""The second seed (`search.second_seed`): after the search, each dataset's best configuration is
trained again with another seed, so the report can tell a real gain from a lucky seed.

A twin is the same trial config (model, dataset, epochs, hyperparameters, loss, schedule; a branch
trial's member at its epoch count) with `seed + 1`: a config of its own, so it has its own identity
(`identity.config_hash`) and a rerun finds it done. The final stage scores each picked trial's twins
(`final.pick.seed_entries`) and the report compares them (`report.seeds`).
"""

from __future__ import annotations

import logging
from typing import Any

from embedtune.records import TrialRecord
from embedtune.specs import Resources, SweepSpec
from embedtune.specs.metrics import WORTH_IT_POINTS
from embedtune.sweep.identity import BRANCH_SCHEDULE, LINEAR_SCHEDULE, ConfigHasher, epochs_text

log = logging.getLogger(__name__)


def best_per_dataset(records: list[TrialRecord], metric: str, mode: str = "max") -> list[TrialRecord]:
    """Per dataset, the usable trial scoring best on `metric` (absolute, as the report picks its
    winner; ties as `pick_models` breaks them) among those that beat their base model; none for a
    dataset where no trial does."""
    sign = 1.0 if mode == "max" else -1.0
    best: dict[str, TrialRecord] = {}
    usable = [t for t in records if t.usable(metric)]
    for t in sorted(usable, key=TrialRecord.best_first(metric, mode)):
        base = t.base_score(metric)
        if base is not None and sign * (t.score(metric) - base) > 0:
            best.setdefault(str(t.dataset), t)
    return [best[k] for k in sorted(best)]


def record_config(record: TrialRecord, seed: int | None = None) -> dict[str, Any]:
    """The (member) trial config a record stands for, with `seed` when given."""
    config: dict[str, Any] = {
        "model": record.model,
        "dataset": record.dataset,
        "epochs": int(record.epochs),
        "lr": float(record.lr),
        "batch_size": int(record.batch_size),
        "warmup_ratio": float(record.warmup_ratio),
        "seed": int(record.seed if seed is None else seed),
    }
    if record.loss:
        config["loss"] = record.loss
    if record.lr_schedule and record.lr_schedule != LINEAR_SCHEDULE:
        config["lr_schedule"] = record.lr_schedule
    return config


def twin_configs(spec: SweepSpec, records: list[TrialRecord], hasher: ConfigHasher) -> list[dict[str, Any]]:
    """The configs still to train for the second seed: for each dataset's best trial with no done
    twin yet (any other seed of the same recipe counts) that gains at least WORTH_IT_POINTS over its
    base model (a smaller gain is "not worth it" with any seed), its config with seed + 1."""
    if not spec.search.checks_second_seed:
        return []
    done = [r for r in records if r.done]
    metric, out = spec.scheduler.metric, []
    for best in best_per_dataset(done, metric, spec.scheduler.mode):
        if any(r.recipe == best.recipe and r.seed != best.seed for r in done):
            continue
        gain = abs(best.score(metric) - best.base_score(metric)) * 100
        if gain < WORTH_IT_POINTS:  # the report calls it not worth fine-tuning whatever the seed
            log.info("second seed: none for %s (its best trial gains %.1f points)", best.dataset, gain)
            continue
        config = record_config(best)
        own = hasher(config)
        if own != best.config_hash:  # a config key this reconstruction does not know (a grid repeat)
            log.warning(
                "second seed: cannot rebuild the config of trial %s (%s); no twin for %s",
                best.trial_id,
                own,
                best.dataset,
            )
            continue
        twin = record_config(best, seed=best.seed + 1)
        if best.lr_schedule == BRANCH_SCHEDULE:  # scored at exactly its original's epoch count
            twin["branch_epochs"] = epochs_text([best.epochs])
        twin["config_hash"] = hasher(twin)
        out.append(twin)
    return out


def twin_resources(spec: SweepSpec, n_twins: int, node_cpus: float, total_cpus: float) -> Resources:
    """What each twin trial gets: on CPU, the CPUs the sweep's concurrent trials had, shared among
    the twins (a lone twin trains with the threads two trials had), at most `node_cpus` (the largest
    Ray node: a trial runs on one) and never less than a trial of the sweep; GPU trials keep theirs."""
    own = spec.resources
    if own.gpu or n_twins < 1:
        return own
    slots = spec.max_concurrent_trials or max(1, int(total_cpus // own.cpu))
    share = own.cpu * max(1, slots // n_twins)
    return own.model_copy(update={"cpu": max(own.cpu, min(share, float(node_cpus)))})
