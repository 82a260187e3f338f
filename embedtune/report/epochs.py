"""How many epochs to train (paired tests between the evaluated epoch counts) and overfitting flags
(from the sweep's trial records)."""

from __future__ import annotations

from typing import Any

from embedtune.records import TrialRecord, best_point
from embedtune.report.fmt import epochs_text, fmt_p
from embedtune.report.leaderboard import N_BOOT, SIGNIFICANCE, query_values
from embedtune.report_store import PER_QUERY
from embedtune.specs.metrics import DEFAULT_LEADERBOARD_METRIC, DEFAULT_SWEEP_METRIC

EPOCH_NOTE = (
    "Each tuned checkpoint is its trial's best epoch. An epoch count is named best only when it beats "
    "every other evaluated epoch count beyond noise (paired test, p < 0.05); otherwise the fewest "
    "epochs within noise of the top score are recommended."
)


def epoch_advice(
    results, metric: str = DEFAULT_LEADERBOARD_METRIC, n_boot: int = N_BOOT, seed: int = 0
) -> dict[str, list[dict[str, Any]]]:
    """Per dataset and base model: which epoch count to train. The tuned checkpoints (each at its
    trial's best epoch) are compared on vector search without reranker (else the query type and
    reranker of the best tuned row): the best checkpoint of each epoch count, by `metric`. The top
    epoch count is *named best* only when it beats every other one beyond noise (paired test,
    p < 0.05); otherwise the fewest epochs within noise of it are recommended. Returns
    {dataset: [{base_model, basis, best_epochs, best_score, recommended_epochs, named_best,
    comparisons: [{epochs, model, score, p}], text}]}."""
    from embedtune import stats

    if "epochs" not in results or "kind" not in results:
        return {}
    out: dict[str, list[dict[str, Any]]] = {}
    tuned = results[(results["kind"] == "tuned") & results["epochs"].notna()]
    for ds, rows in tuned.groupby("dataset", sort=True):
        plain = rows[(rows["query_type"] == "vector") & (rows["reranker"] == "none")]
        if plain.empty:
            top = rows.sort_values([metric, "model"], ascending=[False, True], kind="stable").iloc[0]
            plain = rows[(rows["query_type"] == top["query_type"]) & (rows["reranker"] == top["reranker"])]
        basis = f"{plain['query_type'].iloc[0]}/{plain['reranker'].iloc[0]}"
        advice = []
        for bm, mine in plain.groupby("base_model", sort=True):
            mine = mine.sort_values([metric, "epochs", "model"], ascending=[False, True, True], kind="stable")
            per_epochs = mine.drop_duplicates("epochs")  # best checkpoint of each epoch count
            best = per_epochs.iloc[0]
            best_e, best_s = int(best["epochs"]), float(best[metric])
            best_v = query_values(best.get(PER_QUERY), metric)
            comps = []
            for _, r in per_epochs.iloc[1:].sort_values("epochs").iterrows():
                v = query_values(r.get(PER_QUERY), metric)
                p = None
                if best_v is not None and v is not None and v.size == best_v.size:
                    p = stats.paired_pvalue(best_v, v, metric, n_boot, seed)
                comps.append(
                    {"epochs": int(r["epochs"]), "model": str(r["model"]), "score": float(r[metric]), "p": p}
                )
            item = {
                "dataset": str(ds),
                "base_model": str(bm),
                "basis": basis,
                "best_epochs": best_e,
                "best_score": best_s,
                "recommended_epochs": best_e,
                "named_best": False,
                "comparisons": comps,
            }
            head = f"`{bm}` ({basis}, {metric}):"

            def listed(cs: list[dict[str, Any]]) -> str:
                return ", ".join(
                    f"{epochs_text(c['epochs'])} ({c['score']:.3f}, {fmt_p(c['p'])})" for c in cs
                )

            if not comps:
                item["text"] = (
                    f"{head} only checkpoints at {epochs_text(best_e)} were evaluated ({best_s:.3f}); "
                    "no other epoch count to compare."
                )
            elif any(c["p"] is None for c in comps):
                item["text"] = (
                    f"{head} {epochs_text(best_e)} scores highest ({best_s:.3f}); without per-query "
                    "results it is unknown whether that beats the other epoch counts beyond noise."
                )
            elif all(c["p"] < SIGNIFICANCE for c in comps):
                item["named_best"] = True
                item["text"] = (
                    f"{head} best epoch count **{best_e}** ({best_s:.3f}): it beats {listed(comps)} beyond noise."
                )
            else:
                within = [c for c in comps if c["p"] >= SIGNIFICANCE]
                beaten = [c for c in comps if c["p"] < SIGNIFICANCE]
                cheapest = min([best_e, *(c["epochs"] for c in within)])
                item["recommended_epochs"] = cheapest
                text = (
                    f"{head} no epoch count is best beyond noise: {epochs_text(best_e)} scores highest ({best_s:.3f}), "
                    f"but {listed(within)} {'is' if len(within) == 1 else 'are'} within noise"
                )
                text += f" (it does beat {listed(beaten)})" if beaten else ""
                text += (
                    f"; recommended: the cheapest within noise, **{epochs_text(cheapest)}**."
                    if cheapest < best_e
                    else f"; recommended: **{epochs_text(best_e)}**, also the fewest within noise."
                )
                item["text"] = text
            advice.append(item)
        out[str(ds)] = advice
    return out


def run_points(trials: list[TrialRecord], metric: str) -> list[dict[str, Any]]:
    """One point per usable trial: its epoch count (last epoch reached), score there, best epoch and
    score, and the base model's score (history epoch 0)."""
    points = []
    for t in trials:
        if t.status == "FAILED":
            continue
        trained = sorted(
            (p for p in t.history if p.epoch > 0 and p.score(metric) is not None), key=lambda p: p.epoch
        )
        if not trained:
            continue
        last, best = trained[-1], best_point(trained, metric)
        points.append(
            {
                "trial_id": str(t.trial_id),
                "model": str(t.model_label or t.model),
                "dataset": str(t.dataset),
                "group": t.hyperparams(),
                "epochs": last.epoch,
                "score": last.score(metric),
                "best_epoch": best.epoch,
                "best_score": best.score(metric),
                "base": t.base_score(metric),
                "status": t.status,
            }
        )
    return points


def overfitting_flags(trials: list[TrialRecord], metric: str = DEFAULT_SWEEP_METRIC, tolerance: float = 0.0):
    """Flags on the sweep's trial records (score = `metric` at a run's last epoch):
    - `below shorter run`: below the best shorter run (fewer epochs) of the same base model,
      dataset and other hyperparameters (lr, batch size, seed, warmup);
    - `below base`: below the untouched base model (epoch 0);
    - `peaked early`: below the run's own best epoch (its best checkpoint is not its last).
    A drop must exceed `tolerance` to count. FAILED trials are ignored. Returns dicts with
    trial_id, model, dataset, epochs, score, flag, reference_epochs, reference_score, message."""
    flags = []
    points = run_points(trials, metric)
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for p in points:
        groups.setdefault((p["model"], p["dataset"], p["group"]), []).append(p)
    for key in sorted(groups, key=str):
        runs = sorted(groups[key], key=lambda p: (p["epochs"], p["trial_id"]))
        for p in runs:
            common = {k: p[k] for k in ("trial_id", "model", "dataset", "epochs", "score")}
            shorter = [q for q in runs if q["epochs"] < p["epochs"]]
            if shorter:
                ref = max(shorter, key=lambda q: (q["score"], -q["epochs"]))
                if p["score"] < ref["score"] - tolerance:
                    flags.append(
                        {
                            **common,
                            "flag": "below shorter run",
                            "reference_epochs": ref["epochs"],
                            "reference_score": ref["score"],
                            "message": f"{p['epochs']} epochs score {p['score']:.4f} < {ref['score']:.4f} "
                            f"after {ref['epochs']} (trial {ref['trial_id']})",
                        }
                    )
            if p["base"] is not None and p["score"] < p["base"] - tolerance:
                flags.append(
                    {
                        **common,
                        "flag": "below base",
                        "reference_epochs": 0,
                        "reference_score": p["base"],
                        "message": f"{p['epochs']} epochs score {p['score']:.4f} < base model {p['base']:.4f}",
                    }
                )
            if p["best_epoch"] < p["epochs"] and p["score"] < p["best_score"] - tolerance:
                flags.append(
                    {
                        **common,
                        "flag": "peaked early",
                        "reference_epochs": p["best_epoch"],
                        "reference_score": p["best_score"],
                        "message": f"peaked at epoch {p['best_epoch']} ({p['best_score']:.4f}), "
                        f"ended at {p['score']:.4f} after {p['epochs']}",
                    }
                )
    return flags
