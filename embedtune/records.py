"""Typed records that cross stage boundaries: a trial's record, a model to evaluate, the
do-no-harm and probe results. Each rule about them (the best epoch, which trials are usable, how
a (model, dataset) pair is keyed) is written once, here."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, NamedTuple

from embedtune.specs.metrics import DEFAULT_LEADERBOARD_METRIC

DONE_STATUSES = ("FINISHED", "KILLED")  # KILLED = stopped by the scheduler: done, not to be rerun


class ModelData(NamedTuple):
    """The one key of a (base model reference, dataset label) pair."""

    model: str
    dataset: str


def number(value: Any) -> float | None:
    """`value` as a float, or None when it is missing, not a number, or NaN."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


@dataclass
class EpochPoint:
    """One point of a trial's curve; epoch 0 is the untouched base model."""

    epoch: int
    metrics: dict[str, float]

    def score(self, metric: str) -> float | None:
        return number(self.metrics.get(metric))


def best_point(history: list[EpochPoint], metric: str, mode: str = "max") -> EpochPoint | None:
    """The trained epoch (> 0) with the best `metric` (ties: the earlier epoch); None without one."""
    scored = [p for p in history if p.epoch > 0 and p.score(metric) is not None]
    if not scored:
        return None
    sign = 1.0 if mode == "max" else -1.0
    return max(scored, key=lambda p: (sign * p.score(metric), -p.epoch))


@dataclass
class TrialRecord:
    """One (config, epochs) of a sweep, as `trials.json` stores it (docs/INTERFACES.md).

    search.epochs_mode separate: one Tune trial each; `best_epoch` is the trial's best epoch.
    branch: the epoch counts of one config are one Tune trial (`tune_trial_id`), recorded once per
    listed count: `history` up to that count, `best_*` = its checkpoint and metrics at exactly that
    count (the shorter counts are records of their own). The longest count keeps the Tune trial's
    id, a shorter one is `<tune trial id>-e<count>`. A count the run never reached (stopped by the
    scheduler, or failed before) has no checkpoint: KILLED or FAILED, not usable."""

    trial_id: str
    config_hash: str
    model: str  # reference as given in the spec
    model_label: str
    dataset: str  # data label
    epochs: int
    lr: float
    batch_size: int
    warmup_ratio: float
    seed: int
    status: Literal["FINISHED", "KILLED", "FAILED"]
    error: str | None = None
    duration_s: float = 0.0
    gpu_seconds: float | None = None
    epochs_done: int = 0
    history: list[EpochPoint] = field(default_factory=list)
    best_epoch: int | None = None
    best_metrics: dict[str, float] = field(default_factory=dict)
    best_checkpoint: str | None = None  # a local folder or a URI holding `model/`
    mlflow_run_id: str | None = None
    lr_schedule: str = "linear"  # "constant_with_warmup" in branch mode
    tune_trial_id: str | None = None  # the Tune trial (and MLflow run) that trained it; None: trial_id
    loss: str | None = None  # its training loss (train.loss or search.loss); None: a record from before

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrialRecord:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in raw.items() if k in known}
        values["history"] = [
            p if isinstance(p, EpochPoint) else EpochPoint(int(p["epoch"]), dict(p.get("metrics") or {}))
            for p in raw.get("history") or []
        ]
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def key(self) -> ModelData:
        return ModelData(str(self.model), str(self.dataset))

    @property
    def done(self) -> bool:
        return self.status in DONE_STATUSES

    @property
    def run_trial_id(self) -> str:
        """The Tune trial that trained this record (its MLflow run's trial tag)."""
        return self.tune_trial_id or self.trial_id

    @staticmethod
    def best_first(metric: str, mode: str = "max"):
        """Sort key that puts the best trial first: its `metric` at its best epoch (highest for mode
        max), then fewer epochs, then trial id, so the same trials always sort alike."""
        sign = -1.0 if mode == "max" else 1.0
        return lambda t: (sign * t.score(metric), int(t.best_epoch or 0), str(t.trial_id))

    @property
    def recipe(self) -> tuple:
        """Everything of its config but the seed: trials with the same recipe and different seeds
        are seed twins (`search.second_seed`)."""
        return (
            str(self.model),
            str(self.dataset),
            int(self.epochs),
            float(self.lr),
            int(self.batch_size),
            float(self.warmup_ratio),
            self.loss,
            self.lr_schedule,
        )

    def score(self, metric: str) -> float | None:
        """`metric` at the best epoch."""
        return number(self.best_metrics.get(metric))

    def base_score(self, metric: str) -> float | None:
        """`metric` of the base model (epoch 0 of the history)."""
        base = next((p for p in self.history if p.epoch == 0), None)
        return base.score(metric) if base else None

    def usable(self, metric: str) -> bool:
        """Can the final stage evaluate this trial: not FAILED, has a checkpoint, a best epoch and a score."""
        return (
            self.status != "FAILED"
            and bool(self.best_checkpoint)
            and self.best_epoch is not None
            and self.score(metric) is not None
        )

    def hyperparams(self) -> tuple:
        """The hyperparameters other than epochs: runs that share them differ only in length."""
        return (self.lr, self.batch_size, self.seed, self.warmup_ratio, self.loss)

    def order(self) -> tuple:
        return (self.dataset or "", self.model_label or "", self.epochs or 0, self.trial_id or "")


def load_trials(raw: list[dict[str, Any]] | None) -> list[TrialRecord]:
    return [TrialRecord.from_dict(r) for r in raw or []]


def dump_trials(trials: list[TrialRecord]) -> list[dict[str, Any]]:
    return [t.to_dict() for t in trials]


@dataclass
class ModelEntry:
    """One model to evaluate: a base model or a tuned checkpoint of a sweep trial."""

    label: str
    path: str  # local sentence-transformers directory (a base model: its reference until resolved)
    base_model: str  # label of the base model
    kind: Literal["base", "tuned", "truncated"] = "base"  # truncated: its embedding cut (`TRUNCATED`)
    trial_id: str | None = None
    epochs: int | None = None


TRUNCATED = "truncated"  # a leaderboard row of a model's embedding cut to its first d dimensions


@dataclass
class EncodeCost:
    """What encoding with one model costs on the machine that ran the final stage: the backend,
    corpus documents per second, embedding dimension, size on disk of what the backend runs (the
    model folder for torch, the export otherwise) and the seconds its export took (0: reused)."""

    encode_backend: str
    docs_per_s: float
    dim: int
    size_mb: float
    export_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


ENCODE_COST_COLUMNS = [f.name for f in fields(EncodeCost)]


FORGET_MARGIN = 0.01  # a loss of 1 point (0.01 of a score in [0, 1]) is the one worth ruling out


@dataclass
class HarmRow:
    """The do-no-harm comparison of one dataset's winner with its base model on one OOD set."""

    dataset: str
    ood: str
    ood_source: str
    base_model: str
    winner: str
    base_score: float
    winner_score: float
    delta: float
    ci_low: float
    ci_high: float
    p_value: float
    band: float
    n_queries: int
    flag: str  # "harm" or ""
    # hit@10 of the same pairs: winner − base and its paired-bootstrap interval. None in a store
    # written before they were kept (then the forgetting verdict cannot rule out a loss).
    hit_at_10_delta: float | None = None
    hit_at_10_ci_low: float | None = None
    hit_at_10_ci_high: float | None = None

    def intervals(self, metric: str) -> dict[str, tuple[float, float, float] | None]:
        """{metric: (delta, low, high)} on the headline `metric` and on hit@10 (one entry when the
        headline is hit@10); None for an interval this row does not hold."""

        def one(d: Any, lo: Any, hi: Any) -> tuple[float, float, float] | None:
            vals = (number(d), number(lo), number(hi))
            return None if None in vals else vals  # type: ignore[return-value]

        out = {metric: one(self.delta, self.ci_low, self.ci_high)}
        if metric != "hit_at_10":
            out["hit_at_10"] = one(self.hit_at_10_delta, self.hit_at_10_ci_low, self.hit_at_10_ci_high)
        return out

    def forgetting(self, metric: str) -> str:
        """The forgetting verdict of this OOD set: "harm" (the flag: a significant drop), else "no
        loss beyond 1 point" only when every interval (headline metric and hit@10) lies above
        −`FORGET_MARGIN`, "cannot tell" when one reaches below it, and "cannot tell (no interval
        stored)" when the row lacks one (a store written before hit@10 intervals were kept)."""
        if self.flag == "harm":
            return "harm"
        spans = self.intervals(metric).values()
        if any(s is None for s in spans):
            return "cannot tell (no interval stored)"
        if all(s[1] >= -FORGET_MARGIN for s in spans if s is not None):
            return "no loss beyond 1 point"
        return "cannot tell"


@dataclass
class HarmCheck:
    """Everything the do-no-harm check found (stored as report/harm.json)."""

    metric: str = DEFAULT_LEADERBOARD_METRIC
    alpha: float = 0.05
    test: str = "exact McNemar on per-query hits (embedtune.stats)"
    seconds: float = 0.0
    rows: list[HarmRow] = field(default_factory=list)
    results: list[dict[str, Any]] = field(default_factory=list)  # the OOD evaluation rows
    hits: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # ood -> model -> per-query
    not_checked: dict[str, str] = field(default_factory=dict)  # dataset -> why its winner was not checked

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> HarmCheck:
        raw = dict(raw or {})
        known = {f.name for f in fields(cls)}
        rows = [
            HarmRow(**{k: v for k, v in r.items() if k in HarmRow.__dataclass_fields__})
            for r in raw.get("rows") or []
        ]
        return cls(**{**{k: v for k, v in raw.items() if k in known}, "rows": rows})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def for_dataset(self, dataset: str) -> list[HarmRow]:
        return [r for r in self.rows if r.dataset == str(dataset)]
