"""ASHA without the epoch bias of separate runs: one Ray Tune ASHA per epoch budget.

In `search.epochs_mode: separate` every epoch count is its own run whose learning rate decays to
zero at the end of *its own* schedule. One ASHA over all of them compares, at epoch 2, a 10-epoch run
still near its peak learning rate with a 2-epoch run that has finished decaying: the long runs the
study is about look worse than they are and get stopped. `BudgetASHA` keeps one
`AsyncHyperBandScheduler` per total epoch count (`max_t` = that count), so a trial is only ever ranked
against trials of the same length at the same point of the same schedule. (Branch mode needs none
of this: every trial trains to the same maximum with a schedule that does not depend on the total,
so one ASHA ranks whole configurations fairly.)

`EpochBudgetStopper` ends an auto sweep's experiment when its epoch budget is spent (`budget`).
"""

from __future__ import annotations

import pickle
from typing import TYPE_CHECKING, Any

from ray.tune import Stopper
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler

if TYPE_CHECKING:
    from ray.tune.experiment import Trial


class BudgetASHA(FIFOScheduler):
    """Dispatches each trial to the ASHA of its budget (`trial.config[budget_key]`), made the first
    time that budget is seen (sampled modes do not list their budgets in advance). Which trial runs
    next stays first-in first-out, as with one ASHA."""

    def __init__(
        self,
        grace_period: int = 1,
        reduction_factor: float = 2,
        time_attr: str = "epoch",
        budget_key: str = "epochs",
        metric: str | None = None,
        mode: str | None = None,
    ) -> None:
        super().__init__()
        self._grace_period = grace_period
        self._reduction_factor = reduction_factor
        self._time_attr = time_attr
        self._budget_key = budget_key
        self._metric = metric
        self._mode = mode
        self._by_budget: dict[int, AsyncHyperBandScheduler] = {}
        self._budget_of: dict[str, int] = {}

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        if (self._metric and metric) or (self._mode and mode):
            return False
        self._metric = metric or self._metric
        self._mode = mode or self._mode
        for sub in self._by_budget.values():
            sub.set_search_properties(metric, mode, **spec)
        return True

    def budget(self, trial: Trial) -> int:
        return int(trial.config[self._budget_key])

    def scheduler_for(self, trial: Trial) -> AsyncHyperBandScheduler:
        """The ASHA of the trial's budget (made on first use)."""
        budget = self._budget_of.setdefault(trial.trial_id, self.budget(trial))
        if budget not in self._by_budget:
            self._by_budget[budget] = AsyncHyperBandScheduler(
                time_attr=self._time_attr,
                metric=self._metric,
                mode=self._mode,
                max_t=budget,
                grace_period=min(self._grace_period, budget),
                reduction_factor=self._reduction_factor,
            )
        return self._by_budget[budget]

    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        self.scheduler_for(trial).on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        return self.scheduler_for(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial: Trial, result: dict) -> None:
        self.scheduler_for(trial).on_trial_complete(tune_controller, trial, result)
        self._budget_of.pop(trial.trial_id, None)

    def on_trial_remove(self, tune_controller, trial: Trial) -> None:
        self.scheduler_for(trial).on_trial_remove(tune_controller, trial)
        self._budget_of.pop(trial.trial_id, None)

    def debug_string(self) -> str:
        return "\n".join(
            [f"Using one AsyncHyperBand per {self._budget_key} budget:"]
            + [f"{self._budget_key}={b}: {s.debug_string()}" for b, s in sorted(self._by_budget.items())]
        )

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))


class EpochBudgetStopper(Stopper):
    """Ends the experiment once its trials have reported `epochs` training epochs between them;
    the trials still running stop there (their last reported epoch is checkpointed and kept)."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs
        self.reported: dict[str, int] = {}

    def __call__(self, trial_id: str, result: dict) -> bool:
        epoch = int(result.get("epoch") or 0)  # 0: the base model's scores before training
        self.reported[trial_id] = max(self.reported.get(trial_id, 0), epoch)
        return False

    def stop_all(self) -> bool:
        return sum(self.reported.values()) >= self.epochs
