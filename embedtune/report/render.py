"""The leaderboard page as a list of blocks (headings, paragraphs, lists, tables), rendered to
Markdown and HTML by one template pair (`templates/leaderboard.{md,html}.j2`), so the two always say
the same. Text may carry Markdown's inline `**bold**` and `` `code` ``; the HTML template converts it."""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from embedtune.clock import time_line
from embedtune.records import HarmCheck, HarmRow, number
from embedtune.report.epochs import EPOCH_NOTE
from embedtune.report.fmt import fmt, fmt_p, pct
from embedtune.report.leaderboard import N_BOOT, SIGNIFICANCE, cheapest_within_noise

TABLE = [  # (column, header, format)
    ("rank", "#", "int"),
    ("model", "model", "text"),
    ("kind", "kind", "text"),
    ("epochs", "epochs", "int"),
    ("best_epoch", "best ep (sweep)", "epoch"),
    ("last_epoch", "last ep (sweep)", "epoch"),
    ("query_type", "query", "text"),
    ("reranker", "reranker", "text"),
    ("hit_at_5", "hit@5", "score"),
    ("hit_at_10", "hit@10", "score"),
    ("mrr_at_10", "MRR@10", "score"),
    ("ndcg_at_10", "nDCG@10", "score"),
    ("DELTA", "Δ vs base", "delta"),
    ("vs_base", "vs base", "text"),
    ("training_s", "train s", "seconds"),
    ("gpu_s_per_point", "GPU s/point", "seconds1"),
    ("encode_backend", "encoder", "text"),
    ("docs_per_s", "docs/s", "rate"),
    ("dim", "dim", "int"),
    ("size_mb", "MB", "mb"),
    ("flags", "flags", "text"),
]
COST_NOTE = (
    "Cost: docs/s = corpus documents encoded per second on the machine that ran the evaluation, with "
    "the encoder backend named (final.encode_backend); dim = embedding dimension; MB = size on disk of "
    "what the backend runs (the model folder for torch, the exported model otherwise)."
)
PROBE_HEADERS = ["base model", "zero-shot", "best tuned", "gain", "eval→train sim", "train→train sim",
                 "train-q hit@10 (0-shot)", "eval-q hit@10 (0-shot)", "near-dup eval q", "exact-dup eval q",
                 "on model card"]  # fmt: skip
HARM_HEADERS = ["out-of-domain set", "base model", "base", "winner", "winner score", "Δ", "95% interval of Δ",
                "p", "queries", "flag"]  # fmt: skip
SEEN_NOTE = (
    "Already seen: near-dup = share of eval questions whose nearest train question has base-model cosine "
    ">= the threshold (or an exact match); exact-dup = same normalised text (lowercase, no punctuation or "
    "extra whitespace); on model card = training datasets the base model's card lists that name this data."
)
PROBE_NOTE = (
    "Similarities: mean base-model cosine of each eval question to its nearest train question vs of train "
    "questions to their nearest other train question. Zero-shot hit@10 of train vs eval questions over one "
    "shared corpus: a base model that already retrieves the training pairs leaves little for fine-tuning "
    "to teach."
)
SIG_LABELS = {
    "real gain": "Real gains (p < 0.05)",
    "real loss": "Real losses (p < 0.05)",
    "noise": "Noise (p ≥ 0.05, no difference beyond chance)",
}


@dataclass
class Block:
    """One piece of the page: `kind` is heading (level, text), para (text), list (items) or table
    (headers, rows); text is Markdown inline."""

    kind: str
    text: str = ""
    level: int = 2
    items: list[str] = field(default_factory=list)
    headers: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    src: str = ""  # image: the path of a plot, relative to the page


def heading(text: str, level: int = 2) -> Block:
    return Block("heading", text, level)


def para(text: str) -> Block:
    return Block("para", text)


def bullets(items: list[str]) -> Block:
    return Block("list", items=items)


def table(headers: list[str], rows: list[list[str]]) -> Block:
    return Block("table", headers=headers, rows=rows)


# ---------------------------------------------------------------- cells


def cell(r: dict[str, Any], col: str, kind: str, metric: str) -> str:
    """One leaderboard cell: a score with its interval ("0.812 [0.770, 0.850]"), the delta with its
    p-value, an epoch with the sweep metric there ("2 (0.740)"), or `fmt` of the value."""
    if col == "DELTA":
        d, p = number(r.get(f"delta_{metric}")), number(r.get(f"p_{metric}"))
        return fmt(d, "delta") + (f" ({fmt_p(p)})" if d is not None and p is not None else "")
    if kind == "score":
        v, lo, hi = number(r.get(col)), number(r.get(f"{col}_lo")), number(r.get(f"{col}_hi"))
        if v is not None and lo is not None and hi is not None:
            return f"{v:.3f} [{lo:.3f}, {hi:.3f}]"
    if kind == "epoch":
        e, score = number(r.get(col)), number(r.get(f"{col}_score"))
        return "" if e is None else f"{e:.0f}" + (f" ({score:.3f})" if score is not None else "")
    return fmt(r.get(col), kind)


# Columns that describe the embedding model (its training, its encoder's cost, its gain over its base):
# a full-text row, shared by every model, has none of them.
MODEL_COLUMNS = ("kind", "epochs", "best_epoch", "last_epoch", "DELTA", "vs_base", "training_s",
                 "gpu_s_per_point", "encode_backend", "docs_per_s", "dim", "size_mb")  # fmt: skip
NOT_APPLICABLE = "—"


def leaderboard_table(rows, metric: str) -> Block:
    """The full grid of one dataset; full-text rows once (they do not depend on the model), their
    model columns "—", and the rows numbered 1, 2, 3, ... as shown (the folded ones leave no gap)."""
    from embedtune.report.plots import one_fts_row

    headers = [h if c != "DELTA" else f"Δ {metric}" for c, h, _ in TABLE]
    out = []
    for number_shown, r in enumerate(one_fts_row(rows).to_dict("records"), start=1):
        r = {**r, "rank": number_shown}
        fts = r.get("query_type") == "fts"
        if fts:
            r["model"] = "full-text (any model)"
        out.append(
            [NOT_APPLICABLE if fts and c in MODEL_COLUMNS else cell(r, c, f, metric) for c, _, f in TABLE]
        )
    return table(headers, out)


def probe_cells(row: dict[str, Any]) -> list[str]:
    p = row.get("probe") or {}
    card = ", ".join(p.get("card_matches") or []) or ("none listed" if p.get("card_datasets") else "")
    return [
        row["base_model"],
        fmt(row["zero_shot"]),
        fmt(row["best_tuned"]),
        fmt(row["gain"], "delta"),
        fmt(p.get("eval_to_train_sim")),
        fmt(p.get("train_to_train_sim")),
        fmt(p.get("train_hit_at_10")),
        fmt(p.get("eval_hit_at_10")),
        pct(p.get("near_dup_rate")),
        pct(p.get("exact_dup_rate")),
        card,
    ]


def harm_cells(row: HarmRow) -> list[str]:
    band = f"[{row.ci_low:+.4f}, {row.ci_high:+.4f}]"
    return [
        row.ood,
        row.base_model,
        fmt(row.base_score),
        row.winner,
        fmt(row.winner_score),
        fmt(row.delta, "delta"),
        band,
        f"{row.p_value:.3g}",
        fmt(row.n_queries, "int"),
        row.flag,
    ]


def harm_note(harm: HarmCheck) -> str:
    return (
        f"Do no harm: the winner and its base model on out-of-domain sets (vector search, {harm.metric}). "
        f"Δ = winner − base; interval: paired bootstrap of the per-query difference; p: {harm.test}. "
        f"Flag `harm`: the winner scores lower and the drop is significant (p < {harm.alpha}) or "
        "larger than the 95% band (the interval of Δ lies below 0, or the drop exceeds the half-width of the "
        "base score's own 95% interval)."
    )


# ---------------------------------------------------------------- sections


def winner_line(winner: dict[str, Any], metric: str) -> str:
    line = (
        f"**Winner** ({metric}): `{winner['model']}` on {winner['dataset']} — {winner['query_type']}/"
        f"{winner['reranker']}, {metric} {winner[metric]:.4f}"
    )
    delta = winner.get(f"delta_{metric}")
    if delta is not None:
        words, p = winner.get("vs_base"), number(winner.get(f"p_{metric}"))
        test = f", {words}, {fmt_p(p)}" if words and p is not None else ""
        line += f" ({delta:+.4f} vs base{test})"
    return line


def significance(rows, metric: str) -> dict[str, Any] | None:
    """Which tuned rows of one dataset differ from their base model beyond noise on `metric`:
    {"note": str, "real gain": [...], "real loss": [...], "noise": [...]} (items are markdown), or
    {"note": ...} alone without per-query results; None without tuned rows."""
    tuned = rows[rows["kind"] == "tuned"]
    if tuned.empty:
        return None
    if f"p_{metric}" not in tuned or tuned[f"p_{metric}"].isna().all():
        return {
            "note": "No per-query results stored for this dataset: no intervals and no test of which "
            "differences are real (re-run the evaluation to get them)."
        }
    out: dict[str, Any] = {
        "note": f"Real or noise? Δ {metric} of each tuned row against its base model (same dataset, query type and "
        f"reranker) over the same queries: exact McNemar test for hit@k, paired bootstrap for MRR/nDCG; "
        f"real = p < {SIGNIFICANCE}, otherwise noise (each test on its own, no correction for the number of "
        f"rows). Intervals: 95% percentile bootstrap over queries ({N_BOOT} resamples, seed 0).",
        "real gain": [],
        "real loss": [],
        "noise": [],
    }
    for r in tuned.to_dict("records"):
        words, d, p = r.get("vs_base") or "", number(r.get(f"delta_{metric}")), number(r.get(f"p_{metric}"))
        if words in out and d is not None:
            out[words].append(f"`{r['model']}` {r['query_type']}/{r['reranker']} {d:+.3f} ({fmt_p(p)})")
    return out


def _score(row: dict[str, Any], metric: str) -> str:
    v, lo, hi = number(row.get(metric)), number(row.get(f"{metric}_lo")), number(row.get(f"{metric}_hi"))
    if v is None:
        return "n/a"
    return f"{v:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else "")


def points(x: float) -> str:
    """A score difference in points (x100), signed, one decimal, with a true minus sign."""
    v = round(x * 100, 1) + 0.0  # + 0.0: no "-0.0"
    return f"{v:+.1f}".replace("-", "−")


def forgetting_set(row: HarmRow, metric: str) -> str:
    """One OOD set of the forgetting line: the change on `metric` and on hit@10, in points with
    their intervals, the number of questions, the p-value of the harm flag, and the verdict."""
    shown = []
    for name, span in row.intervals(metric).items():
        label = "hit@10" if name == "hit_at_10" else name
        if span is None:
            d = number(row.delta if name == metric else row.hit_at_10_delta)
            shown.append(f"{points(d) if d is not None else 'n/a'} [no interval stored] {label}")
        else:
            shown.append(f"{points(span[0])} [{points(span[1])}, {points(span[2])}] {label}")
    size = f"{int(row.n_queries):,} questions, {fmt_p(row.p_value)}"
    verdict = row.forgetting(metric)
    return f"{row.ood} {', '.join(shown)} ({size}): {'**harm**' if verdict == 'harm' else verdict}"


def forgetting_line(rows: list[HarmRow], metric: str, alpha: float = 0.05, why: str | None = None) -> str:
    """Do no harm in one line: per out-of-domain set, the winner's change against its base model in
    points with its paired-bootstrap interval, and a verdict that says "cannot tell" when the
    interval cannot rule out a loss of 1 point. Without rows: not checked, and `why`."""
    if not rows:
        return f"**Forgetting:** not checked ({why or 'no out-of-domain set in `final.ood`'})."
    level = f"{round((1 - alpha) * 100):d}%"
    return (
        f"**Forgetting** (winner − base out of domain, in points ×100 [{level} paired-bootstrap interval]): "
        + "; ".join(forgetting_set(r, metric) for r in rows)
        + "."
    )


def summary_items(ds: str, winner, metric: str, advice, verdict, harm: HarmCheck) -> list[str]:
    """The answer for one dataset in at most six lines: best setup with its interval, gain over
    base with p and whether fine-tuning was worth it, the winner's seeds when a second one was
    trained, recommended epochs, already seen, forgetting."""
    items = []
    if winner:
        items.append(
            f"**Best setup:** `{winner['model']}` ({winner['query_type']}/{winner['reranker']}), "
            f"{metric} {_score(winner, metric)}"
        )
    if verdict:
        words = verdict["verdict"].split(":")[0]
        d, p = number((winner or {}).get(f"delta_{metric}")), number((winner or {}).get(f"p_{metric}"))
        gain = f"{d:+.3f} over `{winner['base_model']}` ({fmt_p(p)}); " if d is not None and winner else ""
        items.append(f"**Gain:** {gain}fine-tuning worth it? **{words}**")
    if verdict and verdict.get("seeds"):
        items.append(f"**Seeds:** {verdict['seeds']['line']}.")
    if advice:
        mine = next((a for a in advice if winner and a["base_model"] == winner.get("base_model")), advice[0])
        how = "best beyond noise" if mine["named_best"] else "fewest within noise of the best"
        items.append(f"**Epochs:** {mine['recommended_epochs']} ({how}, `{mine['base_model']}`)")
    if verdict and verdict.get("seen"):
        items.append(verdict["seen"].split(" (")[0].rstrip(".") + ".")
    items.append(forgetting_line(harm.for_dataset(ds), harm.metric, harm.alpha, harm.not_checked.get(ds)))
    return items[:6]


EDGE_LABEL = "**Edge of the search:**"


def summary_blocks(
    board, metric: str, dataset_winners, verdicts, epochs, harm: HarmCheck, gates, edges=None
) -> list[Block]:
    """The summary: per dataset its lines (`summary_items`), then one line per searched axis
    whose best value sat at the edge of the search (`report.edges`)."""
    blocks = [heading("Summary")]
    for ds in sorted(str(d) for d in board["dataset"].unique()):
        items = summary_items(
            ds, (dataset_winners or {}).get(ds), metric, (epochs or {}).get(ds), verdicts.get(ds), harm
        )
        items += [f"{EDGE_LABEL} {a.text}" for a in (edges or {}).get(ds, [])]
        blocks += [para(f"**{ds}**"), bullets(items)]
    lines = [g["line"] for g in gates or []]
    if lines:
        blocks.append(para(" ".join(lines)))
    return blocks


def cost_line(rows, metric: str) -> str | None:
    """The fastest model within noise of the best one (vector search), or None without costs."""
    pick = cheapest_within_noise(rows, metric)
    if pick is None:
        return None
    best, cheap = pick["best"], pick["cheapest"]
    rate = f"{fmt(cheap['docs_per_s'], 'rate')} docs/s ({cheap['encode_backend']})"
    if cheap["model"] == best["model"]:
        return (
            f"**Cost:** the best model (vector search, {metric}) `{best['model']}` is also the fastest "
            f"within its 95% interval: {rate}. {COST_NOTE}"
        )
    return (
        f"**Cost:** `{cheap['model']}` is the fastest model within the 95% interval of the best "
        f"`{best['model']}` (vector search, {metric} {fmt(cheap[metric])} vs {fmt(best[metric])}): {rate} "
        f"vs {fmt(best['docs_per_s'], 'rate')} docs/s, {fmt(cheap['dim'], 'int')}-d vs "
        f"{fmt(best['dim'], 'int')}-d, {fmt(cheap['size_mb'], 'mb')} MB vs {fmt(best['size_mb'], 'mb')} MB. "
        f"{COST_NOTE}"
    )


def dataset_blocks(ds: str, rows, metric: str, advice, verdict, harm: HarmCheck, flags) -> list[Block]:
    blocks = [heading(f"{ds}: full grid"), leaderboard_table(rows, metric)]
    cost = cost_line(rows, metric)
    if cost:
        blocks.append(para(cost))
    sig = significance(rows, metric)
    if sig and len(sig) == 1:
        blocks.append(para(f"**{sig['note']}**"))
    elif sig:
        blocks += [
            para(sig["note"]),
            bullets([f"{SIG_LABELS[k]}: {'; '.join(sig[k]) or 'none'}" for k in SIG_LABELS]),
        ]
    if advice:
        blocks += [heading(f"Epochs ({ds})", 3), bullets([a["text"] for a in advice]), para(EPOCH_NOTE)]
    if verdict:
        blocks += [heading(f"Should you fine-tune? ({ds})", 3), para(f"**Verdict:** {verdict['verdict']}")]
        if verdict.get("seen"):
            blocks.append(para(f"**{verdict['seen']}**"))
        blocks += [
            para(f"Scores: {metric}, {verdict['basis']}. {PROBE_NOTE}"),
            table(PROBE_HEADERS, [probe_cells(r) for r in verdict["rows"]]),
            para(SEEN_NOTE),
        ]
    mine = harm.for_dataset(ds)
    if mine:
        flagged = [r for r in mine if r.flag == "harm"]
        line = (
            f"**Harm:** `{flagged[0].winner}` loses on {', '.join(r.ood for r in flagged)}."
            if flagged
            else "**No harm found:** no out-of-domain set shows a significant drop."
        )
        blocks += [
            heading(f"Do no harm ({ds})", 3),
            para(line),
            para(harm_note(harm)),
            table(HARM_HEADERS, [harm_cells(r) for r in mine]),
        ]
    mine_flags = [f for f in flags if f["dataset"] == ds]
    if mine_flags:
        blocks += [
            heading(f"Overfitting flags ({ds})", 3),
            bullets(
                [f"`{f['model']}` trial {f['trial_id']} ({f['flag']}): {f['message']}" for f in mine_flags]
            ),
        ]
    return blocks


def page_blocks(
    board,
    metric: str,
    winner,
    verdicts,
    flags,
    plots: list[Path],
    epochs,
    harm: HarmCheck,
    dataset_winners=None,
    gates=None,
    timings: dict[str, Any] | None = None,
    edges=None,
) -> list[Block]:
    blocks = [heading("embedtune leaderboard", 1)]
    blocks += summary_blocks(board, metric, dataset_winners, verdicts, epochs, harm, gates, edges)
    if winner:
        blocks.append(para(winner_line(winner, metric)))
    for ds, rows in board.groupby("dataset", sort=True):
        blocks += dataset_blocks(
            str(ds), rows, metric, (epochs or {}).get(str(ds)), verdicts.get(str(ds)), harm, flags
        )
    if plots:
        blocks.append(heading("Plots"))
        blocks += [Block("image", p.stem, src=f"plots/{p.name}") for p in plots]
    return with_time_line(blocks, timings)


TIME_LABEL = "**Time:**"


def with_time_line(blocks: list[Block], timings: dict[str, Any] | None) -> list[Block]:
    """`blocks` with the run's time line (`clock.time_line` of `timings`) first in the summary, in
    place of an older one; without `timings`, without one."""
    out = [b for b in blocks if not (b.kind == "para" and b.text.startswith(TIME_LABEL))]
    if not timings:
        return out
    at = next((i + 1 for i, b in enumerate(out) if b.kind == "heading" and b.text == "Summary"), 1)
    out.insert(at, para(f"{TIME_LABEL} {time_line(timings)}"))
    return out


# ---------------------------------------------------------------- rendering


def _inline_html(text: str) -> str:
    """Escape, then render Markdown's `**bold**` and `` `code` `` of a generated line."""
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", html.escape(text))
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def render(blocks: list[Block], kind: str) -> str:
    """The page as Markdown (`kind` "md") or HTML ("html")."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("embedtune.report", "templates"),
        autoescape=kind == "html",
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["inline"] = lambda t: jinja2.utils.markupsafe.Markup(_inline_html(t))
    env.filters["mdcell"] = _md_cell
    return env.get_template(f"leaderboard.{kind}.j2").render(blocks=blocks)
