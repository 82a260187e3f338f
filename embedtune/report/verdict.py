"""The one-line verdicts per dataset: should you fine-tune, and has the base model already seen it."""

from __future__ import annotations

from typing import Any

from embedtune.records import number
from embedtune.report.fmt import fmt_p
from embedtune.report.leaderboard import SIGNIFICANCE
from embedtune.report.probe import seen_verdict
from embedtune.specs.metrics import WORTH_IT_POINTS

# Verdict thresholds, in points of the leaderboard metric (1 point = 0.01).
HIGH_ZERO_SHOT = 0.85  # the base model "already handles the data" at or above this score
LOW_ZERO_SHOT = 0.70  # below this there is room a fine-tune can usually take


def verdict(
    zero_shot: float | None,
    best_tuned: float | None,
    probe: dict[str, Any] | None,
    metric: str,
    p_value: float | None = None,
    seeds: dict[str, Any] | None = None,
) -> str:
    """One line: should this dataset be fine-tuned on, judged from the best base model's zero-shot
    score, the best tuned model's score (and `p_value`, its paired test against its base model: a
    large gain within noise is not called a reason to fine-tune), the winner's second seed when one
    was trained (`report.seeds`: a gain that does not hold for every seed is not called real) and
    the familiarity probe."""
    if zero_shot is None:
        return "No base-model score: cannot judge."
    familiar = ""
    if probe and number(probe.get("train_hit_at_10")) is not None:
        familiar = f"; zero-shot hit@10 on train questions {probe['train_hit_at_10']:.2f} vs eval {probe['eval_hit_at_10']:.2f}"
    if probe and probe.get("card_matches"):
        familiar += f"; its model card lists {', '.join(probe['card_matches'])} in its training data"
    already = zero_shot >= HIGH_ZERO_SHOT
    if best_tuned is None:
        headroom = (1 - zero_shot) * 100
        if already:
            return f"Probably not: the base model already scores {metric} {zero_shot:.3f} ({headroom:.1f} points of headroom){familiar}."
        if zero_shot < LOW_ZERO_SHOT:
            return f"Worth trying: zero-shot {metric} is only {zero_shot:.3f}{familiar}."
        return (
            f"Maybe: zero-shot {metric} {zero_shot:.3f} leaves {headroom:.1f} points of headroom{familiar}."
        )
    gain = (best_tuned - zero_shot) * 100
    if gain >= WORTH_IT_POINTS:
        shown = f"{gain:+.1f} points of {metric} ({zero_shot:.3f} → {best_tuned:.3f})"
        if p_value is not None and p_value >= SIGNIFICANCE:
            return (
                f"Promising, not proven: the best run gains {shown}, but that is within noise on these "
                f"questions ({fmt_p(p_value)}); confirm on more held-out questions before relying on it."
            )
        if seeds is not None and not seeds["holds"]:
            return (
                f"Promising, not proven: the best run gains {shown}, but not with every seed "
                f"({seeds['line']}); train with more seeds before relying on it."
            )
        both = f" that holds for every seed (spread {seeds['spread'] * 100:.1f} points)" if seeds else ""
        return f"Fine-tune: the best run gains {shown}" + (
            f", a real gain ({fmt_p(p_value)}){both}." if p_value is not None else f"{both}."
        )
    why = (
        f"the base model already handles this data ({metric} {zero_shot:.3f}{familiar})"
        if already
        else f"zero-shot {metric} {zero_shot:.3f}{familiar}"
    )
    if gain <= 0:
        return f"Don't fine-tune: no run beats the base model ({gain:+.1f} points); {why}."
    return f"Not worth it: the best run gains only {gain:+.1f} points; {why}."


def should_fine_tune(
    board, probes: dict[str, dict], metric: str, seeds: dict[str, dict] | None = None
) -> dict[str, dict[str, Any]]:
    """Per dataset: a row per base model (zero-shot, best tuned, gain, probe) and the verdict line,
    judged on the vector search without reranker (the embedding model alone) when present, and with
    the winner's seeds (`report.seeds.seed_checks`) when it has a twin: kept as `seeds`."""
    out = {}
    for ds, rows in board.groupby("dataset", sort=True):
        plain = rows[(rows["query_type"] == "vector") & (rows["reranker"] == "none")]
        rows = plain if not plain.empty else rows
        per_base = []
        for base_model in sorted(rows["base_model"].unique()):
            mine = rows[rows["base_model"] == base_model]
            zs = mine[mine["kind"] == "base"][metric].max()
            tuned = mine[mine["kind"] == "tuned"][metric].max()
            per_base.append(
                {
                    "base_model": base_model,
                    "zero_shot": number(zs),
                    "best_tuned": number(tuned),
                    "gain": number(tuned - zs),
                    "probe": probes.get(f"{ds}|{base_model}"),
                }
            )
        zs_all = number(rows[rows["kind"] == "base"][metric].max())
        tuned_all = number(rows[rows["kind"] == "tuned"][metric].max())
        best_base = max(
            (b for b in per_base if b["zero_shot"] is not None), key=lambda b: b["zero_shot"], default=None
        )
        tuned_rows = rows[rows["kind"] == "tuned"].sort_values(metric, ascending=False, kind="stable")
        p_best = number(tuned_rows.iloc[0].get(f"p_{metric}")) if not tuned_rows.empty else None
        check = (seeds or {}).get(str(ds))
        line = verdict(zs_all, tuned_all, best_base["probe"] if best_base else None, metric, p_best, check)
        for b in per_base:
            b["seen"] = seen_verdict(b["probe"])
        seen = best_base["seen"] if best_base else None
        out[str(ds)] = {
            "rows": per_base,
            "zero_shot": zs_all,
            "best_tuned": tuned_all,
            "verdict": line,
            "seen": seen,
            "basis": "vector, no reranker" if not plain.empty else "all query types",
            "seeds": check,
        }
    return out
