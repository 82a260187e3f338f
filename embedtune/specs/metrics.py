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
DEFAULT_SWEEP_METRIC = "ir_recall_at_10"
DEFAULT_LEADERBOARD_METRIC = "hit_at_10"
GAIN_SUFFIX = "_gain"  # reported by each trial: its metric minus its base model's score

# Prefixes of the per-epoch results kept in trial records and logged to MLflow.
RECORDED_PREFIXES = ("ir_", "triplet_", "train_", "system/rss_mb")
LOGGED_PREFIXES = ("ir_", "triplet_", "train_loss", "train_samples_per_s", "system/")

HYPERPARAMS = ("epochs", "lr", "batch_size", "warmup_ratio", "seed")  # the search axes
HP_TYPES = {"epochs": int, "lr": float, "batch_size": int, "warmup_ratio": float, "seed": int}

# A trial's last result when it failed in a way a retry would repeat (divergence, bad input): the
# error message. The trial ends at once (Tune's max_failures is for infrastructure failures only).
FINAL_ERROR = "embedtune_final_error"
