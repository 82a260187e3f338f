"""`search.mode: auto`: Optuna's TPE with ASHA over the axes a spec gives and default ranges for the
rest, until `search.budget` (minutes of trial phase, or trial epochs) is spent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from specs import tiny_spec

from embedtune.errors import EmbedtuneError
from embedtune.records import TrialRecord
from embedtune.specs import Distribution, parse_spec
from embedtune.specs.sweep import AUTO_BUDGET, AUTO_LOSSES, AUTO_SPACE


def auto_spec(name: str = "auto", search: dict | None = None, **overrides) -> dict:
    return tiny_spec(name, search={"mode": "auto", **(search or {})}, **overrides)


def test_auto_fills_the_axes_left_out_and_keeps_those_given():
    spec = parse_spec(auto_spec(search={"lr": [3e-5, 6e-5], "budget": {"trial_epochs": 6}}))
    s = spec.search
    assert s.lr == [3e-5, 6e-5]  # given: searched as given
    assert s.epochs == AUTO_SPACE["epochs"] and s.epochs_mode == "branch"
    assert isinstance(s.batch_size, Distribution) and s.batch_size.values == [16, 32, 64]
    assert isinstance(s.warmup_ratio, Distribution) and s.warmup_ratio.distribution == "uniform"
    assert spec.losses == AUTO_LOSSES and s.budget.trial_epochs == 6 and s.draws == 6
    # the stored spec spells every filled value out and reads back the same
    again = parse_spec(spec.model_dump(mode="json"))
    assert again.model_dump() == spec.model_dump()
    # the defaults: a time budget, the lr range
    plain = parse_spec(auto_spec()).search
    assert plain.budget.minutes == AUTO_BUDGET["minutes"] and plain.budget.trial_epochs is None
    assert isinstance(plain.lr, Distribution) and plain.lr.distribution == "loguniform"
    # a loss the spec names is kept: no loss axis
    assert parse_spec(auto_spec(train={"max_seq_length": 48, "loss": "cached_mnrl"})).losses == [
        "cached_mnrl"
    ]
    assert parse_spec(auto_spec(search={"loss": ["mnrl"]})).losses == ["mnrl"]


def test_budget_bad_input_is_one_clear_line():
    with pytest.raises(EmbedtuneError, match="search.budget.*exactly one of minutes or trial_epochs"):
        parse_spec(auto_spec(search={"budget": {"minutes": 5, "trial_epochs": 3}}))
    with pytest.raises(EmbedtuneError, match="search.budget.*exactly one"):
        parse_spec(auto_spec(search={"budget": {}}))
    with pytest.raises(EmbedtuneError, match="search.budget.minutes"):
        parse_spec(auto_spec(search={"budget": {"minutes": 0}}))
    with pytest.raises(EmbedtuneError, match="budget is for mode: auto"):
        parse_spec(tiny_spec("x", search={"mode": "grid", "epochs": [1], "budget": {"minutes": 5}}))


def _record(run: str, epochs: int, member: int | None = None) -> TrialRecord:
    """A record of Tune trial `run` that trained `epochs` epochs (branch mode: one per member)."""
    return TrialRecord(
        trial_id=f"{run}-e{member or epochs}",
        tune_trial_id=run,
        config_hash=f"{run}{member}",
        model="m",
        model_label="m",
        dataset="d",
        epochs=member or epochs,
        lr=5e-5,
        batch_size=16,
        warmup_ratio=0.1,
        seed=42,
        status="FINISHED",
        epochs_done=epochs,
    )


def test_what_the_budget_leaves():
    from embedtune.sweep.budget import epochs_spent, left
    from embedtune.sweep.scheduler import EpochBudgetStopper

    # branch mode: one record per listed epoch count of a run; the run counts once, by its last
    records = [_record("a", 1, 1), _record("a", 2, 2), _record("b", 1)]
    assert epochs_spent(records) == 3
    epochs = parse_spec(auto_spec(search={"budget": {"trial_epochs": 5}}))
    assert left(epochs, records, 2, 0).epochs == 2 and left(epochs, records, 2, 0).draws == 2
    assert left(epochs, [*records, _record("c", 2)], 3, 0).draws == 0
    minutes = parse_spec(auto_spec(search={"budget": {"minutes": 2}}))
    assert left(minutes, records, 2, 30).seconds == 90 and left(minutes, records, 2, 30).draws > 0
    assert left(minutes, records, 2, 125).draws == 0  # spent: a rerun runs nothing

    stop = EpochBudgetStopper(3)
    assert not stop("t1", {"epoch": 0}) and not stop.stop_all()  # the base scores are no epoch
    stop("t1", {"epoch": 1})
    stop("t2", {"epoch": 1})
    assert not stop.stop_all()
    stop("t1", {"epoch": 2})
    assert stop.stop_all()


@pytest.mark.slow
def test_an_auto_sweep_spends_its_epoch_budget_and_a_rerun_spends_nothing(tmp_path: Path):
    """A real auto sweep (Optuna TPE + ASHA on the local Ray) with a budget of 4 trial epochs over
    two models: the trials trained 4 epochs between them (one more at most, from the second trial
    running beside the first when the budget ran out), each drew its own learning rate from the
    default range and a loss from mnrl/gist, each is an MLflow run, and the same command again
    trains nothing."""
    from embedtune.sweep import run_sweep
    from embedtune.sweep.budget import epochs_spent

    raw = auto_spec(
        # the second seed (on in auto mode) trains after the budget: tests/test_second_seed.py
        search={"epochs": [1, 2], "batch_size": [16], "budget": {"trial_epochs": 4}, "second_seed": False},
        mlflow={"log_models": False},
        scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 2},
    )
    spec = parse_spec(raw)
    result = run_sweep(spec, tmp_path / "run", final=False)
    spent = epochs_spent(result.trials)
    assert 4 <= spent <= 4 + spec.max_concurrent_trials - 1, spent
    runs = {t.run_trial_id: t for t in result.trials}
    assert len(runs) >= 2 and result.launched == len(runs)
    low, high = AUTO_SPACE["lr"]["low"], AUTO_SPACE["lr"]["high"]
    lrs = {t.lr for t in runs.values()}
    assert all(low <= lr <= high for lr in lrs) and len(lrs) == len(runs)  # drawn, not a fixed value
    assert {t.loss for t in runs.values()} <= set(AUTO_LOSSES)
    client = MlflowClient(f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}")
    exp = client.get_experiment_by_name(spec.experiment)
    children = [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == len(runs)
    state = json.loads((tmp_path / "run" / "sweep_state.json").read_text())
    assert state["trial_seconds"] > 0

    again = run_sweep(spec, tmp_path / "run", final=False)
    assert again.launched == 0 and epochs_spent(again.trials) == spent
