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


def leaderboard(results, trials: list[dict[str, Any]] | None = None, metric: str = "hit_at_10", flags=None):
    """Every results row, with `base_<m>` / `delta_<m>` for each metric (against the base-model row
    of the same dataset, query type and reranker), `training_s`, `gpu_seconds`,
    `gpu_s_per_point` (GPU seconds per point of `metric` gained; NaN on CPU or without a gain),
    `flags`, and `rank` within the dataset; sorted by dataset, then `metric` (best first)."""
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
        if isinstance(v, float) and math.isnan(v):
            v = None
        if k == "epochs" and isinstance(v, float):
            v = int(v)  # a column with blanks (base rows) reads back as float
        out[k] = v
    return out


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


def fine_tune_probe(
    data: PreparedData, model_path: str, sample: int = 200, corpus_size: int = 1000, seed: int = 0
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
    }


def verdict(
    zero_shot: float | None, best_tuned: float | None, probe: dict[str, Any] | None, metric: str
) -> str:
    """One line: should this dataset be fine-tuned on, judged from the best base model's zero-shot
    score, the best tuned model's score and the familiarity probe."""
    if zero_shot is None:
        return "No base-model score: cannot judge."
    familiar = ""
    if probe and _num(probe.get("train_hit_at_10")) is not None:
        familiar = f"; zero-shot hit@10 on train questions {probe['train_hit_at_10']:.2f} vs eval {probe['eval_hit_at_10']:.2f}"
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
        return f"Fine-tune: the best run gains {gain:+.1f} points of {metric} ({zero_shot:.3f} → {best_tuned:.3f})."
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
    for ds, model, path in bases.itertuples(index=False):
        data = datasets.get(ds)
        key = f"{ds}|{model}|{data.fingerprint if data else ''}|{probe_size}"
        if key not in cache and data is not None and probe_size > 0 and Path(str(path)).exists():
            try:
                cache[key] = fine_tune_probe(data, str(path), sample=probe_size)
            except Exception as exc:  # a probe failure must not lose the leaderboard
                log.warning("fine-tune probe of %s on %s failed: %s", model, ds, exc)
        if key in cache:
            out[f"{ds}|{model}"] = cache[key]
    cache_file.write_text(json.dumps(cache, indent=2))
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
        line = verdict(zs_all, tuned_all, best_base["probe"] if best_base else None, metric)
        out[str(ds)] = {"rows": per_base, "zero_shot": zs_all, "best_tuned": tuned_all, "verdict": line,
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
    ("query_type", "query", "text"), ("reranker", "reranker", "text"),
    ("hit_at_5", "hit@5", "score"), ("hit_at_10", "hit@10", "score"), ("mrr_at_10", "MRR@10", "score"),
    ("ndcg_at_10", "nDCG@10", "score"), ("DELTA", "Δ vs base", "delta"), ("training_s", "train s", "seconds"),
    ("gpu_s_per_point", "GPU s/point", "seconds1"), ("flags", "flags", "text"),
]  # fmt: skip


def _table_cells(rows, metric: str) -> tuple[list[str], list[list[str]]]:
    headers = [h if c != "DELTA" else f"Δ {metric}" for c, h, _ in TABLE]
    body = []
    for r in rows.to_dict("records"):
        body.append([_fmt(r[f"delta_{metric}"] if c == "DELTA" else r.get(c), f) for c, _, f in TABLE])
    return headers, body


def _md_table(headers: list[str], body: list[list[str]]) -> str:
    esc = [[c.replace("|", "\\|") for c in row] for row in body]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in esc]
    return "\n".join(lines)


def _probe_cells(row: dict[str, Any]) -> list[str]:
    p = row.get("probe") or {}
    return [row["base_model"], _fmt(row["zero_shot"]), _fmt(row["best_tuned"]), _fmt(row["gain"], "delta"),
            _fmt(p.get("eval_to_train_sim")), _fmt(p.get("train_to_train_sim")),
            _fmt(p.get("train_hit_at_10")), _fmt(p.get("eval_hit_at_10"))]  # fmt: skip


PROBE_HEADERS = ["base model", "zero-shot", "best tuned", "gain", "eval→train sim", "train→train sim",
                 "train-q hit@10 (0-shot)", "eval-q hit@10 (0-shot)"]  # fmt: skip


def write_markdown(path: Path, board, metric: str, winner, verdicts, flags, plots: list[Path]) -> Path:
    out = ["# embedtune leaderboard", ""]
    if winner:
        out += [f"**Winner** ({metric}): `{winner['model']}` on {winner['dataset']} — {winner['query_type']}/"
                f"{winner['reranker']}, {metric} {winner[metric]:.4f}"
                + (f" ({winner[f'delta_{metric}']:+.4f} vs base)" if winner.get(f"delta_{metric}") is not None else ""), ""]  # fmt: skip
    for ds, rows in board.groupby("dataset", sort=True):
        out += [f"## {ds}", "", _md_table(*_table_cells(rows, metric)), ""]
        v = verdicts.get(str(ds))
        if v:
            out += [f"### Should you fine-tune? ({ds})", "", f"**Verdict:** {v['verdict']}", "",
                    f"Scores: {metric}, {v['basis']}. Similarities: mean base-model cosine of each eval question to its "
                    "nearest train question vs of train questions to their nearest other train question. Zero-shot "
                    "hit@10 of train vs eval questions over one shared corpus: a base model that already retrieves the "
                    "training pairs leaves little for fine-tuning to teach.", "",
                    _md_table(PROBE_HEADERS, [_probe_cells(r) for r in v["rows"]]), ""]  # fmt: skip
        mine = [f for f in flags if f["dataset"] == str(ds)]
        if mine:
            out += [f"### Overfitting flags ({ds})", ""]
            out += [f"- `{f['model']}` trial {f['trial_id']} ({f['flag']}): {f['message']}" for f in mine]
            out += [""]
    if plots:
        out += ["## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots] + [""]
    path.write_text("\n".join(out))
    return path


def write_html(path: Path, board, metric: str, winner, verdicts, flags, plots: list[Path]) -> Path:
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
                     f" — {e(str(winner['query_type']))}/{e(str(winner['reranker']))}, {winner[metric]:.4f}</p>")  # fmt: skip
    for ds, rows in board.groupby("dataset", sort=True):
        parts += [f"<h2>{e(str(ds))}</h2>", table(*_table_cells(rows, metric))]
        v = verdicts.get(str(ds))
        if v:
            parts += [f"<h3>Should you fine-tune? ({e(str(ds))})</h3>", f"<p><b>Verdict:</b> {e(v['verdict'])}</p>",
                      table(PROBE_HEADERS, [_probe_cells(r) for r in v["rows"]])]  # fmt: skip
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


def save_results(run_dir: Path, results) -> Path:
    """Store the evaluation rows as `<run_dir>/report/results.csv` (what `rebuild_report` reads)."""
    report_dir = Path(run_dir) / REPORT_DIR
    report_dir.mkdir(parents=True, exist_ok=True)
    path = report_dir / RESULTS_FILE
    results.to_csv(path, index=False)
    return path


def load_results(run_dir: Path):
    import pandas as pd

    path = Path(run_dir) / REPORT_DIR / RESULTS_FILE
    if not path.exists():
        raise EmbedtuneError(
            f"no stored results in {run_dir}: {path} is missing (run the final stage or `embedtune evaluate` first)"
        )
    df = pd.read_csv(path, dtype={"trial_id": "string"})
    df["trial_id"] = df["trial_id"].astype(object).where(df["trial_id"].notna(), None)
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
    board = leaderboard(results, trials, metric, flags)
    winner = pick_winner(board, metric)
    dataset_winners = {str(ds): pick_winner(rows, metric) for ds, rows in board.groupby("dataset", sort=True)}
    probes = _probe_all(run_dir, board, datasets, probe_size)
    verdicts = should_fine_tune(board, probes, metric)

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
    write_markdown(files["leaderboard_md"], board, metric, winner, verdicts, flags, plots)
    write_html(files["leaderboard_html"], board, metric, winner, verdicts, flags, plots)
    meta = {"metric": metric, "sweep_metric": sweep_metric, "probe_size": probe_size, "winner": winner,
            "dataset_winners": dataset_winners, "verdicts": verdicts, "flags": flags}  # fmt: skip
    files["meta"].write_text(json.dumps(meta, indent=2, default=str))
    return ReportResult(report_dir, files, plots, winner, metric, board, dataset_winners, verdicts, flags)


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
    "ReportResult", "build_report", "fine_tune_probe", "leaderboard", "load_results", "overfitting_flags",
    "pick_winner", "rebuild_report", "save_results", "should_fine_tune", "verdict",
]  # fmt: skip
