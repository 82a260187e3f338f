"""The scheduler without the epoch bias (issue 14): in separate mode a long run early in its learning-
rate schedule is never stopped by comparison with short runs' end-of-schedule scores; runs of one
length still prune each other. Branch mode keeps one ASHA over whole configurations."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler
from specs import tiny_spec

from embedtune.specs import parse_spec
from embedtune.sweep.scheduler import BudgetASHA
from embedtune.sweep.tuner import scheduler_for

CONTINUE, STOP = TrialScheduler.CONTINUE, TrialScheduler.STOP


def _spec(mode: str, epochs=(2, 6)):
    raw = tiny_spec(
        "sched",
        search={"epochs": list(epochs), "batch_size": [16], "epochs_mode": mode},
        scheduler={
            "type": "asha",
            "grace_period": 1,
            "reduction_factor": 2,
            "metric": "score",
            "compare": "absolute",
        },
    )
    return parse_spec(raw)


def _trial(tid: str, epochs: int):
    return SimpleNamespace(trial_id=tid, config={"epochs": epochs})


def _play(scheduler) -> dict[str, list[str]]:
    """Two 2-epoch runs finish their (decayed) schedules with high scores; then 6-epoch runs report
    epoch 1, still at their peak learning rate, lower. Returns each trial's decisions."""
    scheduler.set_search_properties("score", "max")
    trials = {
        "short-a": (_trial("short-a", 2), [0.75, 0.80]),
        "short-b": (_trial("short-b", 2), [0.77, 0.82]),
        "long-a": (_trial("long-a", 6), [0.60]),
        "long-b": (_trial("long-b", 6), [0.65]),
        "long-c": (_trial("long-c", 6), [0.50]),  # the worst long run
    }
    decisions: dict[str, list[str]] = {}
    for trial, _ in trials.values():
        scheduler.on_trial_add(None, trial)
    for tid, (trial, scores) in trials.items():
        for epoch, score in enumerate(scores, start=1):
            decisions.setdefault(tid, []).append(
                scheduler.on_trial_result(None, trial, {"epoch": epoch, "score": score})
            )
    return decisions


def test_one_asha_over_all_lengths_stops_the_long_runs() -> None:
    """What the bias looks like (and what the next test would fail on): one ASHA ranks the long runs'
    epoch 1 against the short runs' epoch 1 and stops all of them."""
    one = AsyncHyperBandScheduler(time_attr="epoch", max_t=6, grace_period=1, reduction_factor=2)
    decisions = _play(one)
    assert decisions["long-a"] == [STOP] and decisions["long-b"] == [STOP]


def test_separate_mode_ranks_a_run_only_against_runs_of_its_length(tmp_path: Path) -> None:
    scheduler = scheduler_for(_spec("separate"))
    assert isinstance(scheduler, BudgetASHA)
    decisions = _play(scheduler)
    assert decisions["long-a"] == [CONTINUE]  # alone at its rung: not ranked against 2-epoch runs
    assert decisions["long-b"] == [CONTINUE]  # above the long runs' cutoff
    assert decisions["long-c"] == [STOP]  # long runs still prune each other
    assert decisions["short-a"] == [CONTINUE, STOP]  # STOP at epoch 2: the end of a 2-epoch run
    # its state survives Tune's save/restore (a resumed experiment keeps its rungs)
    scheduler.save(str(tmp_path / "sched.pkl"))
    again = BudgetASHA()
    again.restore(str(tmp_path / "sched.pkl"))
    late = _trial("long-d", 6)
    again.on_trial_add(None, late)
    assert again.on_trial_result(None, late, {"epoch": 1, "score": 0.55}) == STOP  # below 0.60/0.65


def test_branch_mode_keeps_one_asha_over_whole_configurations() -> None:
    """Branch mode trains every configuration to the largest epoch count (6): a good run goes on to
    epoch 6 (stopped there, not at 2), and a weak one is ranked against it at the same epoch."""
    scheduler = scheduler_for(_spec("branch"))
    scheduler.set_search_properties("score", "max")
    good, weak = _trial("good", 6), _trial("weak", 6)
    for trial in (good, weak):
        scheduler.on_trial_add(None, trial)
    decisions = [
        scheduler.on_trial_result(None, good, {"epoch": e, "score": 0.70 + e / 100}) for e in range(1, 7)
    ]
    assert decisions == [CONTINUE] * 5 + [STOP]
    assert scheduler.on_trial_result(None, weak, {"epoch": 1, "score": 0.40}) == STOP


@pytest.mark.slow
def test_a_real_tune_run_lets_the_long_run_finish(tmp_path: Path) -> None:
    """Real Ray Tune, one trial at a time, the two short runs first: with one ASHA the long run is
    stopped after epoch 1; with the separate-mode scheduler it trains all 6 epochs."""
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    from embedtune import ray_env

    def trainable(config):
        for epoch in range(1, config["epochs"] + 1):
            tune.report({"epoch": epoch, "score": config["base"] + 0.05 * epoch})

    points = [{"epochs": 2, "base": 0.70}, {"epochs": 2, "base": 0.72}, {"epochs": 6, "base": 0.50}]

    def last_epochs(scheduler, name: str) -> list[int]:
        tuner = tune.Tuner(
            trainable,
            param_space={"epochs": tune.choice([2, 6]), "base": tune.choice([0.5, 0.7, 0.72])},
            tune_config=tune.TuneConfig(
                metric="score",
                mode="max",
                scheduler=scheduler,
                search_alg=BasicVariantGenerator(points_to_evaluate=points, max_concurrent=1),
                num_samples=len(points),
            ),
            run_config=tune.RunConfig(name=name, storage_path=str(tmp_path), verbose=0),
        )
        grid = tuner.fit()
        return sorted((r.config["epochs"], int(r.metrics["epoch"])) for r in grid)

    with ray_env.session(num_cpus=1):
        assert last_epochs(scheduler_for(_spec("branch")), "one-asha") == [(2, 2), (2, 2), (6, 1)]
        assert last_epochs(scheduler_for(_spec("separate")), "per-budget") == [(2, 2), (2, 2), (6, 6)]
