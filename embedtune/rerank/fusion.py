"""Rankings without a model of their own: one leg as retrieved, or both legs fused by LanceDB."""

from __future__ import annotations

from typing import ClassVar

import pyarrow as pa
import pyarrow.compute as pc

from embedtune.rerank.base import Reranker, ids


class AsRetrieved(Reranker):
    """`none`: the vector or the full-text leg as retrieved."""

    name = "none"
    query_types = ("vector", "fts")

    def rank(self, query_type, queries, vector_legs, fts_legs, limit):
        legs = vector_legs if query_type == "vector" else fts_legs
        return [ids(leg)[:limit] for leg in legs]


def _normalize(col):
    """Min-max to [0, 1], as LanceDB's hybrid query does before fusion (LanceHybridQueryBuilder._normalize_scores)."""
    if len(col) == 0:
        return col
    lo, hi = pc.min_max(col).values()
    rng = pc.subtract(hi, lo)
    if not pc.equal(rng, pa.scalar(0.0)).as_py():
        return pc.divide(pc.subtract(col, lo), rng)
    if not pc.equal(hi, pa.scalar(0.0)).as_py():
        return pc.subtract(col, lo)
    return col


def fuse(reranker, query: str, vector_results: pa.Table, fts_results: pa.Table, limit: int) -> pa.Table:
    """Hybrid fusion of one query's two legs with a LanceDB reranker, exactly as
    `tbl.search(query_type="hybrid").vector(v).text(q).rerank(reranker).limit(limit)` does it
    (scores min-max normalised per leg: distance 0 = best, BM25 1 = best), without re-running the legs."""
    if vector_results.num_rows == 0 and fts_results.num_rows == 0:
        return vector_results.select(["id", "_rowid"]).append_column(
            "_relevance_score", pa.array([], pa.float32())
        )
    if vector_results.num_rows:
        i = vector_results.column_names.index("_distance")
        vector_results = vector_results.set_column(i, "_distance", _normalize(vector_results["_distance"]))
    if fts_results.num_rows:
        i = fts_results.column_names.index("_score")
        fts_results = fts_results.set_column(i, "_score", _normalize(fts_results["_score"]))
    return reranker.rerank_hybrid(query, vector_results, fts_results).slice(0, limit)


class Fusion(Reranker):
    """Hybrid search: the vector and full-text legs fused by a LanceDB reranker."""

    query_types = ("hybrid",)
    lancedb_reranker: ClassVar[type]

    def __init__(self, reranker) -> None:
        self.reranker = reranker

    def rank(self, query_type, queries, vector_legs, fts_legs, limit):
        return [
            ids(fuse(self.reranker, q, v.slice(0, limit), f.slice(0, limit), limit))
            for q, v, f in zip(queries, vector_legs, fts_legs, strict=True)
        ]


class RRF(Fusion):
    """`rrf`: LanceDB's reciprocal-rank fusion (over one ranked list it is the identity, so hybrid only)."""

    name = "rrf"

    def __init__(self) -> None:
        from lancedb.rerankers import RRFReranker

        super().__init__(RRFReranker())


class Linear(Fusion):
    """`linear`: LanceDB's weighted sum of the normalised leg scores. Deprecated in LanceDB and once
    shipped with an inverted final score (1 - weighted sum); 0.40's version ranks in the right
    direction (tests/test_rerank.py checks it on real data: weight 1 reproduces the vector ranking,
    weight 0 the BM25 ranking)."""

    name = "linear"

    def __init__(self, weight: float = 0.7) -> None:
        from lancedb.rerankers import LinearCombinationReranker

        super().__init__(LinearCombinationReranker(weight=weight))
