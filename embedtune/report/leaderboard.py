"""The leaderboard (pure): every evaluation row with its delta against its base model, a 95%
interval per metric, a paired test against the base row, training cost, flags and rank; and the
winner."""

from __future__ import annotations

import math
from typing import Any

from embedtune.errors import EmbedtuneError
from embedtune.records import TrialRecord, best_point, number
from embedtune.report_store import PER_QUERY
from embedtune.specs.metrics import (
    DEFAULT_LEADERBOARD_METRIC,
    DEFAULT_SWEEP_METRIC,
    LEADERBOARD_METRICS,
    TIE_BREAK_METRIC,
)
from embedtune.stats import N_BOOT  # bootstrap resamples of the intervals and the paired tests (seeded)

SIGNIFICANCE = 0.05  # p below this: a real difference; at or above it: noise


def leaderboard(
    results,
    trials: list[TrialRecord] | None = None,
    metric: str = DEFAULT_LEADERBOARD_METRIC,
    flags=None,
    sweep_metric: str = DEFAULT_SWEEP_METRIC,
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

    if metric not in LEADERBOARD_METRICS:
        raise EmbedtuneError(
            f"leaderboard metric must be one of {', '.join(LEADERBOARD_METRICS)}, got {metric!r}"
        )
    df = results.copy().reset_index(drop=True)
    if df.empty:
        raise EmbedtuneError("no evaluation results to report")
    for col in ("trial_id", "epochs"):
        if col not in df:
            df[col] = None
    metrics = [m for m in LEADERBOARD_METRICS if m in df]
    keys = ["dataset", "query_type", "reranker"]
    base = df[df["kind"] == "base"][[*keys, "model", *metrics]].drop_duplicates([*keys, "model"])
    base = base.rename(columns={"model": "base_model", **{m: f"base_{m}" for m in metrics}})
    df = df.merge(base, on=[*keys, "base_model"], how="left")
    for m in metrics:
        df[f"delta_{m}"] = df[m] - df[f"base_{m}"]

    by_trial = {str(t.trial_id): t for t in trials or []}
    training, gpu = [], []
    for kind, tid in zip(df["kind"], df["trial_id"], strict=True):
        t = by_trial.get(str(tid)) if tid is not None and tid == tid else None
        training.append(0.0 if kind == "base" else (number(t.duration_s) if t else None))
        gpu.append(number(t.gpu_seconds) if t else None)
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
    df = df.sort_values(
        ["dataset", metric, TIE_BREAK_METRIC, "model", "query_type", "reranker"],
        ascending=[True, False, False, True, True, True],
        kind="stable",
    ).reset_index(drop=True)
    df["rank"] = df.groupby("dataset").cumcount() + 1
    return df


def pick_winner(
    board, metric: str = DEFAULT_LEADERBOARD_METRIC, kind: str | None = "tuned"
) -> dict[str, Any] | None:
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
        [metric, "_d", TIE_BREAK_METRIC, "model"], ascending=[False, False, False, True], kind="stable"
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


def query_values(cell: Any, metric: str):
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
        vals = [query_values(c, m) for c in cells]
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
            ref = query_values(base_cells.get((ds, qt, rr, bm)), m)
            if kind != "base" and vals[i] is not None and ref is not None and ref.size == vals[i].size:
                pairs.append((i, vals[i], ref))
        new[f"{m}_lo"], new[f"{m}_hi"], new[f"p_{m}"] = lo, hi, _pvalues(pairs, m, len(df), n_boot, seed)
    p = new.get(f"p_{metric}", np.full(len(df), np.nan))
    delta = df[f"delta_{metric}"] if f"delta_{metric}" in df else pd.Series(np.nan, index=df.index)
    new["significant"] = pd.array([None if x != x else bool(x < SIGNIFICANCE) for x in p], dtype="boolean")
    new["vs_base"] = [_words(number(x), number(d)) for x, d in zip(p, delta, strict=True)]
    df = df.drop(columns=[PER_QUERY], errors="ignore")
    return df.assign(**new)


def trial_epochs(trial: TrialRecord, sweep_metric: str) -> tuple[float | None, ...]:
    """(best epoch, sweep metric there, last epoch, sweep metric there) of a trial: the best epoch as
    the record states it (what the final stage evaluates), the last one from its history."""
    scored = sorted(
        (p for p in trial.history if p.epoch > 0 and p.score(sweep_metric) is not None), key=lambda p: p.epoch
    )
    best_epoch, best_score = trial.best_epoch, trial.score(sweep_metric)
    if best_epoch is None and scored:
        best = best_point(scored, sweep_metric)
        best_epoch, best_score = best.epoch, best.score(sweep_metric)
    if best_score is None and best_epoch is not None:
        best_score = next((p.score(sweep_metric) for p in scored if p.epoch == best_epoch), None)
    if not scored:
        return best_epoch, best_score, number(trial.epochs_done), None
    return best_epoch, best_score, scored[-1].epoch, scored[-1].score(sweep_metric)


def _epoch_columns(df, by_trial: dict[str, TrialRecord], sweep_metric: str):
    """`best_epoch`, `best_epoch_score`, `last_epoch`, `last_epoch_score` of tuned rows (blank for
    base rows and rows without a trial record); the scores are `sweep_metric`."""
    import pandas as pd

    cols: list[list[float | None]] = [[], [], [], []]
    for kind, tid in zip(df["kind"], df["trial_id"], strict=True):
        t = by_trial.get(str(tid)) if kind == "tuned" and tid is not None and tid == tid else None
        for col, v in zip(cols, trial_epochs(t, sweep_metric) if t else (None,) * 4, strict=True):
            col.append(v)
    names = ["best_epoch", "best_epoch_score", "last_epoch", "last_epoch_score"]
    return df.assign(
        **{n: pd.array(c, dtype="Float64").astype(float) for n, c in zip(names, cols, strict=True)}
    )


def cost_rows(rows):
    """One row per model of one dataset's leaderboard rows with the encode cost columns: its vector
    search without reranker (the embedding alone), else its first row; empty without cost columns."""
    if "docs_per_s" not in rows or rows["docs_per_s"].isna().all():
        return rows.iloc[0:0]
    plain = rows[(rows["query_type"] == "vector") & (rows["reranker"] == "none")]
    rows = plain if not plain.empty else rows
    return rows.dropna(subset=["docs_per_s"]).drop_duplicates("model")


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the (throughput, quality) points no other point beats on both (at least as high on
    both, higher on one), ordered by throughput, fastest last."""
    front = [
        i
        for i, (x, y) in enumerate(points)
        if not any((x2 >= x and y2 >= y) and (x2 > x or y2 > y) for x2, y2 in points)
    ]
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


def cheapest_within_noise(rows, metric: str) -> dict[str, Any] | None:
    """Among one dataset's models (`cost_rows`), the fastest whose `metric` reaches the lower end of
    the best model's 95% interval (`<metric>_lo`; the best's score itself without intervals), and
    the best: {"best": row, "cheapest": row}; None without cost columns."""
    rows = cost_rows(rows)
    if rows.empty:
        return None
    best = rows.sort_values([metric, "docs_per_s"], ascending=[False, False], kind="stable").iloc[0]
    floor = number(best.get(f"{metric}_lo"))
    floor = number(best[metric]) if floor is None else floor
    near = rows[rows[metric] >= floor]
    cheapest = near.sort_values("docs_per_s", ascending=False, kind="stable").iloc[0]
    return {"best": _clean_row(best.to_dict()), "cheapest": _clean_row(cheapest.to_dict())}
