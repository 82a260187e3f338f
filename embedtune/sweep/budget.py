"""What `search.mode: auto` may still spend (`search.budget`; `scheduler.EpochBudgetStopper` ends
its Tune experiment when an epoch budget is spent).

An epoch budget counts the training epochs every trial of the run dir reported (a trial the scheduler
stopped after one epoch spent one); a time budget counts the wall time of the run dir's trial phases
(`SweepState.trial_seconds`), so rerunning a finished auto sweep spends nothing more.
"""

from __future__ import annotations

from dataclasses import dataclass

from embedtune.records import TrialRecord
from embedtune.specs import SweepSpec


def epochs_spent(records: list[TrialRecord]) -> int:
    """Training epochs the run dir's trials reported, each Tune trial counted once (branch mode
    keeps one record per listed epoch count of the same run)."""
    runs: dict[str, int] = {}
    for r in records:
        runs[r.run_trial_id] = max(runs.get(r.run_trial_id, 0), int(r.epochs_done or 0))
    return sum(runs.values())


@dataclass
class Left:
    """What an auto sweep may still spend: draws (Tune's num_samples), and the limit that ends it."""

    draws: int
    epochs: int | None = None
    seconds: float | None = None

    @property
    def text(self) -> str:
        if self.epochs is not None:
            return f"{self.epochs} more trial epochs"
        return f"{(self.seconds or 0) / 60:.1f} more minutes"


def left(spec: SweepSpec, records: list[TrialRecord], runs: int, trial_seconds: float) -> Left:
    """The budget left after `records` (`runs` Tune trials started) and `trial_seconds` of trial phases."""
    budget = spec.search.budget
    assert spec.search.mode == "auto" and budget is not None
    if budget.trial_epochs is not None:
        epochs = max(0, budget.trial_epochs - epochs_spent(records))
        return Left(draws=epochs, epochs=epochs)
    seconds = max(0.0, budget.minutes * 60 - trial_seconds)
    return Left(draws=max(0, budget.max_trials - runs) if seconds >= 1 else 0, seconds=seconds)
