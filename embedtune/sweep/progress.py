"""One progress line for the whole sweep (instead of Tune's per-trial status tables): trials done
of total, running, errored, the best score so far and tqdm's ETA."""

from __future__ import annotations

import math
from typing import Any

from ray.tune import Callback


class SweepProgress(Callback):
    """A tqdm bar over the sweep's trials, updated from Tune's driver-side callback hooks."""

    def __init__(self, total: int, metric: str, mode: str = "max") -> None:
        self.total = total
        self.metric = metric
        self.sign = 1.0 if mode == "max" else -1.0
        self.best = -math.inf
        self.running: set[str] = set()
        self.done = 0
        self.errored = 0
        self._bar: Any = None

    def _open(self) -> Any:
        if self._bar is None:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, desc="sweep", unit="trial", dynamic_ncols=True, disable=False)
        return self._bar

    def _show(self) -> None:
        bar = self._open()
        best = "" if self.best == -math.inf else f"{self.sign * self.best:.4f}"
        bar.set_postfix(
            {"running": len(self.running), "errored": self.errored, f"best {self.metric}": best}, refresh=True
        )

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.running.add(trial.trial_id)
        self._show()

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        value = result.get(self.metric)
        if isinstance(value, int | float) and not math.isnan(value):
            self.best = max(self.best, self.sign * float(value))
        self._show()

    def _finish(self, trial, errored: bool) -> None:
        self.running.discard(trial.trial_id)
        self.errored += errored
        self.done += 1
        self._open().update(1)
        self._show()

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._finish(trial, errored=False)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._finish(trial, errored=True)

    def on_experiment_end(self, trials, **info) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __getstate__(self) -> dict[str, Any]:  # Tune saves callbacks with its experiment state
        return {**self.__dict__, "_bar": None}
