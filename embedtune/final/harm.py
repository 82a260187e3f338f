"""Do no harm: does fine-tuning make a dataset's winner worse on data from other domains?

Only when `final.ood` names out-of-domain data specs: each dataset's winner that is used (served:
its verdict is to fine-tune; or the run's registered winner) and its base model are scored on every
OOD set (`data.prepare_ood`: all questions are queries; vector search via
`evaluate_models`), compared query by query (`harm_check`: paired bootstrap interval, exact McNemar p
from `embedtune.stats`) and flagged "harm" on a significant drop. The result (`HarmCheck`) is stored
with the report as `report/harm.json`, which every rebuild turns into a "Do no harm" table.
"""

from __future__ import annotations

import logging
import time

from embedtune.data import prepare_ood
from embedtune.errors import EmbedtuneError
from embedtune.evaluate import evaluate_models
from embedtune.records import HarmCheck, HarmRow, ModelEntry, TrialRecord
from embedtune.specs import EvalSpec, FinalSpec, OodSpec
from embedtune.stats import N_BOOT

log = logging.getLogger(__name__)

_TEST = {
    True: "exact McNemar on per-query hits (embedtune.stats)",
    False: "paired bootstrap of per-query scores (embedtune.stats)",
}


def harm_check(
    base_hits,
    winner_hits,
    *,
    metric: str,
    alpha: float = 0.05,
    seed: int = 0,
    n_boot: int = N_BOOT,
    base_hit_at_10=None,
    winner_hit_at_10=None,
) -> dict:
    """Paired comparison of a winner with its base model over the same queries (one per-query value
    of `metric`, the spec's leaderboard metric, each, same order): `delta` = winner − base, its
    paired-bootstrap (1 − alpha) interval (`ci_low`, `ci_high`), `p_value` (exact McNemar for 0/1 hits, paired bootstrap otherwise, from
    embedtune.stats), `band` = half-width of the base score's own bootstrap interval, and `flag`:
    "harm" when the winner scores lower and the drop is significant (p < alpha) or larger than the
    95% band (the interval of delta lies below 0, or the drop exceeds `band`); else "".
    A model compared with itself has delta 0, p 1 and no flag. With the per-query hit@10 of both
    (`base_hit_at_10`, `winner_hit_at_10`, same queries) it also gives hit@10's delta and paired
    interval (`hit_at_10_delta`, `hit_at_10_ci_low`, `hit_at_10_ci_high`), which the report's
    forgetting line shows beside the headline metric's."""
    import numpy as np

    from embedtune.stats import bootstrap_ci, paired_pvalue

    b = np.asarray(base_hits, dtype=float)
    w = np.asarray(winner_hits, dtype=float)
    if b.ndim != 1 or b.shape != w.shape or not len(b):
        raise EmbedtuneError(
            f"harm check needs per-query scores over the same queries, got {b.shape} and {w.shape}"
        )
    delta = float(w.mean() - b.mean())
    lo, hi = bootstrap_ci(w - b, n_boot=n_boot, alpha=alpha, seed=seed)
    base_lo, base_hi = bootstrap_ci(b, n_boot=n_boot, alpha=alpha, seed=seed)
    band = (base_hi - base_lo) / 2
    p = paired_pvalue(w, b, metric, n_boot=n_boot, seed=seed)  # 1.0 when no query differs
    harmed = delta < 0 and (p < alpha or hi < 0 or -delta > band)
    hit10: dict[str, float] = {}
    if metric == "hit_at_10":
        hit10 = {"hit_at_10_delta": delta, "hit_at_10_ci_low": float(lo), "hit_at_10_ci_high": float(hi)}
    elif base_hit_at_10 is not None and winner_hit_at_10 is not None:
        b10 = np.asarray(base_hit_at_10, dtype=float)
        w10 = np.asarray(winner_hit_at_10, dtype=float)
        if b10.shape != b.shape or w10.shape != b.shape:
            raise EmbedtuneError(
                f"harm check needs hit@10 over the same {len(b)} queries, got {b10.shape} and {w10.shape}"
            )
        lo10, hi10 = bootstrap_ci(w10 - b10, n_boot=n_boot, alpha=alpha, seed=seed)
        hit10 = {
            "hit_at_10_delta": float(w10.mean() - b10.mean()),
            "hit_at_10_ci_low": float(lo10),
            "hit_at_10_ci_high": float(hi10),
        }
    return {
        "base_score": float(b.mean()),
        "winner_score": float(w.mean()),
        "delta": delta,
        "ci_low": float(lo),
        "ci_high": float(hi),
        "p_value": float(p),
        "band": float(band),
        "n_queries": int(len(b)),
        "flag": "harm" if harmed else "",
        **hit10,
    }


NOT_RECOMMENDED = "fine-tuning is not recommended here: the base model is served, see the verdict"


def harm_pairs(
    results,
    trials: list[TrialRecord],
    entries: dict[str, list[ModelEntry]],
    metric: str,
    skipped: dict[str, str] | None = None,
):
    """(training dataset, base entry, winner entry) per dataset whose winner (the report's
    `pick_winner`: the best tuned row that beats its base) is a tuned model that is used: served
    (its verdict is to fine-tune, `report.verdict`) or the run's registered winner
    (`report.build.overall_winner`). A winner that is neither is left out, with the reason in
    `skipped` (dataset -> why)."""
    from embedtune.final.serve import serves_winner
    from embedtune.report.build import overall_winner
    from embedtune.report.leaderboard import leaderboard, pick_winner
    from embedtune.report.seeds import seed_checks
    from embedtune.report.verdict import should_fine_tune

    board = leaderboard(results, trials, metric)  # with per-query values: the verdict's p-values
    winners = {str(ds): pick_winner(rows, metric) for ds, rows in board.groupby("dataset", sort=True)}
    verdicts = should_fine_tune(board, {}, metric, seed_checks(board, trials, winners, metric))
    top = overall_winner(board, winners, metric) or {}
    registered = (str(top.get("dataset")), top.get("model"))
    out = []
    for ds, w in sorted(winners.items()):
        if not w or w.get("kind") != "tuned":
            continue
        if not serves_winner(w, verdicts[ds]["verdict"]) and (ds, w.get("model")) != registered:
            if skipped is not None:
                skipped[ds] = NOT_RECOMMENDED
            continue
        by_label = {e.label: e for e in entries.get(str(ds), [])}
        tuned, base = by_label.get(w["model"]), by_label.get(w["base_model"])
        if tuned is None or base is None:
            log.warning(
                "do no harm: no model entry for %s or its base %s on %s", w["model"], w["base_model"], ds
            )
            continue
        out.append((str(ds), base, tuned))
    return out


def own_data(ood: OodSpec, dataset: str, sources: dict[str, list[str]]) -> bool:
    """Whether the out-of-domain set `ood` is the training data of `dataset` itself, or declared in
    its domain (`in_domain_for`): then it is no harm check for that dataset's winner."""
    return dataset in ood.in_domain_for or ood.label == dataset or ood.source in sources.get(dataset, [])


def do_no_harm(
    results,
    trials: list[TrialRecord],
    entries: dict[str, list[ModelEntry]],
    spec: FinalSpec,
    db_uri: str,
    sources: dict[str, list[str]] | None = None,
) -> HarmCheck:
    """Score each dataset's winner and its base model on every out-of-domain set of `spec.ood`
    (vector search, no reranker) and compare them query by query on the headline metric
    (`harm_check`): the winners that are used (`harm_pairs`); the others are named in
    `not_checked`. `entries` hold resolved model paths; `sources` (dataset label -> its sources)
    lets a sweep list all its datasets as OOD sets: each winner is checked on the others only."""
    sources = sources or {}
    metric = spec.leaderboard_metric
    skipped: dict[str, str] = {}
    pairs = harm_pairs(results, trials, entries, metric, skipped)
    ood_spec = EvalSpec(
        query_types=["vector"],
        rerankers=["none"],
        ks=sorted({*spec.eval.ks, 10}),
        batch_size=spec.eval.batch_size,
        max_seq_length=spec.eval.max_seq_length,
    )
    out = HarmCheck(
        metric=metric, alpha=spec.harm_alpha, test=_TEST[metric.startswith("hit_at_")], not_checked=skipped
    )
    start = time.perf_counter()
    for ood in spec.ood if pairs else []:
        checked = [(ds, base, tuned) for ds, base, tuned in pairs if not own_data(ood, ds, sources)]
        if not checked:
            continue
        data = prepare_ood(ood, spec.ood_max_corpus)
        models = list({e.label: e for _, base, tuned in checked for e in (base, tuned)}.values())
        log.info(
            "do no harm on %s (%d queries, %d docs): %s",
            data.label,
            len(data.queries),
            len(data.corpus),
            ", ".join(m.label for m in models),
        )
        frame = evaluate_models(
            models, data, ood_spec, db_uri, progress=False, encode_backend=spec.encode_backend
        )
        records = frame.to_dict("records")
        hits = {row["model"]: [float(x) for x in row["per_query"][metric]] for row in records}
        # hit@10 per query too (ood_spec always scores k=10): the forgetting line shows its interval
        hit10 = {row["model"]: row["per_query"]["hit_at_10"] for row in records}
        out.hits[data.label] = hits
        out.results += [{k: v for k, v in r.items() if k != "per_query"} for r in records]
        for ds, base, tuned in checked:
            check = harm_check(
                hits[base.label],
                hits[tuned.label],
                alpha=spec.harm_alpha,
                metric=metric,
                base_hit_at_10=hit10[base.label],
                winner_hit_at_10=hit10[tuned.label],
            )
            row = HarmRow(
                dataset=ds,
                ood=data.label,
                ood_source=ood.source,
                base_model=base.label,
                winner=tuned.label,
                **check,
            )
            out.rows.append(row)
            if row.flag:
                log.warning(
                    "HARM: %s (trained on %s) loses %+.4f %s on %s vs %s (p=%.3g)",
                    tuned.label,
                    ds,
                    row.delta,
                    metric,
                    data.label,
                    base.label,
                    row.p_value,
                )
    out.seconds = round(time.perf_counter() - start, 2)
    return out
