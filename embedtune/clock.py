"""Where a run's time went: the measured wall time of each stage (`StageClock`), and that as one line.

Stage names are paths: `final/scoring/medquad` is a part of `final/scoring`, itself a part of
`final`. A stage timed twice adds up (one per dataset, say); a stage that did not run this time is
`skip`ped: 0 s and the reason, so a resumed sweep whose trials were done says so instead of showing
a few milliseconds of checking. The clock's dict form (`to_dict`) is what the run stores (the
report's `meta.json`, as `timings`) and `time_line` reads it back.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

# How the line names a stage (the last part of its path); others are shown as named.
LABELS = {
    "base_scores": "base scores",
    "final": "final stage",
    "cross_encoder": "cross-encoder",
    "scoring": "ingest+scoring",
    "harm": "do-no-harm",
    "epochs": "epoch comparison",
    "served": "served tables",
}
METRIC_PREFIX = "time/"  # MLflow: time/<stage>_s, time/total_s


class StageClock:
    """Wall time per stage since the clock was made (see the module docstring)."""

    def __init__(self) -> None:
        self._start = time.perf_counter()
        self.stages: dict[str, float] = {}  # in the order the stages started
        self.skipped: dict[str, str] = {}  # stage -> why it did not run

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the block as `name` (added to what `name` already has; kept when the block raises)."""
        self.stages.setdefault(name, 0.0)
        self.skipped.pop(name, None)
        t = time.perf_counter()
        try:
            yield
        finally:
            self.stages[name] += time.perf_counter() - t

    def skip(self, name: str, why: str) -> None:
        """`name` did not run this time: 0 s (any time measured for it, deciding there was nothing
        to do, is dropped) and `why`."""
        self.stages[name] = 0.0
        self.skipped[name] = why

    def ran(self, name: str) -> bool:
        return name in self.stages and name not in self.skipped

    def total(self) -> float:
        return time.perf_counter() - self._start

    def to_dict(self) -> dict[str, Any]:
        """{"total_s": seconds so far, "stages": {name: seconds}, "skipped": {name: why}}."""
        return {"total_s": self.total(), "stages": dict(self.stages), "skipped": dict(self.skipped)}

    def flat(self) -> dict[str, float]:
        """{"<stage>_s": seconds, ..., "total_s": seconds}: the sweep result's `timings`."""
        return {**{f"{k}_s": v for k, v in self.stages.items()}, "total_s": self.total()}

    def metrics(self) -> dict[str, float]:
        """The MLflow metrics of the run: `time/<stage>_s` and `time/total_s`."""
        return {f"{METRIC_PREFIX}{k}": v for k, v in self.flat().items()}

    def line(self) -> str:
        return time_line(self.to_dict())


def duration(seconds: float) -> str:
    """12.3 -> "12 s", 4.21 -> "4.2 s", 571 -> "9 min 31 s", 3725 -> "1 h 2 min"."""
    s = max(0.0, float(seconds))
    if s < 10:
        return f"{s:.1f} s"
    if s < 59.5:
        return f"{s:.0f} s"
    m, sec = divmod(round(s), 60)
    if m < 60:
        return f"{m} min {sec} s"
    h, m = divmod(m, 60)
    return f"{h} h {m} min"


def _children(stages: dict[str, float], parent: str) -> list[str]:
    """The direct parts of `parent` ("" for the top level), in the order they started."""
    prefix = f"{parent}/" if parent else ""
    out: list[str] = []
    for name in stages:
        if name.startswith(prefix) and name != parent:
            part = prefix + name[len(prefix) :].split("/", 1)[0]
            if part not in out:
                out.append(part)
    return out


def _seconds(stages: dict[str, float], name: str) -> float:
    """A stage's own time, or (when only its parts were timed) the sum of its parts."""
    if name in stages:
        return stages[name]
    return sum(_seconds(stages, c) for c in _children(stages, name))


def _parts(stages: dict[str, float], skipped: dict[str, str], parent: str) -> str:
    items = []
    for name in _children(stages, parent):
        if name in skipped:
            continue
        label = LABELS.get(name.rsplit("/", 1)[-1], name.rsplit("/", 1)[-1])
        inner = _parts(stages, skipped, name)
        items.append(f"{label} {duration(_seconds(stages, name))}" + (f" ({inner})" if inner else ""))
    return ", ".join(items)


def time_line(timings: dict[str, Any]) -> str:
    """One line on where the time went, from `StageClock.to_dict()`'s form: "9 min 31 s — data 12 s,
    ..., final stage 2 min 0 s (cross-encoder 41 s, ...); other 2.1 s; skipped: trials (all done
    before)". "other" is the time no stage measured."""
    stages = {str(k): float(v) for k, v in (timings.get("stages") or {}).items()}
    skipped = {str(k): str(v) for k, v in (timings.get("skipped") or {}).items()}
    total = float(timings.get("total_s") or 0.0)
    line = f"{duration(total)} — {_parts(stages, skipped, '') or 'no stage timed'}"
    other = total - sum(_seconds(stages, n) for n in _children(stages, ""))
    if other >= 0.05:
        line += f"; other {duration(other)}"
    if skipped:
        named = [
            f"{LABELS.get(n.rsplit('/', 1)[-1], n.rsplit('/', 1)[-1])} ({why})" for n, why in skipped.items()
        ]
        line += f"; skipped: {', '.join(named)}"
    return line
