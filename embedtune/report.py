"""The leaderboard: retrieval results + sweep trial records → `<run_dir>/report/`.

Inputs: the rows of `embedtune.evaluate.evaluate_models` (one per dataset × model × query type ×
reranker, columns in docs/INTERFACES.md) and the sweep's trial records (`trials.json`).

Outputs in `<run_dir>/report/`:
- `leaderboard.md`, `leaderboard.csv`, `leaderboard.html`: every row with hit@5/@10, MRR@10,
  nDCG@10, the delta against its base model (same dataset, query type and reranker), training
  seconds, GPU seconds per point gained (blank on CPU or without a gain) and flags;
- `plots/epochs_<dataset>.png`: the sweep metric of every trial (from the trial records) and the
  leaderboard metric of the evaluated checkpoints against the epoch count, per base model, with
  the base model's score as a horizontal line; `plots/best_combinations.png`: the best
  (model, query type, reranker) combinations per dataset;
- overfitting flags (`overfitting_flags`): a run whose score at its last epoch falls below a
  shorter run's (same base model, dataset and other hyperparameters), below the base model, or
  below its own best epoch;
- "Should you fine-tune?" per dataset: the base model's zero-shot score, the best run's gain, and
  a probe of how familiar the data already is to the base model (`fine_tune_probe`), with a
  one-line verdict;
- "Already seen" (in the same section): near-duplicate rate of eval vs train questions (exact after
  normalising, and by base-model cosine), zero-shot hit@10 on train vs eval questions, and the
  base model's card's training datasets that name this data (`seen_verdict`);
- "Do no harm" per dataset: the winner vs its base model on out-of-domain sets, from the stored
  `harm.json` the final stage writes (`embedtune.finalize.do_no_harm`);
- `results.csv` (the evaluation rows), `probe.json` (probe cache) and `meta.json`, so
  `rebuild_report(run_dir)` (`embedtune report RUN_DIR`) rebuilds everything without evaluating.
"""

from __future__ import annotations

import html
import json
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from embedtune.data import PreparedData
from embedtune.errors import EmbedtuneError

log = logging.getLogger(__name__)

METRICS = ["hit_at_1", "hit_at_5", "hit_at_10", "mrr_at_10", "ndcg_at_10"]
SHOWN = ["hit_at_5", "hit_at_10", "mrr_at_10", "ndcg_at_10"]
HYPERPARAMS = ("lr", "batch_size", "seed", "warmup_ratio")  # "other hyperparameters" than epochs
REPORT_DIR = "report"
RESULTS_FILE = "results.csv"

# Verdict thresholds, in points of the leaderboard metric (1 point = 0.01).
WORTH_IT_POINTS = 3.0  # a gain at least this large is worth a fine-tuning run
HIGH_ZERO_SHOT = 0.85  # the base model "already handles the data" at or above this score
LOW_ZERO_SHOT = 0.70  # below this there is room a fine-tune can usually take


@dataclass
class ReportResult:
    report_dir: Path
    files: dict[str, Path]  # leaderboard_md / leaderboard_csv / leaderboard_html / results / meta
    plots: list[Path]
    winner: dict[str, Any] | None  # see pick_winner: best tuned row that beats its base, by `metric`
    metric: str
    leaderboard: Any  # pandas.DataFrame
    dataset_winners: dict[str, dict[str, Any]] = field(default_factory=dict)
    verdicts: dict[str, dict[str, Any]] = field(default_factory=dict)
    flags: list[dict[str, Any]] = field(default_factory=list)
    harm: dict[str, Any] = field(default_factory=dict)  # report/harm.json (see load_harm)

    @property
    def paths(self) -> list[Path]:
        return [*self.files.values(), *self.plots]


def _num(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


# ---------------------------------------------------------------- leaderboard (pure)


def leaderboard(
    results,
    trials: list[dict[str, Any]] | None = None,
    metric: str = "hit_at_10",
    flags=None,
    sweep_metric: str = "ir_recall_at_10",
):
    """Every results row, with `base_<m>` / `delta_<m>` for each metric (against the base-model row
    of the same dataset, query type and reranker), `training_s`, `gpu_seconds`,
    `gpu_s_per_point` (GPU seconds per point of `metric` gained; NaN on CPU or without a gain),
    `flags`, and `rank` within the dataset; sorted by dataset, then `metric` (best first).

    With per-query values (the `per_query` column of the results, see `add_confidence`): `<m>_lo` /
    `<m>_hi` (95% bootstrap interval over queries) for each metric, `p_<m>` (paired test of the
    delta against the base row), and for `metric` `significant` (p < 0.05) and `vs_base` ("real
    gain", "real loss" or "noise"); all blank without per-query values. Tuned rows also get
    `best_epoch` / `best_epoch_score` and `last_epoch` / `last_epoch_score` (`sweep_metric` at the
    trial's best and last epoch, from the trial records). The `per_query` column is not kept."""
    import numpy as np
    import pandas as pd

    if metric not in METRICS:
        raise EmbedtuneError(f"leaderboard metric must be one of {', '.join(METRICS)}, got {metric!r}")
    df = results.copy().reset_index(drop=True)
    if df.empty:
        raise EmbedtuneError("no evaluation results to report")
    for col in ("trial_id", "epochs"):
        if col not in df:
            df[col] = None
    metrics = [m for m in METRICS if m in df]
    keys = ["dataset", "query_type", "reranker"]
    base = df[df["kind"] == "base"][[*keys, "model", *metrics]].drop_duplicates([*keys, "model"])
    base = base.rename(columns={"model": "base_model", **{m: f"base_{m}" for m in metrics}})
    df = df.merge(base, on=[*keys, "base_model"], how="left")
    for m in metrics:
        df[f"delta_{m}"] = df[m] - df[f"base_{m}"]

    by_trial = {str(t.get("trial_id")): t for t in trials or []}
    training, gpu = [], []
    for kind, tid in zip(df["kind"], df["trial_id"], strict=True):
        t = by_trial.get(str(tid)) if tid is not None and tid == tid else None
        training.append(0.0 if kind == "base" else (_num(t.get("duration_s")) if t else None))
        gpu.append(_num(t.get("gpu_seconds")) if t else None)
    df["training_s"] = pd.array(training, dtype="Float64").astype(float)
    df["gpu_seconds"] = pd.array(gpu, dtype="Float64").astype(float)
    gain_points = df[f"delta_{metric}"] * 100
    df["gpu_s_per_point"] = np.where(
        (gain_points > 0) & df["gpu_seconds"].notna(), df["gpu_seconds"] / gain_points, np.nan
    )

    trial_flags: dict[str, list[str]] = {}
    for f in flags or []:
        trial_flags.setdefault(str(f["trial_id"]), []).append(f["flag"])
    row_flags = []
    for kind, tid, delta in zip(df["kind"], df["trial_id"], df[f"delta_{metric}"], strict=True):
        fl = list(dict.fromkeys(trial_flags.get(str(tid), []))) if kind == "tuned" else []
        if kind == "tuned" and delta == delta and delta < 0:
            fl.insert(0, "below base")
        row_flags.append(", ".join(dict.fromkeys(fl)))
    df["flags"] = row_flags
    df = add_confidence(df, metrics, metric)
    df = _epoch_columns(df, by_trial, sweep_metric)
    df = df.sort_values(["dataset", metric, "mrr_at_10", "model", "query_type", "reranker"],
                        ascending=[True, False, False, True, True, True], kind="stable").reset_index(drop=True)  # fmt: skip
    df["rank"] = df.groupby("dataset").cumcount() + 1
    return df


def pick_winner(board, metric: str = "hit_at_10", kind: str | None = "tuned") -> dict[str, Any] | None:
    """Best row by `metric` (ties: larger delta, then MRR@10, then model label). `kind="tuned"`
    (default) considers the tuned rows that beat their base model (positive delta) first, then any
    tuned row, then any row: scores of different datasets are not comparable, and a checkpoint worse
    than its own base model is no champion. `kind=None`: every row."""
    pools = [board]
    if kind is not None:
        rows = board[board["kind"] == kind]
        pools = [rows[rows[f"delta_{metric}"] > 0], rows, board] if kind == "tuned" else [rows, board]
    rows = next((p for p in pools if not p.empty), None)
    if rows is None:
        return None
    rows = rows.assign(_d=rows[f"delta_{metric}"].fillna(-math.inf))
    best = rows.sort_values(
        [metric, "_d", "mrr_at_10", "model"], ascending=[False, False, False, True], kind="stable"
    )
    return _clean_row(best.drop(columns="_d").iloc[0].to_dict())


def _clean_row(row: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in row.items():
        if hasattr(v, "item"):
            v = v.item()
        if type(v).__name__ == "NAType":  # pandas.NA of a nullable column (e.g. `significant`)
            v = None
        if isinstance(v, float) and math.isnan(v):
            v = None
        if k == "epochs" and isinstance(v, float):
            v = int(v)  # a column with blanks (base rows) reads back as float
        out[k] = v
    return out


SIGNIFICANCE = 0.05  # p below this: a real difference; at or above it: noise
N_BOOT = 2000  # bootstrap resamples of the intervals and the paired tests (seeded)
PER_QUERY = "per_query"  # results column: dict metric -> one value per query (see evaluate.COLUMNS)
PER_QUERY_FILE = "per_query.parquet"  # sidecar of results.csv with the per-query values
_PQ_KEYS = ["dataset", "model", "query_type", "reranker"]


def _query_values(cell: Any, metric: str):
    """The per-query values of `metric` in a `per_query` cell as a float array; None when absent."""
    import numpy as np

    if not isinstance(cell, dict) or cell.get(metric) is None:
        return None
    arr = np.asarray(cell[metric], dtype=float)
    return arr if arr.ndim == 1 and arr.size else None


def _pvalues(pairs: list[tuple[int, Any, Any]], metric: str, size: int, n_boot: int, seed: int):
    """p-values of (row, values, reference values) pairs: exact McNemar for hit@k, the paired
    bootstrap otherwise (batched per number of queries)."""
    import numpy as np

    from embedtune import stats

    out = np.full(size, np.nan)
    if metric.startswith("hit_at_"):
        for i, a, b in pairs:
            out[i] = stats.paired_pvalue(a, b, metric, n_boot, seed)
        return out
    by_n: dict[int, list[tuple[int, Any, Any]]] = {}
    for pair in pairs:
        by_n.setdefault(pair[1].size, []).append(pair)
    for group in by_n.values():
        ps = stats.paired_bootstrap_pvalues(
            np.stack([a for _, a, _ in group]), np.stack([b for _, _, b in group]), n_boot, seed
        )
        for (i, _, _), p in zip(group, ps, strict=True):
            out[i] = p
    return out


def _words(p: float | None, delta: float | None) -> str:
    """'real gain' / 'real loss' (p < SIGNIFICANCE), 'noise', or '' without a test."""
    if p is None or delta is None:
        return ""
    if p >= SIGNIFICANCE or delta == 0:
        return "noise"
    return "real gain" if delta > 0 else "real loss"


def add_confidence(df, metrics: list[str], metric: str, n_boot: int = N_BOOT, seed: int = 0):
    """Add `<m>_lo` / `<m>_hi` (percentile bootstrap 95% interval over queries, seeded) and `p_<m>`
    (two-sided paired test of the row against its base-model row over the same queries: exact
    McNemar for hit@k, paired bootstrap of the mean difference for MRR / nDCG; blank for base rows)
    for each metric, and `significant` / `vs_base` for `metric`. Rows without per-query values get
    blanks. Drops the `per_query` column."""
    import numpy as np
    import pandas as pd

    from embedtune import stats

    cells = list(df[PER_QUERY]) if PER_QUERY in df else [None] * len(df)
    combos = list(
        zip(df["dataset"], df["query_type"], df["reranker"], df["base_model"], df["kind"], strict=True)
    )
    base_cells: dict[tuple, Any] = {}
    for cell, ds, qt, rr, model, kind in zip(
        cells, df["dataset"], df["query_type"], df["reranker"], df["model"], df["kind"], strict=True
    ):
        if kind == "base" and isinstance(cell, dict):
            base_cells.setdefault((ds, qt, rr, model), cell)
    new: dict[str, Any] = {}
    for m in metrics:
        vals = [_query_values(c, m) for c in cells]
        lo, hi = np.full(len(df), np.nan), np.full(len(df), np.nan)
        by_n: dict[int, list[int]] = {}
        for i, v in enumerate(vals):
            if v is not None:
                by_n.setdefault(v.size, []).append(i)
        for idx in by_n.values():
            lo[idx], hi[idx] = stats.bootstrap_cis(np.stack([vals[i] for i in idx]), n_boot, seed=seed)
        shown = pd.to_numeric(df[m], errors="coerce").to_numpy(dtype=float)
        lo, hi = np.minimum(lo, shown), np.maximum(hi, shown)  # the interval holds the shown score
        pairs = []
        for i, (ds, qt, rr, bm, kind) in enumerate(combos):
            ref = _query_values(base_cells.get((ds, qt, rr, bm)), m)
            if kind != "base" and vals[i] is not None and ref is not None and ref.size == vals[i].size:
                pairs.append((i, vals[i], ref))
        new[f"{m}_lo"], new[f"{m}_hi"], new[f"p_{m}"] = lo, hi, _pvalues(pairs, m, len(df), n_boot, seed)
    p = new.get(f"p_{metric}", np.full(len(df), np.nan))
    delta = df[f"delta_{metric}"] if f"delta_{metric}" in df else pd.Series(np.nan, index=df.index)
    new["significant"] = pd.array([None if x != x else bool(x < SIGNIFICANCE) for x in p], dtype="boolean")
    new["vs_base"] = [_words(_num(x), _num(d)) for x, d in zip(p, delta, strict=True)]
    df = df.drop(columns=[PER_QUERY], errors="ignore")
    return df.assign(**new)


def _trial_epochs(trial: dict[str, Any], sweep_metric: str) -> tuple[float | None, ...]:
    """(best epoch, sweep metric there, last epoch, sweep metric there) of a trial record: the best
    epoch as the record states it (what the final stage evaluates), the last one from its history."""
    scored = sorted(
        (int(h["epoch"]), _num((h.get("metrics") or {}).get(sweep_metric)))
        for h in trial.get("history") or []
        if h.get("epoch") is not None and int(h["epoch"]) > 0
    )
    scored = [(e, s) for e, s in scored if s is not None]
    best_epoch = _num(trial.get("best_epoch"))
    best_score = _num((trial.get("best_metrics") or {}).get(sweep_metric))
    if best_epoch is None and scored:
        best_epoch, best_score = max(scored, key=lambda h: (h[1], -h[0]))
    if best_score is None and best_epoch is not None:
        best_score = dict(scored).get(int(best_epoch))
    last_epoch, last_score = scored[-1] if scored else (_num(trial.get("epochs_done")), None)
    return best_epoch, best_score, last_epoch, last_score


def _epoch_columns(df, by_trial: dict[str, dict[str, Any]], sweep_metric: str):
    """`best_epoch`, `best_epoch_score`, `last_epoch`, `last_epoch_score` of tuned rows (blank for
    base rows and rows without a trial record); the scores are `sweep_metric`."""
    import pandas as pd

    cols: list[list[float | None]] = [[], [], [], []]
    for kind, tid in zip(df["kind"], df["trial_id"], strict=True):
        t = by_trial.get(str(tid)) if kind == "tuned" and tid is not None and tid == tid else None
        for col, v in zip(cols, _trial_epochs(t, sweep_metric) if t else (None,) * 4, strict=True):
            col.append(v)
    names = ["best_epoch", "best_epoch_score", "last_epoch", "last_epoch_score"]
    return df.assign(
        **{n: pd.array(c, dtype="Float64").astype(float) for n, c in zip(names, cols, strict=True)}
    )


def epoch_advice(
    results, metric: str = "hit_at_10", n_boot: int = N_BOOT, seed: int = 0
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
            best_v = _query_values(best.get(PER_QUERY), metric)
            comps = []
            for _, r in per_epochs.iloc[1:].sort_values("epochs").iterrows():
                v = _query_values(r.get(PER_QUERY), metric)
                p = None
                if best_v is not None and v is not None and v.size == best_v.size:
                    p = stats.paired_pvalue(best_v, v, metric, n_boot, seed)
                comps.append(
                    {"epochs": int(r["epochs"]), "model": str(r["model"]), "score": float(r[metric]), "p": p}
                )
            item = {"dataset": str(ds), "base_model": str(bm), "basis": basis, "best_epochs": best_e,
                    "best_score": best_s, "recommended_epochs": best_e, "named_best": False, "comparisons": comps}  # fmt: skip
            head = f"`{bm}` ({basis}, {metric}):"

            def listed(cs: list[dict[str, Any]]) -> str:
                return ", ".join(f"{_epochs(c['epochs'])} ({c['score']:.3f}, {_fmt_p(c['p'])})" for c in cs)

            if not comps:
                item["text"] = (f"{head} only checkpoints at {_epochs(best_e)} were evaluated ({best_s:.3f}); "
                                "no other epoch count to compare.")  # fmt: skip
            elif any(c["p"] is None for c in comps):
                item["text"] = (f"{head} {_epochs(best_e)} scores highest ({best_s:.3f}); without per-query "
                                "results it is unknown whether that beats the other epoch counts beyond noise.")  # fmt: skip
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
                text = (f"{head} no epoch count is best beyond noise: {_epochs(best_e)} scores highest ({best_s:.3f}), "
                        f"but {listed(within)} {'is' if len(within) == 1 else 'are'} within noise")  # fmt: skip
                text += f" (it does beat {listed(beaten)})" if beaten else ""
                text += (f"; recommended: the cheapest within noise, **{_epochs(cheapest)}**." if cheapest < best_e
                         else f"; recommended: **{_epochs(best_e)}**, also the fewest within noise.")  # fmt: skip
                item["text"] = text
            advice.append(item)
        out[str(ds)] = advice
    return out


def _epochs(n: int) -> str:
    return f"{n} epoch" if n == 1 else f"{n} epochs"


def _fmt_p(p: float | None) -> str:
    f = _num(p)
    if f is None:
        return ""
    return "p<0.001" if f < 0.001 else f"p={f:.3f}"


# ---------------------------------------------------------------- overfitting (pure)


def _run_points(trials: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """One point per usable trial: its epoch count (last epoch reached), score there, best epoch and
    score, and the base model's score (history epoch 0)."""
    points = []
    for t in trials:
        if t.get("status") == "FAILED":
            continue
        hist = sorted(t.get("history") or [], key=lambda h: h["epoch"])
        trained = [h for h in hist if h["epoch"] > 0 and _num(h["metrics"].get(metric)) is not None]
        if not trained:
            continue
        base = next((_num(h["metrics"].get(metric)) for h in hist if h["epoch"] == 0), None)
        last = trained[-1]
        best = max(trained, key=lambda h: (h["metrics"][metric], -h["epoch"]))
        points.append(
            {
                "trial_id": str(t["trial_id"]),
                "model": str(t.get("model_label") or t.get("model")),
                "dataset": str(t.get("dataset")),
                "group": tuple((k, t.get(k)) for k in HYPERPARAMS),
                "epochs": int(last["epoch"]),
                "score": float(last["metrics"][metric]),
                "best_epoch": int(best["epoch"]),
                "best_score": float(best["metrics"][metric]),
                "base": base,
                "status": t.get("status"),
            }
        )
    return points


def overfitting_flags(trials: list[dict[str, Any]], metric: str = "ir_recall_at_10", tolerance: float = 0.0):
    """Flags on the sweep's trial records (score = `metric` at a run's last epoch):
    - `below shorter run`: below the best shorter run (fewer epochs) of the same base model,
      dataset and other hyperparameters (lr, batch size, seed, warmup);
    - `below base`: below the untouched base model (epoch 0);
    - `peaked early`: below the run's own best epoch (its best checkpoint is not its last).
    A drop must exceed `tolerance` to count. FAILED trials are ignored. Returns dicts with
    trial_id, model, dataset, epochs, score, flag, reference_epochs, reference_score, message."""
    flags = []
    points = _run_points(trials, metric)
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
                    flags.append({**common, "flag": "below shorter run", "reference_epochs": ref["epochs"],
                                  "reference_score": ref["score"],
                                  "message": f"{p['epochs']} epochs score {p['score']:.4f} < {ref['score']:.4f} "
                                             f"after {ref['epochs']} (trial {ref['trial_id']})"})  # fmt: skip
            if p["base"] is not None and p["score"] < p["base"] - tolerance:
                flags.append({**common, "flag": "below base", "reference_epochs": 0, "reference_score": p["base"],
                              "message": f"{p['epochs']} epochs score {p['score']:.4f} < base model {p['base']:.4f}"})  # fmt: skip
            if p["best_epoch"] < p["epochs"] and p["score"] < p["best_score"] - tolerance:
                flags.append({**common, "flag": "peaked early", "reference_epochs": p["best_epoch"],
                              "reference_score": p["best_score"],
                              "message": f"peaked at epoch {p['best_epoch']} ({p['best_score']:.4f}), "
                                         f"ended at {p['score']:.4f} after {p['epochs']}"})  # fmt: skip
    return flags


# ---------------------------------------------------------------- should you fine-tune?

DUP_THRESHOLD = 0.95  # base-model cosine at or above which an eval question near-duplicates a train question
DUP_POOL = 5000  # train questions encoded for the near-duplicate check at most (exact matches: all of them)
SEEN_DUP_RATE = 0.05  # near-duplicate share of eval questions that counts as "already seen"
SEEN_TRAIN_HIT = 0.90  # zero-shot hit@10 on the training questions that says "already known"


def normalize_question(text: str) -> str:
    """Exact-match key of a question: lowercase, punctuation dropped, whitespace collapsed."""
    import re
    import unicodedata

    text = unicodedata.normalize("NFKC", str(text)).lower()
    return " ".join(re.sub(r"[\W_]+", " ", text).split())


def near_duplicates(
    eval_questions: list[str],
    train_questions: list[str],
    eval_vecs=None,
    train_vecs=None,
    threshold: float = DUP_THRESHOLD,
    examples: int = 3,
) -> dict[str, Any]:
    """How many eval questions already occur among the training questions:
    - `exact_dup_rate`: share whose normalised text (`normalize_question`) equals a train question's;
    - `near_dup_rate`: share that is an exact match or whose nearest train question has cosine >=
      `threshold` (needs unit-normalised `eval_vecs` / `train_vecs` rows aligned with the question
      lists; `train_vecs` may cover only the first rows of `train_questions`).
    `dup_examples`: a few (eval question, train question, cosine) near-duplicates that are not exact."""
    import numpy as np

    keys = {normalize_question(q) for q in train_questions}
    exact = [normalize_question(q) in keys for q in eval_questions]
    near = list(exact)
    found: list[dict[str, Any]] = []
    if eval_vecs is not None and train_vecs is not None and len(eval_vecs) and len(train_vecs):
        sims = np.asarray(eval_vecs) @ np.asarray(train_vecs).T
        best, arg = sims.max(axis=1), sims.argmax(axis=1)
        for i, (s, j) in enumerate(zip(best, arg, strict=True)):
            if s >= threshold:
                near[i] = True
                if not exact[i] and len(found) < examples:
                    found.append({"eval": eval_questions[i], "train": train_questions[int(j)], "cosine": round(float(s), 4)})  # fmt: skip
    n = len(eval_questions)
    return {
        "exact_dup_rate": sum(exact) / n if n else float("nan"),
        "near_dup_rate": sum(near) / n if n else float("nan"),
        "n_exact_dups": int(sum(exact)),
        "n_near_dups": int(sum(near)),
        "dup_threshold": threshold,
        "dup_examples": found,
    }


_GENERIC_WORDS = {"the", "stack", "natural", "simple", "code", "sentence", "common", "wiki", "question",
                  "questions", "answer", "answers", "data", "dataset", "pairs", "sample", "train", "test"}  # fmt: skip


def _name_key(text: str) -> str:
    """Compact comparison key of a dataset name: lowercase alphanumerics, a trailing version dropped
    (`SQuAD2.0`, `squad_v1.1` -> `squad`)."""
    import re

    text = re.sub(r"[\s_-]*(v\d+(\.\d+)*|\d+\.\d+)$", "", str(text).strip().lower())
    return re.sub(r"[^a-z0-9]+", "", text)


def card_datasets(model_dir: str | Path) -> list[str]:
    """Training datasets a model card (`README.md` of the model folder) names: its front matter's
    `datasets:` list and the first-column link texts of its tables (the sentence-transformers cards
    list their training data that way, e.g. `[SQuAD2.0](...)`). Empty without a card."""
    import re

    card = Path(model_dir) / "README.md"
    if not card.is_file():
        return []
    text = card.read_text(encoding="utf-8", errors="replace")
    names: list[str] = []
    front = re.match(r"---\s*\n(.*?)\n---\s*\n", text, re.S)
    if front:
        block = re.search(r"^datasets:\s*\n((?:[ \t]*-[^\n]*\n?)+)", front.group(1) + "\n", re.M)
        if block:
            names += [ln.strip()[1:].strip().strip("'\"") for ln in block.group(1).splitlines() if ln.strip()]
    for row in re.findall(r"^\|\s*\[([^\]]+)\]\([^)]*\)\s*\|", text, re.M):
        if row.strip().lower() not in {"paper", "link", "dataset"}:
            names.append(row.strip())
    return list(dict.fromkeys(n for n in names if n))


def card_matches(card_names: list[str], dataset_names: list[str]) -> list[str]:
    """The card's dataset names that name the fine-tuning data (its label or source: a sample name,
    a path, a hub id). A card name matches on its compact key (`ms_marco` ~ `hf:microsoft/ms_marco`)
    or its first word when that is specific (`SQuAD2.0` ~ `squad-sample`, `GOOAQ: Open ...` ~ `gooaq`)."""
    import re

    tokens: set[str] = set()
    for name in dataset_names:
        for part in re.split(r"[/\\:]+", str(name).lower()):
            for piece in (part, re.sub(r"\.(jsonl|json|parquet|csv|gz)$", "", part)):
                tokens.add(_name_key(piece))
            tokens.update(_name_key(t) for t in re.split(r"[^a-z0-9.]+", part) if t)
    tokens.discard("")
    out, seen = [], set()
    for name in card_names:
        base = re.sub(r"\([^)]*\)", " ", name.split("/")[-1]).split(":")[0]
        keys = {_name_key(base)}
        if _name_key(base) in seen:  # the same dataset named twice (front matter and table)
            continue
        words = [w for w in re.split(r"[^A-Za-z0-9.]+", base) if w]
        if words:
            first = _name_key(words[0])
            if len(first) >= 3 and first not in _GENERIC_WORDS:
                keys.add(first)
        if any(len(k) >= 3 and k in tokens for k in keys):
            out.append(name)
            seen.add(_name_key(base))
    return out


def seen_verdict(probe: dict[str, Any] | None) -> str | None:
    """One line: how much of the fine-tuning data the base model has likely seen already, from the
    probe's card match, zero-shot hit@10 on train vs eval questions and near-duplicate rates."""
    if not probe:
        return None
    signs, numbers = [], []
    matched = probe.get("card_matches") or []
    if matched:
        signs.append(f"its model card lists {', '.join(matched)} among its training data")
    train_hit, eval_hit = _num(probe.get("train_hit_at_10")), _num(probe.get("eval_hit_at_10"))
    if train_hit is not None and eval_hit is not None:
        numbers.append(f"zero-shot hit@10 on train questions {train_hit:.2f} vs eval {eval_hit:.2f}")
        if train_hit >= SEEN_TRAIN_HIT:
            signs.append(f"it already retrieves {train_hit:.0%} of the training questions' answers")
    near, exact = _num(probe.get("near_dup_rate")), _num(probe.get("exact_dup_rate"))
    if near is not None:
        thr = probe.get("dup_threshold", DUP_THRESHOLD)
        numbers.append(f"{near:.1%} of eval questions near-duplicate a train question (cosine >= {thr}; "
                       f"{exact or 0:.1%} exact after normalising)")  # fmt: skip
        if near >= SEEN_DUP_RATE:
            signs.append(f"{near:.0%} of the eval questions near-duplicate training questions")
    if not numbers and not signs:
        return None
    detail = f" ({'; '.join(numbers)})" if numbers else ""
    if signs:
        return f"Already seen: likely — {'; '.join(signs)}{detail}."
    card = "" if probe.get("card_datasets") else "; no model card to check"
    return f"Already seen: no sign of it{card}{detail}."


def fine_tune_probe(
    data: PreparedData,
    model_path: str,
    sample: int = 200,
    corpus_size: int = 1000,
    seed: int = 0,
    dup_threshold: float = DUP_THRESHOLD,
) -> dict[str, Any]:
    """How familiar the data already is to a base model, measured with the base model alone:
    - `eval_to_train_sim`: mean cosine similarity of each eval question to its nearest train
      question; `train_to_train_sim`: the same for train questions among themselves (nearest other
      train question). Eval close to train-to-train: the eval questions look like the training
      questions, so what training teaches can carry over; well below: training fits another
      distribution than the one that is evaluated, and gains there need not transfer.
    - `train_hit_at_10` / `eval_hit_at_10`: the base model's zero-shot hit@10 for a sample of train
      and of eval questions, both over the same corpus (their answers plus distractors from the
      eval corpus, `corpus_size` documents at most). A high train score says the base model
      already handles the very pairs fine-tuning would train on: little left to learn there.
    - near-duplicates (`near_duplicates`): the sampled eval questions against the train questions,
      exact after `normalize_question` (all train questions) and by base-model cosine >=
      `dup_threshold` (the first DUP_POOL train questions of a seeded order).
    """
    import numpy as np
    from sentence_transformers import SentenceTransformer

    rng = random.Random(seed)
    train_q = list(dict.fromkeys(q for q, _ in data.train))
    pool = rng.sample(train_q, min(len(train_q), sample * 3))
    eval_ids = sorted(data.queries)
    eval_ids = rng.sample(eval_ids, min(len(eval_ids), sample))
    model = SentenceTransformer(str(model_path), device="cpu")

    def enc(texts: list[str]):
        return model.encode(
            texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        )

    p = enc(pool)
    e = enc([data.queries[q] for q in eval_ids])
    eval_sim = float((e @ p.T).max(axis=1).mean()) if len(pool) else float("nan")
    sub = min(len(pool), sample)
    tt = p[:sub] @ p.T
    tt[np.arange(sub), np.arange(sub)] = -np.inf  # nearest *other* train question
    train_sim = float(tt.max(axis=1).mean()) if len(pool) > 1 else float("nan")
    in_pool = set(pool)
    rest = [q for q in train_q if q not in in_pool]
    random.Random(seed + 1).shuffle(rest)  # its own generator: the samples below stay as they were
    rest = rest[: max(0, DUP_POOL - len(pool))]
    dup_train = pool + rest
    dup_vecs = np.vstack([p, enc(rest)]) if rest else p
    encoded = set(dup_train)
    not_encoded = [q for q in train_q if q not in encoded]  # exact matches only
    eval_texts = [data.queries[q] for q in eval_ids]
    dups = near_duplicates(eval_texts, dup_train + not_encoded, e, dup_vecs, dup_threshold)

    # zero-shot hit@10 on train vs eval questions over one shared corpus
    answers_of: dict[str, set[str]] = {}
    for q, a in data.train:
        answers_of.setdefault(q, set()).add(a)
    train_s = pool[:sub]
    eval_s = [(data.queries[q], {data.corpus[c] for c in data.relevant.get(q, [])}) for q in eval_ids]
    needed = list(
        dict.fromkeys(
            [a for q in train_s for a in sorted(answers_of[q])] + [a for _, r in eval_s for a in sorted(r)]
        )
    )
    others = [t for t in data.corpus.values() if t not in set(needed)]
    docs = needed + rng.sample(others, max(0, min(len(others), corpus_size - len(needed))))
    index = {t: i for i, t in enumerate(docs)}
    d = enc(docs)

    def hit10(questions: list[str], qvecs, relevant: list[set[str]]) -> float:
        if not questions:
            return float("nan")
        top = np.argsort(-(qvecs @ d.T), axis=1)[:, :10]
        return float(
            np.mean(
                [
                    bool({index[a] for a in rel} & set(row.tolist()))
                    for row, rel in zip(top, relevant, strict=True)
                ]
            )
        )

    return {
        "model_path": str(model_path),
        "eval_to_train_sim": eval_sim,
        "train_to_train_sim": train_sim,
        "train_hit_at_10": hit10(train_s, p[:sub], [answers_of[q] for q in train_s]),
        "eval_hit_at_10": hit10([q for q, _ in eval_s], e, [r for _, r in eval_s]),
        "n_train": sub,
        "n_eval": len(eval_ids),
        "n_docs": len(docs),
        "n_train_questions": len(train_q),
        "n_dup_encoded": len(dup_train),
        **dups,
    }


def verdict(
    zero_shot: float | None,
    best_tuned: float | None,
    probe: dict[str, Any] | None,
    metric: str,
    p_value: float | None = None,
) -> str:
    """One line: should this dataset be fine-tuned on, judged from the best base model's zero-shot
    score, the best tuned model's score (and `p_value`, its paired test against its base model: a
    large gain within noise is not called a reason to fine-tune) and the familiarity probe."""
    if zero_shot is None:
        return "No base-model score: cannot judge."
    familiar = ""
    if probe and _num(probe.get("train_hit_at_10")) is not None:
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
                f"questions ({_fmt_p(p_value)}); confirm on more held-out questions before relying on it."
            )
        return f"Fine-tune: the best run gains {shown}" + (
            f", a real gain ({_fmt_p(p_value)})." if p_value is not None else "."
        )
    why = (
        f"the base model already handles this data ({metric} {zero_shot:.3f}{familiar})"
        if already
        else f"zero-shot {metric} {zero_shot:.3f}{familiar}"
    )
    if gain <= 0:
        return f"Don't fine-tune: no run beats the base model ({gain:+.1f} points); {why}."
    return f"Not worth it: the best run gains only {gain:+.1f} points; {why}."


def _probe_all(run_dir: Path, board, datasets: dict[str, PreparedData], probe_size: int) -> dict[str, dict]:
    """Probe each (dataset, base model), cached in report/probe.json by data fingerprint and model path."""
    cache_file = run_dir / REPORT_DIR / "probe.json"
    cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    out: dict[str, dict] = {}
    bases = board[board["kind"] == "base"][["dataset", "model", "model_path"]].drop_duplicates(
        ["dataset", "model"]
    )
    sources = _dataset_sources(run_dir)
    for ds, model, path in bases.itertuples(index=False):
        data = datasets.get(ds)
        key = f"{ds}|{model}|{data.fingerprint if data else ''}|{probe_size}"
        have = Path(str(path)).exists()
        stale = key in cache and "near_dup_rate" not in cache[key]  # cached before the duplicate check
        if (key not in cache or stale) and data is not None and probe_size > 0 and have:
            try:
                cache[key] = fine_tune_probe(data, str(path), sample=probe_size)
            except Exception as exc:  # a probe failure must not lose the leaderboard
                log.warning("fine-tune probe of %s on %s failed: %s", model, ds, exc)
        if key in cache and have:  # cheap: refresh the card (a stored one survives without the model)
            names = card_datasets(str(path))
            matched = card_matches(names, [ds, *sources.get(ds, [])])
            cache[key] |= {"card_datasets": names, "card_matches": matched}
        if key in cache:
            out[f"{ds}|{model}"] = cache[key]
    cache_file.write_text(json.dumps(cache, indent=2))
    return out


def _dataset_sources(run_dir: Path) -> dict[str, list[str]]:
    """Dataset label -> [source] from a sweep's stored spec.json (matched against model cards)."""
    try:
        spec = json.loads((Path(run_dir) / "spec.json").read_text())
    except (OSError, ValueError):
        return {}
    out: dict[str, list[str]] = {}
    for d in spec.get("datasets") or [] if isinstance(spec, dict) else []:
        if isinstance(d, dict) and d.get("source"):
            try:
                from embedtune.data import DataSpec

                label = DataSpec.model_validate(d).label
            except Exception:
                label = str(d.get("name") or d["source"])
            out.setdefault(label, []).append(str(d["source"]))
    return out


def should_fine_tune(board, probes: dict[str, dict], metric: str) -> dict[str, dict[str, Any]]:
    """Per dataset: a row per base model (zero-shot, best tuned, gain, probe) and the verdict line,
    judged on the vector search without reranker (the embedding model alone) when present."""
    out = {}
    for ds, rows in board.groupby("dataset", sort=True):
        plain = rows[(rows["query_type"] == "vector") & (rows["reranker"] == "none")]
        rows = plain if not plain.empty else rows
        per_base = []
        for base_model in sorted(rows["base_model"].unique()):
            mine = rows[rows["base_model"] == base_model]
            zs = mine[mine["kind"] == "base"][metric].max()
            tuned = mine[mine["kind"] == "tuned"][metric].max()
            per_base.append({"base_model": base_model, "zero_shot": _num(zs), "best_tuned": _num(tuned),
                             "gain": _num(tuned - zs), "probe": probes.get(f"{ds}|{base_model}")})  # fmt: skip
        zs_all = _num(rows[rows["kind"] == "base"][metric].max())
        tuned_all = _num(rows[rows["kind"] == "tuned"][metric].max())
        best_base = max(
            (b for b in per_base if b["zero_shot"] is not None), key=lambda b: b["zero_shot"], default=None
        )
        tuned_rows = rows[rows["kind"] == "tuned"].sort_values(metric, ascending=False, kind="stable")
        p_best = _num(tuned_rows.iloc[0].get(f"p_{metric}")) if not tuned_rows.empty else None
        line = verdict(zs_all, tuned_all, best_base["probe"] if best_base else None, metric, p_best)
        for b in per_base:
            b["seen"] = seen_verdict(b["probe"])
        seen = best_base["seen"] if best_base else None
        out[str(ds)] = {"rows": per_base, "zero_shot": zs_all, "best_tuned": tuned_all, "verdict": line, "seen": seen,
                        "basis": "vector, no reranker" if not plain.empty else "all query types"}  # fmt: skip
    return out


# ---------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_epochs(board, trials, dataset: str, metric: str, sweep_metric: str, out: Path) -> Path:
    """Left: the sweep metric at each run's last epoch against its epoch count (dots), best per
    epoch count (line), base model dashed. Right: the leaderboard metric of the evaluated models
    (vector search, no reranker) against epochs, base model dashed."""
    plt = _plt()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    points = [p for p in _run_points(trials, sweep_metric) if p["dataset"] == dataset]
    models = sorted(
        {p["model"] for p in points} | set(board[board["dataset"] == dataset]["base_model"].unique())
    )
    color = {m: colors[i % len(colors)] for i, m in enumerate(models)}
    for m in models:
        mine = [p for p in points if p["model"] == m]
        if not mine:
            continue
        left.scatter(
            [p["epochs"] for p in mine], [p["score"] for p in mine], color=color[m], alpha=0.45, s=18
        )
        best = {}
        for p in mine:
            best[p["epochs"]] = max(best.get(p["epochs"], -math.inf), p["score"])
        xs = sorted(best)
        left.plot(xs, [best[x] for x in xs], marker="o", color=color[m], label=m)
        base = next((p["base"] for p in mine if p["base"] is not None), None)
        if base is not None:
            left.axhline(base, color=color[m], linestyle="--", linewidth=1, label=f"{m} (base)")
    left.set_title(f"{dataset}: sweep {sweep_metric} (eval during training)")
    left.set_xlabel("epochs trained")
    left.set_ylabel(sweep_metric)
    if not points:
        left.text(0.5, 0.5, "no trial records", ha="center", va="center", transform=left.transAxes)

    rows = board[board["dataset"] == dataset]
    plain = rows[(rows["query_type"] == "vector") & (rows["reranker"] == "none")]
    rows = (
        plain
        if not plain.empty
        else rows[
            (rows["query_type"] == rows["query_type"].iloc[0])
            & (rows["reranker"] == rows["reranker"].iloc[0])
        ]
    )
    combo = f"{rows['query_type'].iloc[0]}/{rows['reranker'].iloc[0]}" if not rows.empty else ""
    for m in models:
        mine = rows[rows["base_model"] == m]
        tuned = mine[mine["kind"] == "tuned"].dropna(subset=["epochs"]).sort_values("epochs")
        if not tuned.empty:
            right.plot(
                tuned["epochs"].astype(float),
                tuned[metric],
                marker="o",
                linestyle=":",
                color=color[m],
                label=m,
            )
        base = mine[mine["kind"] == "base"][metric]
        if not base.empty:
            right.axhline(float(base.max()), color=color[m], linestyle="--", linewidth=1, label=f"{m} (base)")
    right.set_title(f"{dataset}: {metric} in LanceDB ({combo})")
    right.set_xlabel("epochs trained (best checkpoint)")
    right.set_ylabel(metric)
    for ax in (left, right):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="lower right")
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_best(board, metric: str, out: Path, top: int = 10) -> Path:
    """Horizontal bars of the `top` best (model, query type, reranker) rows per dataset."""
    plt = _plt()
    datasets = sorted(board["dataset"].unique())
    heights = [min(top, int((board["dataset"] == d).sum())) for d in datasets]
    fig, axes = plt.subplots(len(datasets), 1, figsize=(10, 1.2 + 0.38 * sum(heights) + 0.8 * len(datasets)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)  # fmt: skip
    for ax, ds in zip(axes[:, 0], datasets, strict=True):
        rows = board[board["dataset"] == ds].head(top).iloc[::-1]
        labels = [
            f"{m} · {q}/{r}"
            for m, q, r in zip(rows["model"], rows["query_type"], rows["reranker"], strict=True)
        ]
        colors = ["#4c72b0" if k == "tuned" else "#9a9a9a" for k in rows["kind"]]
        ax.barh(labels, rows[metric], color=colors)
        for y, v in enumerate(rows[metric]):
            ax.text(v, y, f" {v:.3f}", va="center", fontsize=7)
        ax.set_xlim(0, min(1.0, float(rows[metric].max()) * 1.12 + 0.02))
        ax.set_title(f"{ds}: best combinations by {metric} (blue: fine-tuned, grey: base)", fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# ---------------------------------------------------------------- writing


def _fmt(v: Any, kind: str = "score") -> str:
    f = _num(v)
    if f is None:
        return "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)
    if kind == "delta":
        return f"{f:+.4f}"
    if kind == "seconds":
        return f"{f:.0f}"
    if kind == "seconds1":
        return f"{f:.1f}"
    if kind == "int":
        return f"{f:.0f}"
    return f"{f:.4f}"


TABLE = [  # (column, header, format)
    ("rank", "#", "int"), ("model", "model", "text"), ("kind", "kind", "text"), ("epochs", "epochs", "int"),
    ("best_epoch", "best ep (sweep)", "epoch"), ("last_epoch", "last ep (sweep)", "epoch"),
    ("query_type", "query", "text"), ("reranker", "reranker", "text"),
    ("hit_at_5", "hit@5", "score"), ("hit_at_10", "hit@10", "score"), ("mrr_at_10", "MRR@10", "score"),
    ("ndcg_at_10", "nDCG@10", "score"), ("DELTA", "Δ vs base", "delta"), ("vs_base", "vs base", "text"),
    ("training_s", "train s", "seconds"), ("gpu_s_per_point", "GPU s/point", "seconds1"), ("flags", "flags", "text"),
]  # fmt: skip


def _cell(r: dict[str, Any], col: str, kind: str, metric: str) -> str:
    """One table cell: a score with its interval ("0.812 [0.770, 0.850]"), the delta with its
    p-value, an epoch with the sweep metric there ("2 (0.740)"), or `_fmt` of the value."""
    if col == "DELTA":
        d, p = _num(r.get(f"delta_{metric}")), _num(r.get(f"p_{metric}"))
        return _fmt(d, "delta") + (f" ({_fmt_p(p)})" if d is not None and p is not None else "")
    if kind == "score":
        v, lo, hi = _num(r.get(col)), _num(r.get(f"{col}_lo")), _num(r.get(f"{col}_hi"))
        if v is not None and lo is not None and hi is not None:
            return f"{v:.3f} [{lo:.3f}, {hi:.3f}]"
    if kind == "epoch":
        e, score = _num(r.get(col)), _num(r.get(f"{col}_score"))
        return "" if e is None else f"{e:.0f}" + (f" ({score:.3f})" if score is not None else "")
    return _fmt(r.get(col), kind)


def _table_cells(rows, metric: str) -> tuple[list[str], list[list[str]]]:
    headers = [h if c != "DELTA" else f"Δ {metric}" for c, h, _ in TABLE]
    body = []
    for r in rows.to_dict("records"):
        body.append([_cell(r, c, f, metric) for c, _, f in TABLE])
    return headers, body


def significance(rows, metric: str) -> dict[str, Any] | None:
    """Which tuned rows of one dataset differ from their base model beyond noise on `metric`:
    {"note": str, "real gain": [...], "real loss": [...], "noise": [...]} (items are markdown), or
    {"note": ...} alone without per-query results; None without tuned rows."""
    tuned = rows[rows["kind"] == "tuned"]
    if tuned.empty:
        return None
    if f"p_{metric}" not in tuned or tuned[f"p_{metric}"].isna().all():
        return {"note": "No per-query results stored for this dataset: no intervals and no test of which "
                        "differences are real (re-run the evaluation to get them)."}  # fmt: skip
    out: dict[str, Any] = {
        "note": f"Real or noise? Δ {metric} of each tuned row against its base model (same dataset, query type and "
                f"reranker) over the same queries: exact McNemar test for hit@k, paired bootstrap for MRR/nDCG; "
                f"real = p < {SIGNIFICANCE}, otherwise noise (each test on its own, no correction for the number of "
                f"rows). Intervals: 95% percentile bootstrap over queries ({N_BOOT} resamples, seed 0).",
        "real gain": [], "real loss": [], "noise": [],
    }  # fmt: skip
    for r in tuned.to_dict("records"):
        words, d, p = r.get("vs_base") or "", _num(r.get(f"delta_{metric}")), _num(r.get(f"p_{metric}"))
        if words in out and d is not None:
            out[words].append(f"`{r['model']}` {r['query_type']}/{r['reranker']} {d:+.3f} ({_fmt_p(p)})")
    return out


_SIG_LABELS = {"real gain": "Real gains (p < 0.05)", "real loss": "Real losses (p < 0.05)",
               "noise": "Noise (p ≥ 0.05, no difference beyond chance)"}  # fmt: skip
EPOCH_NOTE = ("Each tuned checkpoint is its trial's best epoch. An epoch count is named best only when it beats "
              "every other evaluated epoch count beyond noise (paired test, p < 0.05); otherwise the fewest "
              "epochs within noise of the top score are recommended.")  # fmt: skip


def confidence_md(rows, metric: str, advice: list[dict[str, Any]] | None, dataset: str) -> list[str]:
    """Markdown lines under a dataset's table: real vs noise differences and the epoch advice."""
    out: list[str] = []
    sig = significance(rows, metric)
    if sig:
        out += [f"**{sig['note']}**" if len(sig) == 1 else sig["note"], ""]
        out += [f"- {_SIG_LABELS[k]}: {'; '.join(sig[k]) or 'none'}" for k in _SIG_LABELS if k in sig]
        out += [""] if len(sig) > 1 else []
    if advice:
        out += [f"### Epochs ({dataset})", "", *[f"- {a['text']}" for a in advice], "", EPOCH_NOTE, ""]
    return out


def _inline_html(text: str) -> str:
    """Escape, then render the markdown `**bold**` and `` `code` `` of a generated line."""
    import re

    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", html.escape(text))
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def confidence_html(rows, metric: str, advice: list[dict[str, Any]] | None, dataset: str) -> list[str]:
    """HTML parts of `confidence_md`."""
    parts: list[str] = []
    sig = significance(rows, metric)
    if sig:
        parts.append(f"<p>{_inline_html(sig['note'])}</p>")
        items = "".join(f"<li>{html.escape(_SIG_LABELS[k])}: {_inline_html('; '.join(sig[k]) or 'none')}</li>"
                        for k in _SIG_LABELS if k in sig)  # fmt: skip
        parts += [f"<ul>{items}</ul>"] if items else []
    if advice:
        items = "".join(f"<li>{_inline_html(a['text'])}</li>" for a in advice)
        parts += [f"<h3>Epochs ({html.escape(dataset)})</h3><ul>{items}</ul><p>{html.escape(EPOCH_NOTE)}</p>"]
    return parts


def _md_table(headers: list[str], body: list[list[str]]) -> str:
    esc = [[c.replace("|", "\\|") for c in row] for row in body]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in esc]
    return "\n".join(lines)


def _pct(v: Any) -> str:
    f = _num(v)
    return "" if f is None else f"{f:.1%}"


def _probe_cells(row: dict[str, Any]) -> list[str]:
    p = row.get("probe") or {}
    card = ", ".join(p.get("card_matches") or []) or ("none listed" if p.get("card_datasets") else "")
    return [row["base_model"], _fmt(row["zero_shot"]), _fmt(row["best_tuned"]), _fmt(row["gain"], "delta"),
            _fmt(p.get("eval_to_train_sim")), _fmt(p.get("train_to_train_sim")),
            _fmt(p.get("train_hit_at_10")), _fmt(p.get("eval_hit_at_10")),
            _pct(p.get("near_dup_rate")), _pct(p.get("exact_dup_rate")), card]  # fmt: skip


PROBE_HEADERS = ["base model", "zero-shot", "best tuned", "gain", "eval→train sim", "train→train sim",
                 "train-q hit@10 (0-shot)", "eval-q hit@10 (0-shot)", "near-dup eval q", "exact-dup eval q",
                 "on model card"]  # fmt: skip
SEEN_NOTE = ("Already seen: near-dup = share of eval questions whose nearest train question has base-model cosine "
             ">= the threshold (or an exact match); exact-dup = same normalised text (lowercase, no punctuation or "
             "extra whitespace); on model card = training datasets the base model's card lists that name this data.")  # fmt: skip


# ---------------------------------------------------------------- do no harm (section writer)

HARM_HEADERS = ["out-of-domain set", "base model", "base", "winner", "winner score", "Δ", "95% interval of Δ",
                "p", "queries", "flag"]  # fmt: skip


def _harm_cells(row: dict[str, Any]) -> list[str]:
    lo, hi = _num(row.get("ci_low")), _num(row.get("ci_high"))
    band = f"[{lo:+.4f}, {hi:+.4f}]" if lo is not None and hi is not None else ""
    p = _num(row.get("p_value"))
    return [str(row.get("ood", "")), str(row.get("base_model", "")), _fmt(row.get("base_score")),
            str(row.get("winner", "")), _fmt(row.get("winner_score")), _fmt(row.get("delta"), "delta"), band,
            "" if p is None else f"{p:.3g}", _fmt(row.get("n_queries"), "int"), str(row.get("flag") or "")]  # fmt: skip


def harm_note(harm: dict[str, Any]) -> str:
    metric = harm.get("metric", "hit_at_10")
    return (f"Do no harm: the winner and its base model on out-of-domain sets (vector search, {metric}). "
            f"Δ = winner − base; interval: paired bootstrap of the per-query difference; p: {harm.get('test', 'paired test')}. "
            f"Flag `harm`: the winner scores lower and the drop is significant (p < {harm.get('alpha', 0.05)}) or "
            "larger than the 95% band (the interval of Δ lies below 0, or the drop exceeds the half-width of the "
            "base score's own 95% interval).")  # fmt: skip


def harm_md(harm: dict[str, Any] | None, dataset: str) -> list[str]:
    """Markdown lines of the "Do no harm" table of the winner trained on `dataset` (none: [])."""
    rows = [r for r in (harm or {}).get("rows", []) if str(r.get("dataset")) == str(dataset)]
    if not rows:
        return []
    flagged = [r for r in rows if r.get("flag") == "harm"]
    line = (f"**Harm:** `{flagged[0]['winner']}` loses on {', '.join(r['ood'] for r in flagged)}." if flagged
            else "**No harm found:** no out-of-domain set shows a significant drop.")  # fmt: skip
    return [f"### Do no harm ({dataset})", "", line, "", harm_note(harm), "",
            _md_table(HARM_HEADERS, [_harm_cells(r) for r in rows]), ""]  # fmt: skip


def harm_html(harm: dict[str, Any] | None, dataset: str, table) -> list[str]:
    """HTML parts of the same section; `table(headers, body)` renders a table."""
    rows = [r for r in (harm or {}).get("rows", []) if str(r.get("dataset")) == str(dataset)]
    if not rows:
        return []
    e = html.escape
    flagged = [r for r in rows if r.get("flag") == "harm"]
    line = (f"<b>Harm:</b> <code>{e(str(flagged[0]['winner']))}</code> loses on {e(', '.join(r['ood'] for r in flagged))}."
            if flagged else "<b>No harm found:</b> no out-of-domain set shows a significant drop.")  # fmt: skip
    return [f"<h3>Do no harm ({e(str(dataset))})</h3>", f"<p>{line}</p>", f"<p>{e(harm_note(harm))}</p>",
            table(HARM_HEADERS, [_harm_cells(r) for r in rows])]  # fmt: skip


def _winner_test(winner: dict[str, Any], metric: str) -> str:
    """', real gain, p<0.001' / ', noise, p=0.41' for the winner line; '' without a test."""
    words, p = winner.get("vs_base"), _num(winner.get(f"p_{metric}"))
    return f", {words}, {_fmt_p(p)}" if words and p is not None else ""


def write_markdown(
    path: Path, board, metric: str, winner, verdicts, flags, plots: list[Path], epochs: dict | None = None
) -> Path:
    out = ["# embedtune leaderboard", ""]
    if winner:
        out += [f"**Winner** ({metric}): `{winner['model']}` on {winner['dataset']} — {winner['query_type']}/"
                f"{winner['reranker']}, {metric} {winner[metric]:.4f}"
                + (f" ({winner[f'delta_{metric}']:+.4f} vs base{_winner_test(winner, metric)})" if winner.get(f"delta_{metric}") is not None else ""), ""]  # fmt: skip
    for ds, rows in board.groupby("dataset", sort=True):
        out += [f"## {ds}", "", _md_table(*_table_cells(rows, metric)), ""]
        out += confidence_md(rows, metric, (epochs or {}).get(str(ds)), str(ds))
        v = verdicts.get(str(ds))
        if v:
            out += [f"### Should you fine-tune? ({ds})", "", f"**Verdict:** {v['verdict']}", "",
                    *([f"**{v['seen']}**", ""] if v.get("seen") else []),
                    f"Scores: {metric}, {v['basis']}. Similarities: mean base-model cosine of each eval question to its "
                    "nearest train question vs of train questions to their nearest other train question. Zero-shot "
                    "hit@10 of train vs eval questions over one shared corpus: a base model that already retrieves the "
                    "training pairs leaves little for fine-tuning to teach.", "",
                    _md_table(PROBE_HEADERS, [_probe_cells(r) for r in v["rows"]]), "", SEEN_NOTE, ""]  # fmt: skip
            out += harm_md(v.get("harm"), str(ds))
        mine = [f for f in flags if f["dataset"] == str(ds)]
        if mine:
            out += [f"### Overfitting flags ({ds})", ""]
            out += [f"- `{f['model']}` trial {f['trial_id']} ({f['flag']}): {f['message']}" for f in mine]
            out += [""]
    if plots:
        out += ["## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots] + [""]
    path.write_text("\n".join(out))
    return path


def write_html(
    path: Path, board, metric: str, winner, verdicts, flags, plots: list[Path], epochs: dict | None = None
) -> Path:
    e = html.escape

    def table(headers, body):
        head = "".join(f"<th>{e(h)}</th>" for h in headers)
        rows = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in body)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"

    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>embedtune leaderboard</title><style>"
             "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}th{background:#eee}"
             "td:nth-child(2),td:nth-child(3){text-align:left}img{max-width:100%}</style></head><body>",
             "<h1>embedtune leaderboard</h1>"]  # fmt: skip
    if winner:
        parts.append(f"<p><b>Winner</b> ({e(metric)}): <code>{e(str(winner['model']))}</code> on {e(str(winner['dataset']))}"
                     f" — {e(str(winner['query_type']))}/{e(str(winner['reranker']))}, {winner[metric]:.4f}"
                     f"{e(_winner_test(winner, metric))}</p>")  # fmt: skip
    for ds, rows in board.groupby("dataset", sort=True):
        parts += [f"<h2>{e(str(ds))}</h2>", table(*_table_cells(rows, metric))]
        parts += confidence_html(rows, metric, (epochs or {}).get(str(ds)), str(ds))
        v = verdicts.get(str(ds))
        if v:
            parts += [f"<h3>Should you fine-tune? ({e(str(ds))})</h3>", f"<p><b>Verdict:</b> {e(v['verdict'])}</p>",
                      *([f"<p><b>{e(v['seen'])}</b></p>"] if v.get("seen") else []),
                      table(PROBE_HEADERS, [_probe_cells(r) for r in v["rows"]]), f"<p>{e(SEEN_NOTE)}</p>"]  # fmt: skip
            parts += harm_html(v.get("harm"), str(ds), table)
        mine = [f for f in flags if f["dataset"] == str(ds)]
        if mine:
            items = "".join(
                f"<li><code>{e(f['model'])}</code> trial {e(f['trial_id'])} ({e(f['flag'])}): {e(f['message'])}</li>"
                for f in mine
            )
            parts += [f"<h3>Overfitting flags ({e(str(ds))})</h3><ul>{items}</ul>"]
    parts += ["<h2>Plots</h2>"] + [f"<p><img src='plots/{e(p.name)}' alt='{e(p.stem)}'></p>" for p in plots]
    parts.append("</body></html>")
    path.write_text("\n".join(parts))
    return path


HARM_FILE = "harm.json"


def load_harm(run_dir: Path, dataset_winners: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The stored do-no-harm check (`report/harm.json`, written by the final stage), keeping only the
    rows whose winner is still the dataset's winner (a re-evaluation may have picked another)."""
    path = Path(run_dir) / REPORT_DIR / HARM_FILE
    if not path.exists():
        return {}
    try:
        harm = json.loads(path.read_text())
    except ValueError:
        log.warning("%s is not valid JSON: no do-no-harm section", path)
        return {}
    if dataset_winners is not None:
        current = {ds: (w or {}).get("model") for ds, w in dataset_winners.items()}
        kept = [r for r in harm.get("rows", []) if current.get(str(r.get("dataset"))) == r.get("winner")]
        if len(kept) < len(harm.get("rows", [])):
            log.warning("dropping %d stale do-no-harm row(s) of models that are no longer the winner",
                        len(harm.get("rows", [])) - len(kept))  # fmt: skip
        harm["rows"] = kept
    return harm


def save_results(run_dir: Path, results) -> Path:
    """Store the evaluation rows as `<run_dir>/report/results.csv` (what `rebuild_report` reads) and
    their per-query values (the `per_query` column, if any) as `report/per_query.parquet`: one row
    per (dataset, model, query_type, reranker, metric) with the list of values. A stale sidecar is
    removed when the rows carry no per-query values."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    report_dir = Path(run_dir) / REPORT_DIR
    report_dir.mkdir(parents=True, exist_ok=True)
    path = report_dir / RESULTS_FILE
    results.drop(columns=[PER_QUERY], errors="ignore").to_csv(path, index=False)
    sidecar = report_dir / PER_QUERY_FILE
    rows: dict[str, list] = {k: [] for k in [*_PQ_KEYS, "metric", "values"]}
    if PER_QUERY in results:
        for rec in results[[*_PQ_KEYS, PER_QUERY]].to_dict("records"):
            for m, values in (rec[PER_QUERY] if isinstance(rec[PER_QUERY], dict) else {}).items():
                for k in _PQ_KEYS:
                    rows[k].append(str(rec[k]))
                rows["metric"].append(str(m))
                rows["values"].append([float(x) for x in values])
    if rows["metric"]:
        schema = pa.schema(
            [*((k, pa.string()) for k in [*_PQ_KEYS, "metric"]), ("values", pa.list_(pa.float64()))]
        )
        pq.write_table(pa.table(rows, schema=schema), sidecar)
    elif sidecar.exists():
        sidecar.unlink()
    return path


def _load_per_query(path: Path) -> dict[tuple[str, ...], dict[str, Any]]:
    """(dataset, model, query_type, reranker) -> {metric: float array} from a per-query sidecar."""
    import numpy as np
    import pyarrow.parquet as pq

    tbl = pq.read_table(path)
    col = tbl.column("values").combine_chunks()
    flat, offsets = col.flatten().to_numpy(zero_copy_only=False), col.offsets.to_numpy()
    keys = zip(*(tbl.column(k).to_pylist() for k in [*_PQ_KEYS, "metric"]), strict=True)
    out: dict[tuple[str, ...], dict[str, Any]] = {}
    for i, (*key, metric) in enumerate(keys):
        out.setdefault(tuple(key), {})[metric] = np.asarray(flat[offsets[i] : offsets[i + 1]], dtype=float)
    return out


def load_results(run_dir: Path):
    import pandas as pd

    path = Path(run_dir) / REPORT_DIR / RESULTS_FILE
    if not path.exists():
        raise EmbedtuneError(
            f"no stored results in {run_dir}: {path} is missing (run the final stage or `embedtune evaluate` first)"
        )
    df = pd.read_csv(path, dtype={"trial_id": "string"})
    df["trial_id"] = df["trial_id"].astype(object).where(df["trial_id"].notna(), None)
    sidecar = path.parent / PER_QUERY_FILE
    if sidecar.exists():  # older runs have none: their report has blank intervals
        values = _load_per_query(sidecar)
        keys = zip(*(df[k].astype(str) for k in _PQ_KEYS), strict=True)
        df[PER_QUERY] = [values.get(tuple(k)) for k in keys]
    return df


def _safe(text: str) -> str:
    import re

    return re.sub(r"[^\w.-]+", "_", str(text))


def build_report(
    run_dir: Path,
    trials: list[dict[str, Any]],
    results,
    datasets: dict[str, PreparedData],
    metric: str = "hit_at_10",
    sweep_metric: str = "ir_recall_at_10",
    probe_size: int = 200,
) -> ReportResult:
    """Write the leaderboard (md, csv, html), plots and the stored inputs to `<run_dir>/report/`."""
    run_dir = Path(run_dir)
    report_dir = run_dir / REPORT_DIR
    plots_dir = report_dir / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    results_path = save_results(run_dir, results)
    flags = overfitting_flags(trials, sweep_metric)
    board = leaderboard(results, trials, metric, flags, sweep_metric)
    epochs = epoch_advice(results, metric)
    winner = pick_winner(board, metric)
    dataset_winners = {str(ds): pick_winner(rows, metric) for ds, rows in board.groupby("dataset", sort=True)}
    probes = _probe_all(run_dir, board, datasets, probe_size)
    verdicts = should_fine_tune(board, probes, metric)
    harm = load_harm(run_dir, dataset_winners)
    for ds, v in verdicts.items():
        mine = [r for r in harm.get("rows", []) if str(r.get("dataset")) == ds]
        keep = {k: harm[k] for k in ("metric", "alpha", "test") if k in harm}
        v["harm"] = {**keep, "rows": mine} if mine else None

    for old in plots_dir.glob("*.png"):
        old.unlink()
    plots = [plot_epochs(board, trials, str(ds), metric, sweep_metric, plots_dir / f"epochs_{_safe(ds)}.png")
             for ds in sorted(board["dataset"].unique())]  # fmt: skip
    plots.append(plot_best(board, metric, plots_dir / "best_combinations.png"))

    files = {
        "leaderboard_csv": report_dir / "leaderboard.csv",
        "leaderboard_md": report_dir / "leaderboard.md",
        "leaderboard_html": report_dir / "leaderboard.html",
        "results": results_path,
        "meta": report_dir / "meta.json",
    }
    board.to_csv(files["leaderboard_csv"], index=False)
    write_markdown(files["leaderboard_md"], board, metric, winner, verdicts, flags, plots, epochs=epochs)
    write_html(files["leaderboard_html"], board, metric, winner, verdicts, flags, plots, epochs=epochs)
    meta = {"metric": metric, "sweep_metric": sweep_metric, "probe_size": probe_size, "winner": winner,
            "dataset_winners": dataset_winners, "verdicts": verdicts, "flags": flags,
            "epoch_advice": epochs}  # fmt: skip
    files["meta"].write_text(json.dumps(meta, indent=2, default=str))
    if harm:
        files["harm"] = run_dir / REPORT_DIR / HARM_FILE
    return ReportResult(
        report_dir, files, plots, winner, metric, board, dataset_winners, verdicts, flags, harm
    )


def rebuild_report(run_dir: Path, metric: str | None = None) -> ReportResult:
    """Rebuild the report from what a run stored (report/results.csv, trials.json, data/<label>.json,
    report/meta.json and the probe cache) without evaluating anything."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise EmbedtuneError(f"run dir {run_dir} does not exist")
    results = load_results(run_dir)
    trials_file = run_dir / "trials.json"
    trials = json.loads(trials_file.read_text()) if trials_file.exists() else []
    datasets = {}
    for f in sorted((run_dir / "data").glob("*.json")):
        data = PreparedData.load(f)
        datasets[data.label] = data
    meta_file = run_dir / REPORT_DIR / "meta.json"
    meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
    return build_report(
        run_dir,
        trials,
        results,
        datasets,
        metric=metric or meta.get("metric", "hit_at_10"),
        sweep_metric=meta.get("sweep_metric", "ir_recall_at_10"),
        probe_size=int(meta.get("probe_size", 200)),
    )


__all__ = [
    "ReportResult", "add_confidence", "build_report", "epoch_advice", "fine_tune_probe", "leaderboard",
    "load_results", "overfitting_flags",
    "pick_winner", "rebuild_report", "save_results", "should_fine_tune", "verdict",
]  # fmt: skip
