"""Seed-robust verdicts (pure): a dataset winner's score beside its seed twins' (the same recipe
trained with another seed, `search.second_seed`), on vector search without reranker (the embedding
alone, where the twins are scored). A gain is called real only when every seed's own paired test
against the base model says so."""

from __future__ import annotations

from typing import Any

from embedtune.records import TrialRecord, number
from embedtune.report.fmt import fmt_p
from embedtune.report.leaderboard import SIGNIFICANCE


def real_gain(seed: dict[str, Any]) -> bool:
    """A seed's gain over the base model is real: positive, with p < 0.05."""
    return (
        seed["delta"] is not None and seed["delta"] > 0 and seed["p"] is not None and seed["p"] < SIGNIFICANCE
    )


def seed_checks(board, trials: list[TrialRecord], dataset_winners: dict[str, Any], metric: str) -> dict:
    """Per dataset whose tuned winner has a scored seed twin: `seeds` (one dict per seed, the
    winner's first: seed, model, score, delta, p), `spread` (largest minus smallest score), `holds`
    (every seed beats the base model with p < 0.05) and `line`, the summary's sentence."""
    by_id = {str(t.trial_id): t for t in trials}
    plain = board[(board["query_type"] == "vector") & (board["reranker"] == "none")]
    out: dict[str, dict[str, Any]] = {}
    for ds, winner in sorted(dataset_winners.items()):
        own = (
            by_id.get(str((winner or {}).get("trial_id"))) if (winner or {}).get("kind") == "tuned" else None
        )
        if own is None:
            continue
        twins = sorted(
            (t for t in trials if t.recipe == own.recipe and t.seed != own.seed), key=lambda t: t.seed
        )
        rows = plain[plain["dataset"].astype(str) == ds]
        seeds = []
        for t in [own, *twins]:
            row = rows[rows["trial_id"].astype(str) == str(t.trial_id)]
            if row.empty:
                continue
            r = row.iloc[0]
            seeds.append(
                {
                    "seed": int(t.seed),
                    "model": str(r["model"]),
                    "score": number(r[metric]),
                    "delta": number(r.get(f"delta_{metric}")),
                    "p": number(r.get(f"p_{metric}")),
                }
            )
        if len(seeds) < 2 or any(s["score"] is None for s in seeds):
            continue
        scores = [s["score"] for s in seeds]
        check = {"seeds": seeds, "spread": max(scores) - min(scores), "holds": all(map(real_gain, seeds))}
        out[ds] = {**check, "line": seed_line(check, metric)}
    return out


def seed_line(check: dict[str, Any], metric: str) -> str:
    """ "seed 42 0.919 (+8.1 points, p<0.001), seed 43 0.912 (+7.4, p<0.001); spread 0.7 points:
    the gain holds for both seeds" (or names the seeds it does not hold for)."""
    shown = []
    for s in check["seeds"]:
        gain = f"{s['delta'] * 100:+.1f} points, " if s["delta"] is not None else ""
        shown.append(f"seed {s['seed']} {s['score']:.3f} ({gain}{fmt_p(s['p'])})")
    weak = [str(s["seed"]) for s in check["seeds"] if not real_gain(s)]
    n = len(check["seeds"])
    if check["holds"]:
        tail = f"the gain holds for {'both' if n == 2 else f'all {n}'} seeds"
    elif len(weak) == n:
        tail = "no seed gains beyond noise"
    else:
        tail = f"no real gain with seed {', '.join(weak)}: a lucky seed is not ruled out"
    return f"{metric}, vector search: {', '.join(shown)}; spread {check['spread'] * 100:.1f} points: {tail}"
