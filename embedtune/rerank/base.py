"""The reranker interface: turn a batch of queries' retrieval legs into final rankings.

Modelled on LanceDB's `Reranker` ABC (`rerank_hybrid` / `rerank_vector` / `rerank_fts`), but
batched: evaluation scores every held-out question at once. A leg is, per query, a pyarrow table
with `id`, `_rowid` and `_distance` (vector) or `_score` (full text), best first.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import pyarrow as pa


def ids(leg: pa.Table) -> list[str]:
    return leg["id"].to_pylist()


class Reranker(ABC):
    """One way of ordering candidates. `name` is what specs and result rows call it; it applies to
    the query types in `query_types`; `deep` rerankers see `depth x overfetch` candidates per leg
    (the others `depth`)."""

    name: ClassVar[str]
    query_types: ClassVar[tuple[str, ...]]
    deep: ClassVar[bool] = False

    @abstractmethod
    def rank(
        self,
        query_type: str,
        queries: list[str],
        vector_legs: list[pa.Table] | None,
        fts_legs: list[pa.Table] | None,
        limit: int,
    ) -> list[list[str]]:
        """The top `limit` ids per query. `vector_legs` / `fts_legs`: one leg per query (None when
        the query type has no such leg)."""
