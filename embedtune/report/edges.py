"""Advice at the edge of the search: when the best trial of a dataset used the largest (or smallest)
value a searched axis offered, the optimum may lie beyond what was searched, and the spec change to
look there is named ("best epochs = 3, the largest searched: the metric was still rising; try
search.epochs: [2, 3, 4, 5]").

A pure function of the trial records and the sweep spec (`edge_advice`): the report's summary and
the sweep's printed output both show it. Only searched axes count: a list of one value is a fixed
setting, and `seed` is no hyperparameter to tune. An edge that is a hard bound of the axis (1 epoch,
warmup 0, batch size 2) names no change: there is nothing beyond it to search.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from embedtune.records import TrialRecord
from embedtune.specs import Distribution, SweepSpec

AXES = ("epochs", "lr", "batch_size", "warmup_ratio")
LOG_AXES = ("lr", "batch_size")  # searched by factors (1e-5, 2e-5, 5e-5; 16, 32, 64), not by steps
INTS = ("epochs", "batch_size")
# Where each axis ends for good: (lowest allowed, highest allowed or None); `open` ends are excluded.
BOUNDS: dict[str, tuple[float, float | None]] = {
    "epochs": (1, None),
    "lr": (0, 1),
    "batch_size": (2, None),
    "warmup_ratio": (0, 1),
}
OPEN = {("lr", 0), ("lr", 1), ("warmup_ratio", 1)}
RANGE_EDGE = 0.1  # a sampled best in the outer tenth of its range (log scale for loguniform) is at its edge
WORDS = {"epochs": ("smallest", "largest"), "batch_size": ("smallest", "largest")}


@dataclass
class EdgeAdvice:
    """One axis of one dataset's best trial at the edge of what was searched."""

    dataset: str
    axis: str
    value: float
    edge: str  # "upper" or "lower"
    model: str  # the best trial's base model
    trial_id: str
    rising: bool | None  # epochs at the upper edge: whether the curve still rose into it (None: not shown)
    suggestion: str  # the new value of `search.<axis>`, as YAML
    text: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def yaml_number(x: float, axis: str) -> str:
    """`x` as a YAML number that reads back as itself: an int for the integer axes, else a float
    with 3 significant digits and a dot (PyYAML reads `5e-05` as a string, `5.0e-05` as a float)."""
    if axis in INTS:
        return str(int(round(x)))
    text = f"{x:.3g}"
    mantissa, _, exp = text.partition("e")
    if "." not in mantissa:
        mantissa += ".0"
    return f"{mantissa}e{exp}" if exp else mantissa


def _allowed(axis: str, x: float) -> bool:
    low, high = BOUNDS[axis]
    above = x > low if (axis, low) in OPEN else x >= low
    below = high is None or (x < high if (axis, high) in OPEN else x <= high)
    return above and below


def _clean(axis: str, values: list[float]) -> list[float]:
    """Allowed, distinct (after rounding to what the YAML shows), sorted."""
    out = {}
    for x in values:
        x = float(int(round(x))) if axis in INTS else float(f"{x:.3g}")
        if _allowed(axis, x):
            out[x] = x
    return sorted(out)


def _beyond(axis: str, values: list[float], best: float, edge: str) -> list[float] | None:
    """New values of a list axis: the neighbour inside, the best and two more steps (or factors, on
    a log axis) beyond it, spaced like the two listed values at that edge. None when the axis's
    bound leaves nothing beyond."""
    inner = values[-2] if edge == "upper" else values[1]
    sign = 1 if edge == "upper" else -1
    if axis in LOG_AXES:
        factor = max(best, inner) / min(best, inner)
        step = [best * factor ** (sign * k) for k in (1, 2)]
    else:
        gap = abs(best - inner)
        step = [best + sign * gap * k for k in (1, 2)]
    new = _clean(axis, step)
    new = [x for x in new if (x > best if edge == "upper" else x < best)]
    if not new:
        return None
    return _clean(axis, [inner, best, *new])


def _range_beyond(axis: str, dist: Distribution, best: float) -> tuple[float, float] | None:
    """A range of the same width (a factor on a log scale) centred on `best`, clipped to the axis's
    bounds; None when clipping leaves it no further out than the old one."""
    low, high = float(dist.low), float(dist.high)
    if dist.distribution == "loguniform":
        half = math.sqrt(high / low)
        new_low, new_high = best / half, best * half
    else:
        half = (high - low) / 2
        new_low, new_high = best - half, best + half
    lo_bound, hi_bound = BOUNDS[axis]
    new_low = max(new_low, lo_bound) if (axis, lo_bound) not in OPEN else max(new_low, lo_bound + 1e-12)
    if hi_bound is not None:
        new_high = min(new_high, hi_bound * (0.999 if (axis, hi_bound) in OPEN else 1))
    if axis in INTS:
        new_low, new_high = float(math.floor(new_low)), float(math.ceil(new_high))
    if new_high <= high and new_low >= low:
        return None
    return new_low, new_high


def _position(dist: Distribution, x: float) -> float:
    """Where `x` lies in the range, 0 (low) to 1 (high); on a log scale for loguniform."""
    low, high = float(dist.low), float(dist.high)
    if dist.distribution == "loguniform":
        return math.log(x / low) / math.log(high / low)
    return (x - low) / (high - low)


def axis_value(record: TrialRecord, axis: str) -> float | None:
    """The value of `axis` the record's best model was trained with: for epochs, the epoch of its
    best checkpoint (a run of 3 epochs whose best checkpoint is epoch 2 stands for 2 epochs)."""
    if axis == "epochs":
        return float(record.best_epoch if record.best_epoch is not None else record.epochs)
    value = getattr(record, axis, None)
    return None if value is None else float(value)


def best_records(trials: list[TrialRecord], spec: SweepSpec) -> dict[str, TrialRecord]:
    """Each dataset's best trial, ranked as the sweep ranks them (`scheduler.compare`: the gain
    over the trial's own base model, or the raw metric; ties: fewer epochs)."""
    metric, sign = spec.scheduler.metric, 1.0 if spec.scheduler.mode == "max" else -1.0
    ranked: dict[str, tuple[tuple, TrialRecord]] = {}
    for t in trials:
        score = t.score(metric)
        if t.status == "FAILED" or score is None:
            continue
        if spec.scheduler.compare == "gain":
            base = t.base_score(metric)
            score -= base if base is not None else score
        key = (sign * score, -(axis_value(t, "epochs") or 0), str(t.trial_id))
        if str(t.dataset) not in ranked or key > ranked[str(t.dataset)][0]:
            ranked[str(t.dataset)] = (key, t)
    return {ds: t for ds, (_, t) in sorted(ranked.items())}


def last_step(record: TrialRecord, epoch: int, metric: str) -> tuple[float, float, int] | None:
    """(score at the trained epoch before `epoch`, score at `epoch`, that epoch before) from the
    record's curve; None when the curve does not hold both points."""
    before = [p for p in record.history if 0 < p.epoch < epoch and p.score(metric) is not None]
    at = next((p for p in record.history if p.epoch == epoch), None)
    if not before or at is None or at.score(metric) is None:
        return None
    prev = max(before, key=lambda p: p.epoch)
    return prev.score(metric), at.score(metric), prev.epoch


def _advice_for(record: TrialRecord, axis: str, searched, spec: SweepSpec) -> EdgeAdvice | None:
    value = axis_value(record, axis)
    if value is None:
        return None
    is_range = isinstance(searched, Distribution) and searched.distribution != "choice"
    if is_range:
        pos = _position(searched, value)
        edge = "upper" if pos >= 1 - RANGE_EDGE else "lower" if pos <= RANGE_EDGE else None
        span = _range_beyond(axis, searched, value) if edge else None
        if span is None:
            return None
        d = searched.distribution
        suggestion = (
            f"{{distribution: {d}, low: {yaml_number(span[0], axis)}, high: {yaml_number(span[1], axis)}}}"
        )
        where = (
            f"in the {'top' if edge == 'upper' else 'bottom'} tenth of the searched range "
            f"{d} [{yaml_number(searched.low, axis)}, {yaml_number(searched.high, axis)}]"
        )
    else:
        values = sorted(
            {float(v) for v in (searched.values if isinstance(searched, Distribution) else searched)}
        )
        if len(values) < 2:
            return None  # one value: a fixed setting, not searched
        edge = "upper" if value >= values[-1] else "lower" if value <= values[0] else None
        new = _beyond(axis, values, value, edge) if edge else None
        if new is None:
            return None
        suggestion = "[" + ", ".join(yaml_number(x, axis) for x in new) + "]"
        low_word, high_word = WORDS.get(axis, ("lowest", "highest"))
        where = f"the {high_word if edge == 'upper' else low_word} searched"
    rising = None
    text = f"best {axis} = {yaml_number(value, axis)}, {where}"
    if axis == "epochs" and edge == "upper":
        step = last_step(record, int(value), spec.scheduler.metric)
        rising = None if step is None else step[1] > step[0]
        if rising:
            text += (
                f": the metric was still rising ({spec.scheduler.metric} {step[0]:.3f} → {step[1]:.3f} "
                f"from epoch {step[2]} to {int(value)})"
            )
    text += f"; try `search.{axis}: {suggestion}`"
    return EdgeAdvice(
        str(record.dataset), axis, value, edge, str(record.model_label or record.model),
        str(record.trial_id), rising, suggestion, text,
    )  # fmt: skip


def edge_advice(trials: list[TrialRecord], spec: SweepSpec) -> dict[str, list[EdgeAdvice]]:
    """Per dataset: each searched axis (epochs, lr, batch_size, warmup_ratio) whose value in the
    dataset's best trial (`best_records`) sits at the edge of what was searched, with the change of
    `search.<axis>` that looks beyond it. Lists: the largest or smallest listed value; ranges
    (random/optuna): the outer tenth of the range (log scale for loguniform). Datasets without
    such an axis are left out."""
    out: dict[str, list[EdgeAdvice]] = {}
    for ds, record in best_records(trials, spec).items():
        found = [
            a
            for axis in AXES
            if (a := _advice_for(record, axis, getattr(spec.search, axis), spec)) is not None
        ]
        if found:
            out[ds] = found
    return out


def edge_lines(advice: dict[str, list[EdgeAdvice]]) -> list[str]:
    """One line per advice, "<dataset>: <text>" (backticks dropped: for a terminal)."""
    return [f"{a.dataset}: {a.text.replace('`', '')}" for items in advice.values() for a in items]
