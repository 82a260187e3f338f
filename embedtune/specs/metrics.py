"""Metric names, each defined once.

Two families name the same retrieval quantities: the leaderboard's (`hit_at_10`, computed by
`embedtune.evaluate` over LanceDB) and the one sentence-transformers' InformationRetrievalEvaluator
reports every epoch during training (`ir_accuracy_at_10` is hit@10, `ir_mrr_at_10` is MRR@10, ...).
`sweep_metric` maps a leaderboard metric to the name a trial reports.
"""

from __future__ import annotations

LEADERBOARD_METRICS = ("hit_at_1", "hit_at_5", "hit_at_10", "mrr_at_10", "ndcg_at_10")
SHOWN_METRICS = ("hit_at_5", "hit_at_10", "mrr_at_10", "ndcg_at_10")  # the table's score columns
IR_K = (1, 5, 10)  # cut-offs of the per-epoch evaluator

# Trial-reported (evaluator) name of each leaderboard metric.
SWEEP_NAME = {
    "hit_at_1": "ir_accuracy_at_1",
    "hit_at_5": "ir_accuracy_at_5",
    "hit_at_10": "ir_accuracy_at_10",
    "mrr_at_10": "ir_mrr_at_10",
    "ndcg_at_10": "ir_ndcg_at_10",
}
# The headline metric: MRR@10 moves where hit@10 sits at its ceiling (a small corpus, a strong base
# model: MiniLM scores hit@10 0.96 on the MedQuAD sample but MRR@10 0.82), so it can show a gain.
DEFAULT_LEADERBOARD_METRIC = "mrr_at_10"
DEFAULT_SWEEP_METRIC = SWEEP_NAME[DEFAULT_LEADERBOARD_METRIC]
# Orders leaderboard rows that tie on the leaderboard metric (equal hit@k rarely means equal ranks).
TIE_BREAK_METRIC = "mrr_at_10"
# Names a trial also reports that mean a leaderboard metric (the evaluator's recall@10 is hit@10
# with one relevant answer per question).
SWEEP_ALIASES = {"ir_recall_at_10": "hit_at_10", "ir_recall_at_5": "hit_at_5", "ir_recall_at_1": "hit_at_1"}


def check_leaderboard_metric(name: str) -> str:
    """A spec's leaderboard metric, or the ValueError pydantic reports under its key."""
    if name not in LEADERBOARD_METRICS:
        raise ValueError(f"must be one of {', '.join(LEADERBOARD_METRICS)}")
    return name


def leaderboard_name(sweep_metric: str) -> str | None:
    """The leaderboard metric a trial-reported metric name means, or None."""
    inverse = {v: k for k, v in SWEEP_NAME.items()}
    return inverse.get(sweep_metric) or SWEEP_ALIASES.get(sweep_metric)


GAIN_SUFFIX = "_gain"  # reported by each trial: its metric minus its base model's score

# Prefixes of the per-epoch results kept in trial records and logged to MLflow.
RECORDED_PREFIXES = ("ir_", "triplet_", "train_", "system/rss_mb")
LOGGED_PREFIXES = ("ir_", "triplet_", "train_loss", "train_samples_per_s", "system/")

HYPERPARAMS = ("epochs", "lr", "batch_size", "warmup_ratio", "seed")  # the search axes
# A gain at least this large (points of the headline metric, 1 point = 0.01) is worth a fine-tuning
# run: the report's verdict, and what search.second_seed confirms with another seed.
WORTH_IT_POINTS = 3.0
HP_TYPES = {"epochs": int, "lr": float, "batch_size": int, "warmup_ratio": float, "seed": int}

# A trial's last result when it failed in a way a retry would repeat (divergence, bad input): the
# error message. The trial ends at once (Tune's max_failures is for infrastructure failures only).
FINAL_ERROR = "embedtune_final_error"
# A trial's error line as kept in trials.json and MLflow's `embedtune.error` tag: long enough for a
# checkpoint path (Tune's trial folder names spell out the config) and the reason after it.
ERROR_LINE_CHARS = 1000
