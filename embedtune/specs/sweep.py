"""A sweep spec (`sweeps/*.yaml`): models × datasets × a search space, and how to run it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from embedtune.specs.base import Strict, model_label
from embedtune.specs.data import DataSpec
from embedtune.specs.evaluation import FinalSpec
from embedtune.specs.metrics import (
    DEFAULT_LEADERBOARD_METRIC,
    DEFAULT_SWEEP_METRIC,
    GAIN_SUFFIX,
    HYPERPARAMS,
    SWEEP_NAME,
    check_leaderboard_metric,
    leaderboard_name,
)
from embedtune.specs.train import LOSS_HELP, Loss, MiningSpec, TrainSettings


class Distribution(Strict):
    """A sampled hyperparameter: `{distribution: loguniform, low: 1e-5, high: 1e-4}`."""

    distribution: Literal["uniform", "loguniform", "randint", "choice"]
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = None

    @model_validator(mode="after")
    def _check(self) -> Distribution:
        if self.distribution == "choice":
            if not self.values:
                raise ValueError("choice needs a non-empty 'values' list")
        elif self.low is None or self.high is None or self.low >= self.high:
            raise ValueError(f"{self.distribution} needs low < high")
        return self

    @property
    def largest(self) -> float:
        return max(self.values) if self.values else float(self.high)


# Trials a time budget starts at most (Tune needs a number; the disk check counts their
# checkpoints): 45 minutes on 2 CPU cores start about 10-20, a GPU several times more.
AUTO_MAX_TRIALS = 60


class Budget(Strict):
    """What `search.mode: auto` may spend on its trials: minutes of the trial phase, or epochs
    trained summed over the trials (an epoch of a trial the scheduler stops early counts; the rest
    of its planned epochs do not)."""

    minutes: float | None = Field(None, gt=0, description="wall minutes of the trial phase (per sweep call)")
    trial_epochs: int | None = Field(None, ge=1, description="training epochs summed over all trials")
    max_trials: int = Field(
        AUTO_MAX_TRIALS,
        ge=1,
        description="with minutes: trials the search starts at most (the disk check before the sweep "
        "counts this many trials' checkpoints)",
    )

    @model_validator(mode="after")
    def _one(self) -> Budget:
        if (self.minutes is None) == (self.trial_epochs is None):
            raise ValueError("give exactly one of minutes or trial_epochs, e.g. {minutes: 45}")
        return self

    @property
    def trials(self) -> int:
        """Trials the search may start: one per epoch of an epoch budget (the stopper ends it
        sooner), else max_trials."""
        return self.trial_epochs or self.max_trials


# What `search.mode: auto` searches on an axis the spec leaves out (an axis it gives, as a list or
# a distribution, is searched as given). Ranges around sentence-transformers' defaults for
# MiniLM-size models: lr 2e-5 (and the 5e-5..1e-4 that won on this project's data), warmup up to a
# fifth of an epoch, batch sizes a CPU trains at (the memory probe refuses what does not fit).
AUTO_SPACE: dict[str, Any] = {
    "epochs": [1, 2, 3],
    "lr": {"distribution": "loguniform", "low": 1e-5, "high": 2e-4},
    "batch_size": {"distribution": "choice", "values": [16, 32, 64]},
    "warmup_ratio": {"distribution": "uniform", "low": 0.0, "high": 0.2},
}
AUTO_LOSSES = ["mnrl", "gist"]  # when neither search.loss nor train.loss is given
AUTO_BUDGET = {"minutes": 45}  # the trial phase of an about-an-hour run on a 2-core machine


class SearchSpace(Strict):
    """Each entry: a list (grid axis, or a choice when sampling) or a distribution."""

    mode: Literal["grid", "random", "optuna", "auto"] = Field(
        "auto",
        description="auto (the default): Optuna's TPE with the scheduler's early stopping, drawing "
        "until `budget` is spent, over the axes given and AUTO_SPACE's ranges for the axes left out "
        "(and the loss: mnrl or gist); grid: every combination of the lists (a study's full table); "
        "random / optuna: num_samples draws",
    )
    num_samples: int = Field(1, ge=1, description="grid: repeats of the grid; random/optuna: trials")
    budget: Budget | None = Field(None, description="mode auto: {minutes: M} or {trial_epochs: N}")
    epochs: list[int] | Distribution = [1]
    epochs_mode: Literal["branch", "separate"] = Field(
        "branch",
        description="branch: configurations that differ only in `epochs` are ONE run to the largest "
        "epoch count with a learning-rate schedule that does not depend on the total (linear warmup "
        "over warmup_ratio of one epoch, then constant), checkpointed and reported at each listed "
        "epoch count; separate: one run per epoch count with warmup + linear decay over its own "
        "total (the study's setup, reproduced exactly)",
    )
    lr: list[float] | Distribution = [2e-5]
    batch_size: list[int] | Distribution = [32]
    warmup_ratio: list[float] | Distribution = [0.1]
    seed: list[int] | Distribution = [42]
    loss: list[Loss] | None = Field(
        None,
        description="losses to compare, one trial each (a choice when sampling); None: train.loss alone. "
        + LOSS_HELP,
    )
    second_seed: bool | None = Field(
        None,
        description="after the search, train each dataset's best configuration (the best trial that "
        "beats its base model) again with seed + 1, to the same epoch count, as one more trial each; "
        "the report gives the spread of the two and calls a gain real only if it holds for both "
        "seeds. None: on in mode auto, off otherwise (a grid listing several seeds has its twins already)",
    )

    @field_validator("epochs")
    @classmethod
    def _epochs(cls, v):
        if isinstance(v, list) and (not v or any(e < 1 for e in v)):
            raise ValueError("epochs must be a non-empty list of integers >= 1")
        return v

    @field_validator("batch_size")
    @classmethod
    def _batch(cls, v):
        if isinstance(v, list) and (not v or any(b < 2 for b in v)):
            raise ValueError("batch_size values must be >= 2 (MNRL needs in-batch negatives)")
        return v

    @field_validator("loss")
    @classmethod
    def _loss(cls, v):
        if v is not None and (not v or len(set(v)) != len(v)):
            raise ValueError("search.loss must list distinct losses (or be left out: train.loss)")
        return v

    @field_validator("lr")
    @classmethod
    def _lr(cls, v):
        if isinstance(v, list) and (not v or any(not 0 < x < 1 for x in v)):
            raise ValueError("lr values must be in (0, 1)")
        return v

    @model_validator(mode="after")
    def _auto(self) -> SearchSpace:
        if self.mode != "auto":
            if self.budget is not None:
                raise ValueError(f"budget is for mode: auto (mode is {self.mode}; it runs num_samples)")
            return self
        for axis, value in AUTO_SPACE.items():
            if axis not in self.model_fields_set:
                setattr(self, axis, Distribution(**value) if isinstance(value, dict) else list(value))
                self.model_fields_set.add(axis)  # spelled out when the spec is stored
        if self.budget is None:
            self.budget = Budget(**AUTO_BUDGET)
            self.model_fields_set.add("budget")
        return self

    @property
    def checks_second_seed(self) -> bool:
        return self.mode == "auto" if self.second_seed is None else self.second_seed

    @property
    def draws(self) -> int:
        """Trials a sampled search may start: num_samples, or in auto mode what the budget allows
        (an epoch budget starts at most one trial per epoch; the stopper ends it sooner)."""
        if self.mode != "auto":
            return self.num_samples
        assert self.budget is not None
        return self.budget.trials

    @model_validator(mode="after")
    def _grid_takes_lists(self) -> SearchSpace:
        if self.mode == "grid" and any(isinstance(getattr(self, k), Distribution) for k in HYPERPARAMS):
            raise ValueError("grid mode takes lists only; use mode: random or optuna for distributions")
        if self.epochs_mode == "branch" and isinstance(self.epochs, Distribution):
            raise ValueError(
                "search.epochs_mode: branch checkpoints one run at each listed epoch count, so "
                "search.epochs must be a list (e.g. [1, 2, 3]); or set search.epochs_mode: separate "
                "to sample epochs as a hyperparameter"
            )
        return self

    @property
    def branch(self) -> bool:
        return self.epochs_mode == "branch"

    @property
    def max_epochs(self) -> int:
        e = self.epochs
        return int(e.largest) if isinstance(e, Distribution) else max(e)


class Resources(Strict):
    cpu: float = Field(1, gt=0)
    gpu: float = Field(0, ge=0, description="whole or fractional GPUs per trial (0.5 = two trials per GPU)")

    @field_validator("gpu")
    @classmethod
    def _gpu(cls, v: float) -> float:
        if v > 1 and v != int(v):
            raise ValueError("more than one GPU per trial must be a whole number")
        return v


class SchedulerSpec(Strict):
    type: Literal["asha", "none"] = "asha"
    metric: str = DEFAULT_SWEEP_METRIC
    mode: Literal["max", "min"] = "max"
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2, gt=1)
    compare: Literal["gain", "absolute"] = Field(
        "gain",
        description="gain: rank trials by `metric` minus their own base model's score on their own "
        "dataset, so trials of different datasets and models compete fairly (an easy dataset's "
        "weakest run would otherwise outrank a hard one's best); absolute: the raw metric",
    )

    @property
    def tune_metric(self) -> str:
        """The name Tune schedules, searches and ranks on."""
        return f"{self.metric}{GAIN_SUFFIX}" if self.compare == "gain" else self.metric


class MlflowSpec(Strict):
    tracking_uri: str | None = Field(
        None, description="None: $MLFLOW_TRACKING_URI if set, else a SQLite store in the run directory"
    )
    experiment: str | None = Field(None, description="None: embedtune-<sweep name>")
    log_models: bool = True
    outage_wait_s: float = Field(
        120,
        ge=0,
        description="when the tracking server is away as the trials end: seconds to wait for it before "
        "keeping the unsent records in mlflow_pending.json for the next run of the same command",
    )


class CheckpointSpec(Strict):
    keep: int = Field(
        1,
        ge=1,
        description="checkpoints kept per trial, best by the scheduler metric (search.epochs_mode: "
        "branch keeps at least one per listed epoch count: each is a result of its own)",
    )


class RaySpec(Strict):
    address: str | None = Field(None, description="None: a private local Ray (or RAY_ADDRESS when set)")
    num_cpus: int | None = Field(None, ge=1)
    num_gpus: float | None = Field(None, ge=0)


class SweepSpec(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    metric: str = Field(
        DEFAULT_LEADERBOARD_METRIC,
        description="the headline metric: it drives the scheduler, the best epoch, the winner, the "
        "verdicts, the plots and the registry (scheduler.metric, final.metric and "
        "final.leaderboard_metric follow it unless set)",
    )
    datasets: list[DataSpec] = Field(min_length=1)
    models: list[str] = Field(min_length=1)
    search: SearchSpace = SearchSpace()
    train: TrainSettings = TrainSettings()
    mining: MiningSpec = MiningSpec()
    resources: Resources = Resources()
    scheduler: SchedulerSpec = SchedulerSpec()
    max_concurrent_trials: int | None = Field(None, ge=1)
    storage_path: str | None = Field(
        None, description="Tune storage (local dir or s3://, gs://); None: the run dir"
    )
    mlflow: MlflowSpec = MlflowSpec()
    checkpoints: CheckpointSpec = CheckpointSpec()
    max_failures: int = Field(1, ge=0, description="retries of a failed trial (from its last checkpoint)")
    final: FinalSpec = FinalSpec()
    ray: RaySpec = RaySpec()

    @field_validator("models")
    @classmethod
    def _models(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("models must not repeat")
        if any(not m.strip() for m in v):
            raise ValueError("model references must not be empty")
        seen: dict[str, int] = {}
        for i, ref in enumerate(v):  # results are filed by label: two entries must not share one
            j = seen.setdefault(model_label(ref), i)
            if j != i:
                raise ValueError(
                    f"models.{j} {v[j]!r} and models.{i} {ref!r} both get the label {model_label(ref)!r} "
                    "(runs, results and report rows are keyed by it): the same model twice? keep one; "
                    "two different models? give their folders distinct names"
                )
        return v

    @field_validator("metric")
    @classmethod
    def _metric(cls, v: str) -> str:
        return check_leaderboard_metric(v)

    @model_validator(mode="after")
    def _one_metric(self) -> SweepSpec:
        """Fill the per-stage metric names from the headline `metric`; a stage metric set on its
        own that means another quantity is an error (the report would judge on one, the scheduler
        on another)."""
        if "metric" not in self.model_fields_set and "metric" in self.scheduler.model_fields_set:
            self.metric = leaderboard_name(self.scheduler.metric) or self.metric  # an older spec
        stages = [
            ("scheduler.metric", self.scheduler, "metric", SWEEP_NAME[self.metric]),
            ("final.metric", self.final, "metric", SWEEP_NAME[self.metric]),
            ("final.leaderboard_metric", self.final, "leaderboard_metric", self.metric),
        ]
        for key, owner, field, value in stages:
            if field not in owner.model_fields_set:
                setattr(owner, field, value)
                owner.model_fields_set.discard(field)  # still derived when the spec is stored and reloaded
                continue
            given = getattr(owner, field)
            meant = given if field == "leaderboard_metric" else leaderboard_name(given)
            if meant is not None and meant != self.metric:
                raise ValueError(
                    f"{key} is {given!r} but the headline metric is {self.metric!r}: set only `metric` "
                    "(every stage follows it) or make them name the same quantity"
                )
        return self

    @model_validator(mode="after")
    def _unique_labels(self) -> SweepSpec:
        labels = [d.label for d in self.datasets]
        if len(set(labels)) != len(labels):
            raise ValueError(f"dataset labels must be unique (got {labels}); set 'name' on each dataset")
        for i, ood in enumerate(self.final.ood):
            unknown = [x for x in ood.in_domain_for if x not in labels]
            if unknown:
                raise ValueError(
                    f"final.ood.{i}.in_domain_for names {', '.join(map(repr, unknown))}, not a dataset of "
                    f"this sweep (its labels: {', '.join(labels)})"
                )
        return self

    @field_validator("train")
    @classmethod
    def _one_loss_key(cls, train: TrainSettings, info: ValidationInfo) -> TrainSettings:
        # (a value check, not "was it set": a stored spec.json spells out every default)
        search = info.data.get("search")
        losses = search.loss if search is not None else None
        if losses is not None and train.loss != TrainSettings.model_fields["loss"].default:
            raise ValueError(
                f"train.loss ({train.loss}) and search.loss ({', '.join(losses)}) are both set: "
                "keep search.loss to compare losses, or train.loss for one"
            )
        return train

    @model_validator(mode="after")
    def _auto_loss(self) -> SweepSpec:
        """mode auto searches the loss too unless the spec names one (search.loss or train.loss)."""
        if (
            self.search.mode == "auto"
            and "loss" not in self.search.model_fields_set
            and "loss" not in self.train.model_fields_set
            and self.search.loss is None
        ):
            self.search.loss = list(AUTO_LOSSES)
            self.search.model_fields_set.add("loss")
        return self

    @property
    def losses(self) -> list[str]:
        """The losses the sweep trains with: search.loss, else train.loss alone."""
        return list(self.search.loss or [self.train.loss])

    @property
    def experiment(self) -> str:
        return self.mlflow.experiment or f"embedtune-{self.name}"

    @property
    def checkpoints_to_keep(self) -> int:
        """Tune's `num_to_keep`: in branch mode only the listed epoch counts are checkpointed, and
        every one of them is kept (each is the result of its own epoch count)."""
        if self.search.branch and isinstance(self.search.epochs, list):
            return max(self.checkpoints.keep, len(set(self.search.epochs)))
        return self.checkpoints.keep
