"""How numbers read in the report's text and tables."""

from __future__ import annotations

import math
from typing import Any

from embedtune.records import number


def fmt(v: Any, kind: str = "score") -> str:
    """A cell: "" for a blank, else a score (4 decimals), a signed delta, whole seconds, ..."""
    f = number(v)
    if f is None:
        return "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)
    formats = {
        "delta": "{:+.4f}",
        "seconds": "{:.0f}",
        "seconds1": "{:.1f}",
        "int": "{:.0f}",
        "rate": "{:.0f}",
        "mb": "{:.1f}",
    }
    return formats.get(kind, "{:.4f}").format(f)


def fmt_p(p: float | None) -> str:
    f = number(p)
    if f is None:
        return ""
    return "p<0.001" if f < 0.001 else f"p={f:.3f}"


def pct(v: Any) -> str:
    f = number(v)
    return "" if f is None else f"{f:.1%}"


def epochs_text(n: int) -> str:
    return f"{n} epoch" if n == 1 else f"{n} epochs"
