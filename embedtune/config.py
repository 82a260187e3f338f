"""Sweep specs: a YAML file validated by pydantic before Ray starts.

Unknown keys and bad values fail with a one-line error naming the key path, e.g.
`sweeps/x.yaml: search.epochs.0: Input should be greater than or equal to 1`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from embedtune.data import DataSpec
from embedtune.errors import EmbedtuneError
from embedtune.finalize import FinalSpec
from embedtune.negatives import MiningSpec
from embedtune.train import DEFAULT_METRIC


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Distribution(_Strict):
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


class SearchSpace(_Strict):
    """Each entry: a list (grid axis, or a choice when sampling) or a distribution."""

    mode: Literal["grid", "random", "optuna"] = "grid"
    num_samples: int = Field(1, ge=1, description="grid: repeats of the grid; random/optuna: trials")
    epochs: list[int] | Distribution = [1]
    lr: list[float] | Distribution = [2e-5]
    batch_size: list[int] | Distribution = [32]
    warmup_ratio: list[float] | Distribution = [0.1]
    seed: list[int] | Distribution = [42]

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

    @field_validator("lr")
    @classmethod
    def _lr(cls, v):
        if isinstance(v, list) and (not v or any(not 0 < x < 1 for x in v)):
            raise ValueError("lr values must be in (0, 1)")
        return v

    @model_validator(mode="after")
    def _optuna_needs_samples(self) -> SearchSpace:
        if self.mode == "grid" and any(isinstance(getattr(self, k), Distribution) for k in HYPERPARAMS):
            raise ValueError("grid mode takes lists only; use mode: random or optuna for distributions")
        return self


HYPERPARAMS = ("epochs", "lr", "batch_size", "warmup_ratio", "seed")


class TrainSettings(_Strict):
    """Fixed training settings shared by every trial."""

    max_seq_length: int | None = Field(128, ge=8)
    hard_negatives: bool = True
    weight_decay: float = Field(0.01, ge=0)
    fp16: bool = False


class Resources(_Strict):
    cpu: float = Field(1, gt=0)
    gpu: float = Field(0, ge=0, description="whole or fractional GPUs per trial (0.5 = two trials per GPU)")

    @field_validator("gpu")
    @classmethod
    def _gpu(cls, v: float) -> float:
        if v > 1 and v != int(v):
            raise ValueError("more than one GPU per trial must be a whole number")
        return v


GAIN_SUFFIX = "_gain"  # reported by each trial: metric minus its base model's score


class SchedulerSpec(_Strict):
    type: Literal["asha", "none"] = "asha"
    metric: str = DEFAULT_METRIC
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


class MlflowSpec(_Strict):
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


class CheckpointSpec(_Strict):
    keep: int = Field(1, ge=1, description="checkpoints kept per trial, best by the scheduler metric")


class RaySpec(_Strict):
    address: str | None = Field(None, description="None: a private local Ray (or RAY_ADDRESS when set)")
    num_cpus: int | None = Field(None, ge=1)
    num_gpus: float | None = Field(None, ge=0)


class SweepSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
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
        return v

    @model_validator(mode="after")
    def _unique_labels(self) -> SweepSpec:
        labels = [d.label for d in self.datasets]
        if len(set(labels)) != len(labels):
            raise ValueError(f"dataset labels must be unique (got {labels}); set 'name' on each dataset")
        return self

    @property
    def experiment(self) -> str:
        return self.mlflow.experiment or f"embedtune-{self.name}"


def _format_error(source: str, exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(x) for x in err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check its spelling)"
        parts.append(
            f"{loc}: {msg}" + (f" (got {err['input']!r})" if err["type"] != "extra_forbidden" else "")
        )
    more = f" (+{len(exc.errors()) - 3} more)" if len(exc.errors()) > 3 else ""
    return f"{source}: " + "; ".join(parts) + more


def parse_spec(raw: dict[str, Any], source: str = "sweep spec") -> SweepSpec:
    if not isinstance(raw, dict):
        raise EmbedtuneError(f"{source}: expected a mapping of keys at the top level")
    try:
        return SweepSpec.model_validate(raw)
    except ValidationError as exc:
        raise EmbedtuneError(_format_error(source, exc)) from exc


def load_spec(path: str | Path) -> SweepSpec:
    path = Path(path)
    if not path.exists():
        raise EmbedtuneError(f"sweep spec not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise EmbedtuneError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from exc
    except UnicodeDecodeError as exc:
        raise EmbedtuneError(f"{path}: not UTF-8 text") from exc
    spec = parse_spec(raw, str(path))
    # Relative local data paths are relative to the spec file, not the cwd.
    for ds in spec.datasets:
        src = ds.source
        if not src.startswith("hf:") and not Path(src).is_absolute() and (path.parent / src).exists():
            ds.source = str((path.parent / src).resolve())
    return spec


def safe_name(text: str) -> str:
    return re.sub(r"[^\w.-]+", "_", text)
