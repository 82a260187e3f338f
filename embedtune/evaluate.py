"""Retrieval evaluation of embedding models over LanceDB: hit@k, MRR@10, nDCG@10 per query type
and reranker. Entry point: `evaluate_models` (one row per dataset, model, query_type, reranker;
the columns are listed in docs/INTERFACES.md)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from embedtune.errors import EmbedtuneError

QueryType = Literal["vector", "fts", "hybrid"]
RerankerName = Literal["none", "rrf", "linear", "cross-encoder"]

# Which rerankers make sense for which query type. RRF and linear fusion combine the vector and
# FTS legs, so they exist for hybrid only (over one ranked list RRF is the identity); a hybrid
# query always fuses, so it has no "none". A cross-encoder reranks any candidate list.
VALID_RERANKERS: dict[str, tuple[str, ...]] = {
    "vector": ("none", "cross-encoder"),
    "fts": ("none", "cross-encoder"),
    "hybrid": ("rrf", "linear", "cross-encoder"),
}

COLUMNS = [
    "dataset", "model", "model_path", "base_model", "kind", "trial_id", "epochs", "query_type", "reranker",
    "hit_at_1", "hit_at_5", "hit_at_10", "mrr_at_10", "ndcg_at_10", "n_queries", "seconds",
]  # fmt: skip


@dataclass
class ModelEntry:
    """One model to evaluate: a base model or a tuned checkpoint of a sweep trial."""

    label: str
    path: str  # local sentence-transformers directory
    base_model: str  # label of the base model
    kind: Literal["base", "tuned"] = "base"
    trial_id: str | None = None
    epochs: int | None = None


class EvalSpec(BaseModel):
    """What to evaluate. Combinations a reranker does not apply to (see VALID_RERANKERS) are skipped."""

    model_config = ConfigDict(extra="forbid")

    ks: list[int] = Field(default_factory=lambda: [1, 5, 10], description="hit@k cut-offs")
    query_types: list[QueryType] = Field(default_factory=lambda: ["vector", "fts", "hybrid"])
    rerankers: list[RerankerName] = Field(default_factory=lambda: ["none", "rrf", "linear", "cross-encoder"])
    overfetch: int = Field(
        4, ge=1, description="a reranker sees k x overfetch candidates, then the top k are kept"
    )
    batch_size: int = Field(64, ge=1, description="encode / cross-encoder batch size")
    linear_weight: float = Field(0.7, ge=0, le=1, description="weight of the vector leg in linear fusion")
    fts_threads: int = Field(4, ge=1, description="parallel FTS queries (LanceDB FTS takes one query string)")

    @model_validator(mode="after")
    def _check(self) -> EvalSpec:
        if not self.ks or any(k < 1 for k in self.ks):
            raise ValueError(f"ks must be positive integers, got {self.ks}")
        self.ks = sorted(set(self.ks))
        if not self.query_types or not self.rerankers:
            raise ValueError("query_types and rerankers must not be empty")
        return self

    @property
    def depth(self) -> int:
        """How many results a query returns: the largest k, and at least 10 for MRR@10 / nDCG@10."""
        return max([*self.ks, 10])

    def combos(self) -> list[tuple[str, str]]:
        return [(q, r) for q in self.query_types for r in self.rerankers if r in VALID_RERANKERS[q]]


# ---------------------------------------------------------------- metrics (pure)


def _relevant_sets(ranked_ids: Sequence[Sequence[str]], relevant) -> list[set[str]]:
    """`relevant` is a list of sets aligned with ranked_ids, or a dict qid -> ids given together with
    ranked_ids as a dict qid -> ranking."""
    if isinstance(relevant, dict):
        raise TypeError("pass relevant as a list aligned with ranked_ids (use metrics_for for dicts)")
    if len(relevant) != len(ranked_ids):
        raise ValueError(f"{len(ranked_ids)} rankings but {len(relevant)} relevance sets")
    return [set(r) for r in relevant]


def _align(ranked_ids, relevant):
    if isinstance(ranked_ids, dict):
        qids = list(ranked_ids)
        ranked = [list(ranked_ids[q]) for q in qids]
        rel = (
            [set(relevant[q]) for q in qids]
            if isinstance(relevant, dict)
            else _relevant_sets(ranked, relevant)
        )
        return ranked, rel
    return [list(r) for r in ranked_ids], _relevant_sets(ranked_ids, relevant)


def hit_rate_at_k(ranked_ids, relevant, k: int) -> float:
    """Share of queries with any relevant id in the top k. `ranked_ids`: list of rankings (or dict
    qid -> ranking); `relevant`: list of sets aligned with it (or dict qid -> ids)."""
    ranked, rel = _align(ranked_ids, relevant)
    if not ranked:
        raise ValueError("no queries")
    return sum(any(d in r for d in ids[:k]) for ids, r in zip(ranked, rel, strict=True)) / len(ranked)


def mrr_at_k(ranked_ids, relevant, k: int = 10) -> float:
    """Mean over queries of 1 / rank of the first relevant id within the top k (0 if none)."""
    ranked, rel = _align(ranked_ids, relevant)
    total = 0.0
    for ids, r in zip(ranked, rel, strict=True):
        for rank, d in enumerate(ids[:k], 1):
            if d in r:
                total += 1 / rank
                break
    return total / len(ranked)


def ndcg_at_k(ranked_ids, relevant, k: int = 10) -> float:
    """Binary-relevance nDCG@k: DCG = sum of 1/log2(rank+1) over relevant ids in the top k, divided by
    the ideal DCG of min(|relevant|, k) relevant ids at the top (as sentence-transformers computes it)."""
    ranked, rel = _align(ranked_ids, relevant)
    total = 0.0
    for ids, r in zip(ranked, rel, strict=True):
        dcg = sum(1 / math.log2(rank + 1) for rank, d in enumerate(ids[:k], 1) if d in r)
        idcg = sum(1 / math.log2(rank + 1) for rank in range(1, min(len(r), k) + 1))
        total += dcg / idcg if idcg else 0.0
    return total / len(ranked)


def retrieval_metrics(ranked_ids, relevant, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """hit_at_<k> for every k, plus mrr_at_10 and ndcg_at_10."""
    out = {f"hit_at_{k}": hit_rate_at_k(ranked_ids, relevant, k) for k in ks}
    out["mrr_at_10"] = mrr_at_k(ranked_ids, relevant, 10)
    out["ndcg_at_10"] = ndcg_at_k(ranked_ids, relevant, 10)
    return out


def evaluate_models(
    models: list[ModelEntry],
    data,
    spec: EvalSpec | None = None,
    db_uri: str = "lancedb",
    cross_encoder_path: str | None = None,
):
    """Index each model's embeddings of `data.corpus` in LanceDB at `db_uri` (reused when already
    there) and score every (query_type, reranker) of `spec` over `data.queries`. Returns a pandas
    DataFrame with the columns in COLUMNS."""
    raise NotImplementedError("work in progress")  # filled in below in a later commit


__all__ = [
    "COLUMNS", "EvalSpec", "ModelEntry", "VALID_RERANKERS", "evaluate_models", "hit_rate_at_k", "mrr_at_k",
    "ndcg_at_k", "retrieval_metrics", "EmbedtuneError",
]  # fmt: skip
