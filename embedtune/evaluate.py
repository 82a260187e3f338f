"""Retrieval evaluation of embedding models over LanceDB: hit@k, MRR@10, nDCG@10 per query type
and reranker. Entry point: `evaluate_models` (one row per dataset, model, query_type, reranker;
the columns are listed in docs/INTERFACES.md). Each row also keeps its per-query values
(`per_query_metrics`), from which the report draws confidence intervals and paired tests."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from embedtune import rerank
from embedtune.errors import EmbedtuneError
from embedtune.models import check_model
from embedtune.records import ENCODE_COST_COLUMNS, TRUNCATED, EncodeCost, ModelEntry
from embedtune.specs import EvalSpec

log = logging.getLogger(__name__)

THROUGHPUT_SAMPLE = 96  # corpus documents timed for docs_per_s when a model's table is reused (within ~5% of 256 here, a third of the time)

COLUMNS = [
    "dataset",
    "model",
    "model_path",
    "base_model",
    "kind",
    "trial_id",
    "epochs",
    "query_type",
    "reranker",
    "hit_at_1",
    "hit_at_5",
    "hit_at_10",
    "mrr_at_10",
    "ndcg_at_10",
    "n_queries",
    "seconds",
    *ENCODE_COST_COLUMNS,
    "per_query",
]
# encode_backend, docs_per_s, dim, size_mb, export_s: what encoding with the model costs on this
# machine (records.EncodeCost): docs_per_s is the corpus ingest rate when the table was built now,
# else the rate on a sample of THROUGHPUT_SAMPLE corpus documents.
# `per_query`: dict metric -> list of floats, one per query in the order of `data.queries` (hit@k
# 0/1, reciprocal rank within the top 10 or 0, nDCG@10); the metric columns are their means.


# ---------------------------------------------------------------- metrics (pure)


def _relevant_sets(ranked_ids: Sequence[Sequence[str]], relevant) -> list[set[str]]:
    """`relevant` is a list of sets aligned with ranked_ids, or a dict qid -> ids given together with
    ranked_ids as a dict qid -> ranking."""
    if isinstance(relevant, dict):
        raise TypeError("pass relevant as a list aligned with ranked_ids, or both as dicts by qid")
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


def _hit(ids, rel: set, k: int) -> float:
    """1.0 when a relevant id is in the top k of one ranking, else 0.0."""
    return 1.0 if any(d in rel for d in ids[:k]) else 0.0


def _reciprocal_rank(ids, rel: set, k: int) -> float:
    """1 / rank of the first relevant id within the top k of one ranking (0 if none)."""
    return next((1 / rank for rank, d in enumerate(ids[:k], 1) if d in rel), 0.0)


def _ndcg(ids, rel: set, k: int) -> float:
    """Binary-relevance nDCG@k of one ranking (see ndcg_at_k)."""
    dcg = sum(1 / math.log2(rank + 1) for rank, d in enumerate(ids[:k], 1) if d in rel)
    idcg = sum(1 / math.log2(rank + 1) for rank in range(1, min(len(rel), k) + 1))
    return dcg / idcg if idcg else 0.0


def hit_rate_at_k(ranked_ids, relevant, k: int) -> float:
    """Share of queries with any relevant id in the top k. `ranked_ids`: list of rankings (or dict
    qid -> ranking); `relevant`: list of sets aligned with it (or dict qid -> ids)."""
    ranked, rel = _align(ranked_ids, relevant)
    if not ranked:
        raise ValueError("no queries")
    return sum(_hit(ids, r, k) for ids, r in zip(ranked, rel, strict=True)) / len(ranked)


def mrr_at_k(ranked_ids, relevant, k: int = 10) -> float:
    """Mean over queries of 1 / rank of the first relevant id within the top k (0 if none)."""
    ranked, rel = _align(ranked_ids, relevant)
    return sum(_reciprocal_rank(ids, r, k) for ids, r in zip(ranked, rel, strict=True)) / len(ranked)


def ndcg_at_k(ranked_ids, relevant, k: int = 10) -> float:
    """Binary-relevance nDCG@k: DCG = sum of 1/log2(rank+1) over relevant ids in the top k, divided by
    the ideal DCG of min(|relevant|, k) relevant ids at the top (as sentence-transformers computes it)."""
    ranked, rel = _align(ranked_ids, relevant)
    return sum(_ndcg(ids, r, k) for ids, r in zip(ranked, rel, strict=True)) / len(ranked)


def per_query_metrics(ranked_ids, relevant, ks: Sequence[int] = (1, 5, 10)) -> dict[str, list[float]]:
    """The values `retrieval_metrics` averages, one per query (in the order of `ranked_ids`):
    hit_at_<k> (1.0 / 0.0) for every k, mrr_at_10 (1 / rank of the first relevant id in the top 10,
    else 0) and ndcg_at_10."""
    ranked, rel = _align(ranked_ids, relevant)
    pairs = list(zip(ranked, rel, strict=True))
    out = {f"hit_at_{k}": [_hit(ids, r, k) for ids, r in pairs] for k in ks}
    out["mrr_at_10"] = [_reciprocal_rank(ids, r, 10) for ids, r in pairs]
    out["ndcg_at_10"] = [_ndcg(ids, r, 10) for ids, r in pairs]
    return out


def retrieval_metrics(ranked_ids, relevant, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """hit_at_<k> for every k, plus mrr_at_10 and ndcg_at_10."""
    out = {f"hit_at_{k}": hit_rate_at_k(ranked_ids, relevant, k) for k in ks}
    out["mrr_at_10"] = mrr_at_k(ranked_ids, relevant, 10)
    out["ndcg_at_10"] = ndcg_at_k(ranked_ids, relevant, 10)
    return out


# ---------------------------------------------------------------- entry point


def check_depth(spec: EvalSpec, data, key: str = "ks") -> None:
    """Every query returns spec.depth documents: refuse a corpus smaller than that."""
    if spec.depth > len(data.corpus):
        raise EmbedtuneError(
            f"{key}: k={spec.depth} is larger than the corpus of {data.label} ({len(data.corpus)} documents): "
            "lower ks (MRR@10 / nDCG@10 need at least 10 documents) or use a larger corpus (eval_size)"
        )


def _check_inputs(models: list[ModelEntry], data, spec: EvalSpec) -> None:
    if not models:
        raise EmbedtuneError("no models to evaluate")
    if not data.queries:
        raise EmbedtuneError(
            f"dataset {data.label} has no held-out questions: nothing to evaluate (raise eval_size)"
        )
    if not data.corpus:
        raise EmbedtuneError(f"dataset {data.label} has an empty corpus: nothing to retrieve from")
    check_depth(spec, data)
    missing = [q for q in data.queries if not data.relevant.get(q)]
    unknown = {c for cs in data.relevant.values() for c in cs if c not in data.corpus}
    if missing or unknown:
        raise EmbedtuneError(
            f"dataset {data.label}: {len(missing)} question(s) without a relevant document and "
            f"{len(unknown)} relevant id(s) not in the corpus; re-prepare the data"
        )
    for m in models:
        check_model(m.path)


class _Scorer:
    """Scores one model after another on one dataset: each model's table and vector leg, the
    full-text leg once (it does not depend on the model), every (query type, reranker) pair."""

    def __init__(
        self,
        data,
        spec: EvalSpec,
        combos: list[tuple[str, str]],
        rerankers: dict,
        db_uri: str,
        progress: bool,
        encode_backend: str = "torch",
    ) -> None:
        self.data, self.spec, self.combos, self.rerankers = data, spec, combos, rerankers
        self.db_uri, self.progress, self.encode_backend = db_uri, progress, encode_backend
        self.qids = list(data.queries)
        self.texts = [data.queries[q] for q in self.qids]
        self.relevant = [set(data.relevant[q]) for q in self.qids]
        deep = any(rr.deep for rr in rerankers.values())
        self.limit = min(len(data.corpus), spec.depth * spec.overfetch) if deep else spec.depth
        self.fts_legs, self.fts_s = None, 0.0
        self.fts_rows: dict[tuple[str, str], tuple[dict, float]] = {}

    def _scored(self, ranked: list[list[str]]) -> dict[str, Any]:
        per_query = per_query_metrics(ranked, self.relevant, self.spec.ks)
        return {**{m: sum(v) / len(v) for m, v in per_query.items()}, "per_query": per_query}

    def _legs(self, entry: ModelEntry) -> tuple[Any, float, EncodeCost, Any, Any]:
        """(vector legs, their seconds, the encode cost, the model's table, its query vectors)."""
        from embedtune.encode import load_encoder
        from embedtune.index import build_table
        from embedtune.retrieval import fts_leg, vector_leg

        encoder = load_encoder(entry.path, self.encode_backend)
        encoder.truncate(self.spec.max_seq_length)  # queries too, also when the table is reused
        indexed = build_table(
            entry.path,
            self.data,
            self.db_uri,
            model_label=entry.label,
            model=encoder,
            batch_size=self.spec.batch_size,
            progress=self.progress,
            max_seq_length=self.spec.max_seq_length,
        )
        tbl = indexed.open()
        log.debug("%s: table %s (%s)", entry.label, indexed.name, "reused" if indexed.reused else "built")
        if indexed.reused or indexed.encode_seconds <= 0:
            rate = encoder.docs_per_s(
                list(self.data.corpus.values()), self.spec.batch_size, THROUGHPUT_SAMPLE
            )
        else:
            rate = indexed.rows / indexed.encode_seconds
        cost = encoder.cost(rate)
        vec_legs, vec_s, qv = None, 0.0, None
        if any(q in ("vector", "hybrid") for q, _ in self.combos) or self.spec.dims:
            t = time.perf_counter()
            qv = encoder.encode(self.texts, batch_size=self.spec.batch_size)
            vec_legs, vec_s = vector_leg(tbl, qv, self.limit), time.perf_counter() - t
        if any(q in ("fts", "hybrid") for q, _ in self.combos) and self.fts_legs is None:
            t = time.perf_counter()
            self.fts_legs = fts_leg(tbl, self.texts, self.limit, self.spec.fts_threads)
            self.fts_s = time.perf_counter() - t
        return vec_legs, vec_s, cost, tbl, qv

    def truncated_rows(self, entry: ModelEntry, cost: EncodeCost, tbl, qv) -> list[dict[str, Any]]:
        """Vector search on each `spec.dims` leading slice (below the model's own dimension) of the
        corpus and query embeddings already computed, re-normalised: what a smaller index of the
        same model scores. A Matryoshka-trained model keeps more of its quality there."""
        import numpy as np

        from embedtune.rerank.base import ids
        from embedtune.retrieval import exact_top_k, table_vectors, unit_rows

        dims = [d for d in self.spec.dims or [] if d < cost.dim]
        if not dims:
            return []
        doc_ids, rowids, mat = table_vectors(tbl)
        rows = []
        for d in dims:
            t = time.perf_counter()
            legs = exact_top_k(doc_ids, rowids, unit_rows(mat[:, :d]), np.asarray(qv)[:, :d], self.spec.depth)
            metrics = self._scored([ids(leg) for leg in legs])
            cut = replace(entry, label=f"{entry.label}@{d}d", kind=TRUNCATED)
            seconds = time.perf_counter() - t
            rows.append(self._row(cut, "vector", "none", metrics, seconds, {**cost.to_dict(), "dim": d}))
        return rows

    def _row(self, entry: ModelEntry, qtype: str, rname: str, metrics: dict, seconds: float, cost: dict):
        return {
            "dataset": self.data.label,
            "model": entry.label,
            "model_path": str(entry.path),
            "base_model": entry.base_model,
            "kind": entry.kind,
            "trial_id": entry.trial_id,
            "epochs": entry.epochs,
            "query_type": qtype,
            "reranker": rname,
            **{k: v for k, v in metrics.items() if k != "per_query"},
            "n_queries": len(self.qids),
            "seconds": round(seconds, 4),
            **cost,
            "per_query": metrics["per_query"],
        }

    def score(self, entry: ModelEntry) -> list[dict[str, Any]]:
        vec_legs, vec_s, cost, tbl, qv = self._legs(entry)
        rows = []
        for qtype, rname in self.combos:
            if qtype == "fts" and (qtype, rname) in self.fts_rows:
                metrics, seconds = self.fts_rows[(qtype, rname)]
            else:
                t = time.perf_counter()
                ranked = self.rerankers[rname].rank(
                    qtype, self.texts, vec_legs, self.fts_legs, self.spec.depth
                )
                base_s = {"vector": vec_s, "fts": self.fts_s, "hybrid": vec_s + self.fts_s}[qtype]
                metrics, seconds = self._scored(ranked), base_s + time.perf_counter() - t
                if qtype == "fts":
                    self.fts_rows[(qtype, rname)] = (metrics, seconds)
            rows.append(self._row(entry, qtype, rname, metrics, seconds, cost.to_dict()))
        return rows + self.truncated_rows(entry, cost, tbl, qv)


def evaluate_models(
    models: list[ModelEntry],
    data,
    spec: EvalSpec | None = None,
    db_uri: str = "lancedb",
    cross_encoder_path: str | None = None,
    progress: bool = True,
    encode_backend: str = "torch",
):
    """Index each model's embeddings of `data.corpus` in LanceDB at `db_uri` (reused when already
    there) and score every (query_type, reranker) of `spec` over `data.queries`. Corpora and queries
    are encoded on `encode_backend` (`embedtune.encode`; the final stage passes `final.encode_backend`).

    Returns a pandas DataFrame, one row per (dataset, model, query_type, reranker), columns COLUMNS
    (with one hit_at_<k> column per k of spec.ks); `per_query` holds each row's per-query values
    (`per_query_metrics`, queries in the order of `data.queries`). Notes:
    - Every query returns spec.depth results (max k, at least 10); a cross-encoder sees
      depth x overfetch candidates per leg (hybrid: the union of both legs) and keeps the top depth.
      RRF / linear fuse legs of depth each, as LanceDB's hybrid query does.
    - FTS rows do not depend on the model: they are computed once per dataset and repeated, with
      identical numbers, in every model's rows (so each model's block is complete).
    - Cross-encoder rows need `cross_encoder_path` (a trained or pretrained cross-encoder); without
      it they are skipped with a warning.
    - Bad input (not a sentence-transformers model, unloadable reranker, no questions, k larger than
      the corpus) raises EmbedtuneError before any table is written."""
    import pandas as pd

    spec = spec or EvalSpec()
    _check_inputs(models, data, spec)
    combos = rerank.combos(spec)
    if any(r == "cross-encoder" for _, r in combos) and cross_encoder_path is None:
        log.warning("no cross_encoder_path given: skipping the cross-encoder rows")
        combos = [c for c in combos if c[1] != "cross-encoder"]
    if not combos:
        raise EmbedtuneError(f"no valid (query_type, reranker) pair in {spec.query_types} x {spec.rerankers}")
    rerankers = rerank.build({r for _, r in combos}, spec, data.corpus, cross_encoder_path, progress)
    scorer = _Scorer(data, spec, combos, rerankers, db_uri, progress, encode_backend)
    rows = [row for entry in models for row in scorer.score(entry)]
    cross = rerankers.get("cross-encoder")
    if cross is not None:
        log.debug("cross-encoder: %d pairs scored for %d asked", cross.pairs_scored, cross.pairs_asked)
    hit_cols = [f"hit_at_{k}" for k in spec.ks]
    columns = [c for c in COLUMNS if not c.startswith("hit_at_")]
    at = columns.index("mrr_at_10")
    return pd.DataFrame(rows, columns=columns[:at] + hit_cols + columns[at:])
