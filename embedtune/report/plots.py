"""The report's plots (matplotlib, Agg): epochs per dataset, and the best combinations."""

from __future__ import annotations

import math
from pathlib import Path

from embedtune.report.epochs import run_points
from embedtune.report.leaderboard import cost_rows, pareto_front

COST_PLOT = "quality_vs_throughput.png"


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
    points = [p for p in run_points(trials, sweep_metric) if p["dataset"] == dataset]
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
            right.errorbar(
                tuned["epochs"].astype(float),
                tuned[metric],
                yerr=_yerr(tuned, metric),
                marker="o",
                linestyle=":",
                capsize=3,
                color=color[m],
                label=f"{m} (95% interval)",
            )
        base = mine[mine["kind"] == "base"].sort_values(metric, ascending=False)
        if not base.empty:
            b = base.iloc[0]
            right.axhline(float(b[metric]), color=color[m], linestyle="--", linewidth=1, label=f"{m} (base)")
            lo, hi = b.get(f"{metric}_lo"), b.get(f"{metric}_hi")
            if lo is not None and hi is not None and not (math.isnan(lo) or math.isnan(hi)):
                right.axhspan(float(lo), float(hi), color=color[m], alpha=0.08)
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


def _yerr(rows, metric: str):
    """Asymmetric error bars from the rows' 95% interval columns; None without them."""
    lo, hi = f"{metric}_lo", f"{metric}_hi"
    if lo not in rows or hi not in rows or rows[lo].isna().all():
        return None
    return [
        (rows[metric] - rows[lo]).clip(lower=0).fillna(0),
        (rows[hi] - rows[metric]).clip(lower=0).fillna(0),
    ]


def one_fts_row(rows):
    """Full-text rows do not depend on the embedding model: keep one per (dataset, reranker)."""
    fts = rows["query_type"] == "fts"
    return rows[~fts | ~rows.duplicated(["dataset", "query_type", "reranker"])]


def plot_best(board, metric: str, out: Path, top: int = 10) -> Path:
    """The `top` best (model, query type, reranker) rows per dataset as points with their 95%
    intervals, on an axis zoomed to the scores (bars from 0 would hide differences of a few points)."""
    plt = _plt()
    board = one_fts_row(board)
    datasets = sorted(board["dataset"].unique())
    heights = [min(top, int((board["dataset"] == d).sum())) for d in datasets]
    fig, axes = plt.subplots(
        len(datasets),
        1,
        figsize=(10, 1.2 + 0.38 * sum(heights) + 0.8 * len(datasets)),
        gridspec_kw={"height_ratios": heights},
        squeeze=False,
    )
    for ax, ds in zip(axes[:, 0], datasets, strict=True):
        rows = board[board["dataset"] == ds].head(top).iloc[::-1]
        labels = [
            f"{'full-text (any model)' if q == 'fts' else m} · {q}/{r}"
            for m, q, r in zip(rows["model"], rows["query_type"], rows["reranker"], strict=True)
        ]
        ys = list(range(len(rows)))
        err = _yerr(rows, metric)
        for kind, color in (("tuned", "#4c72b0"), ("base", "#9a9a9a")):
            pick = [i for i, k in enumerate(rows["kind"]) if k == kind]
            if pick:
                ax.errorbar(
                    rows[metric].iloc[pick],
                    [ys[i] for i in pick],
                    xerr=None if err is None else [err[0].iloc[pick], err[1].iloc[pick]],
                    fmt="o",
                    capsize=3,
                    color=color,
                    label="fine-tuned" if kind == "tuned" else "base / full-text",
                )
        ax.set_yticks(ys, labels)
        for y, v in zip(ys, rows[metric], strict=True):
            ax.annotate(
                f"{v:.3f}", (v, y), textcoords="offset points", xytext=(0, 6), fontsize=7, ha="center"
            )
        low = rows[f"{metric}_lo"] if err is not None else rows[metric]
        high = rows[f"{metric}_hi"] if err is not None else rows[metric]
        span = max(0.02, float(high.max()) - float(low.min()))
        ax.set_xlim(max(0.0, float(low.min()) - 0.08 * span), min(1.0, float(high.max()) + 0.08 * span))
        ax.grid(axis="x", alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
        ax.set_title(f"{ds}: best combinations by {metric}, 95% intervals", fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_cost(board, metric: str, out: Path) -> Path:
    """Per dataset: each model's `metric` (vector search, no reranker) against its encode throughput
    (documents/s, log scale, with the backend that was measured), fine-tuned blue and base grey; the
    Pareto front (no model both faster and better) joined by a line and its points ringed."""
    plt = _plt()
    datasets = sorted(board["dataset"].unique())
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4.5), squeeze=False)
    for ax, ds in zip(axes[0], datasets, strict=True):
        rows = cost_rows(board[board["dataset"] == ds])
        if rows.empty:
            ax.text(0.5, 0.5, "no encode cost measured", ha="center", va="center", transform=ax.transAxes)
            ax.set_title(str(ds))
            continue
        xs, ys = rows["docs_per_s"].astype(float).tolist(), rows[metric].astype(float).tolist()
        colors = ["#4c72b0" if k == "tuned" else "#9a9a9a" for k in rows["kind"]]
        ax.scatter(xs, ys, c=colors, s=36, zorder=3)
        for x, y, m in zip(xs, ys, rows["model"], strict=True):
            ax.annotate(str(m), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        front = pareto_front(list(zip(xs, ys, strict=True)))
        ax.plot(
            [xs[i] for i in front],
            [ys[i] for i in front],
            color="#dd8452",
            linewidth=1.2,
            drawstyle="steps-post" if len(front) > 1 else "default",
            label="Pareto front",
            zorder=2,
        )
        ax.scatter(
            [xs[i] for i in front],
            [ys[i] for i in front],
            s=110,
            facecolors="none",
            edgecolors="#dd8452",
            linewidths=1.5,
            zorder=4,
        )
        backends = ", ".join(sorted({str(b) for b in rows["encode_backend"].dropna()}))
        ax.set_xscale("log")
        ax.set_xlabel(f"encode throughput, documents/s ({backends})")
        ax.set_ylabel(f"{metric} (vector search)")
        ax.set_title(f"{ds}: quality vs encode throughput", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
