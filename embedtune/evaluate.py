"""Retrieval evaluation of embedding models over LanceDB: hit@k, MRR@10, nDCG@10 per query type
and reranker. Entry point: `evaluate_models` (one row per dataset, model, query_type, reranker;
the columns are listed in docs/INTERFACES.md). Each row also keeps its per-query values
(`per_query_metrics`), from which the report draws confidence intervals and paired tests."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

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
    "hit_at_1", "hit_at_5", "hit_at_10", "mrr_at_10", "ndcg_at_10", "n_queries", "seconds", "per_query",
]  # fmt: skip
# `per_query`: dict metric -> list of floats, one per query in the order of `data.queries` (hit@k
# 0/1, reciprocal rank within the top 10 or 0, nDCG@10); the metric columns are their means.


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
    max_seq_length: int | None = Field(
        None,
        ge=8,
        description="truncate every model's queries and documents to this many tokens (a sweep sets "
        "its train.max_seq_length, so base and tuned models compete under the same truncation); "
        "None: each model's own limit",
    )
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


# ---------------------------------------------------------------- retrieval legs (batched)
#
# A leg result is, per query, a pyarrow table with `id`, `_rowid` and `_distance` (vector) or
# `_score` (fts), best first: the shape LanceDB's rerankers take in `rerank_hybrid`.


# Exact top-k as one matrix product over the table's vectors, read once from LanceDB. Measured by
# `make bench` (bench/results.json): on 1,000 questions over a 10,000-row corpus this is about as
# fast as a bare numpy product (`eval_time_vs_bruteforce`) and >20x faster than one LanceDB search
# per question (`eval_speedup_vs_loop`); LanceDB's own batched flat search is ~3x slower than the
# product on 2 cores. Same hits and distances as LanceDB's exact search (tests/test_evaluate.py).
# Tables whose vectors would not fit this budget use LanceDB's search.
EXACT_MATRIX_MAX_BYTES = 2 * 2**30
_SCORE_BLOCK_FLOATS = 2**25  # queries scored at once x corpus rows: ~128 MB of float32 scores


def table_vectors(tbl):
    """(ids, row ids, unit-normalised float32 matrix) of every row of a LanceDB table."""
    import numpy as np

    res = tbl.search().select(["id", "vector"]).with_row_id(True).limit(tbl.count_rows()).to_arrow()
    dim = res.schema.field("vector").type.list_size
    mat = (
        res["vector"].combine_chunks().flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    )
    mat = mat.reshape(-1, dim)
    norms = np.linalg.norm(mat, axis=1, keepdims=True)
    return res["id"].combine_chunks(), res["_rowid"].combine_chunks(), mat / np.maximum(norms, 1e-12)


def exact_top_k(ids, rowids, mat, query_vectors, limit: int, chunk: int = 1024) -> list:
    """Cosine top `limit` per query over `table_vectors` output, as LanceDB-shaped legs
    (`id`, `_rowid`, `_distance` = 1 - cosine, best first)."""
    import numpy as np
    import pyarrow as pa

    q = np.asarray(query_vectors, dtype=np.float32).reshape(len(query_vectors), -1)
    q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    n, limit = len(mat), min(limit, len(mat))
    if limit < 1:
        empty = pa.table(
            {"id": ids.slice(0, 0), "_rowid": rowids.slice(0, 0), "_distance": pa.array([], pa.float32())}
        )
        return [empty] * len(q)
    step = max(1, min(chunk, _SCORE_BLOCK_FLOATS // max(n, 1)))
    tops, sims_kept = [], []
    for lo in range(0, len(q), step):
        sims = q[lo : lo + step] @ mat.T
        if limit < n:  # the `limit` largest, unordered (no negated copy of the scores)
            top = np.argpartition(sims, n - limit, axis=1)[:, n - limit :]
        else:
            top = np.tile(np.arange(n), (len(sims), 1))
        top_sims = np.take_along_axis(sims, top, axis=1)
        order = np.argsort(-top_sims, axis=1, kind="stable")
        tops.append(np.take_along_axis(top, order, axis=1))
        sims_kept.append(np.take_along_axis(top_sims, order, axis=1))
    # one Arrow table for all queries, sliced per query (zero-copy): per-query tables cost more
    # than the matrix product
    idx = pa.array(np.concatenate(tops).ravel())
    dist = (1.0 - np.concatenate(sims_kept).ravel()).astype(np.float32)
    flat = pa.table({"id": ids.take(idx), "_rowid": rowids.take(idx), "_distance": pa.array(dist)})
    return [flat.slice(i * limit, limit) for i in range(len(q))]


def vector_leg(tbl, query_vectors, limit: int, chunk: int = 256, exact: bool = True) -> list:
    """Top `limit` rows per query vector, `chunk` queries at a time. `exact`: cosine over every row
    (a vector index, if any, is not used, so scores carry no ANN recall loss), by one matrix product
    (`exact_top_k`) when the vectors fit EXACT_MATRIX_MAX_BYTES, else by LanceDB's flat search.
    Otherwise LanceDB's search (with its index): LanceDB 0.40 takes a list of vectors in one search
    and returns a `query_index` column, so that is one search per `chunk` queries."""
    import numpy as np
    import pyarrow.compute as pc

    if exact and len(query_vectors):
        dim = tbl.schema.field("vector").type.list_size
        if tbl.count_rows() * dim * 4 <= EXACT_MATRIX_MAX_BYTES:
            return exact_top_k(*table_vectors(tbl), query_vectors, limit, chunk)
    out = []
    for lo in range(0, len(query_vectors), chunk):
        vecs = [np.asarray(v, dtype=np.float32) for v in query_vectors[lo : lo + chunk]]
        query = tbl.search(vecs if len(vecs) > 1 else vecs[0]).distance_type("cosine")
        query = query.bypass_vector_index() if exact else query
        res = query.select(["id", "_distance"]).with_row_id(True).limit(limit).to_arrow()
        if "query_index" not in res.column_names:  # a single vector: no query_index column
            res = res.append_column(
                "query_index", pc.cast(pc.multiply(pc.cast(res["_rowid"], "int64"), 0), "int32")
            )
        res = res.sort_by([("query_index", "ascending"), ("_distance", "ascending")])
        qi = res["query_index"].to_numpy()
        bounds = np.searchsorted(qi, np.arange(len(vecs) + 1))
        legs = [res.slice(bounds[i], bounds[i + 1] - bounds[i]) for i in range(len(vecs))]
        out.extend(leg.select(["id", "_rowid", "_distance"]) for leg in legs)
    return out


def vector_leg_one(tbl, vector, limit: int):
    """One vector search (the per-query reference `vector_leg` is tested against)."""
    import numpy as np

    res = (
        tbl.search(np.asarray(vector, dtype=np.float32))
        .distance_type("cosine")
        .bypass_vector_index()
        .select(["id", "_distance"])
        .with_row_id(True)
        .limit(limit)
        .to_arrow()
    )
    return res.select(["id", "_rowid", "_distance"])


def fts_leg_one(tbl, text: str, limit: int):
    res = (
        tbl.search(text, query_type="fts").select(["id", "_score"]).with_row_id(True).limit(limit).to_arrow()
    )
    return res.select(["id", "_rowid", "_score"])


def fts_leg(tbl, texts: list[str], limit: int, threads: int = 4) -> list:
    """Top `limit` rows per query string by BM25. LanceDB 0.40's FTS search takes one query string
    (a list raises TypeError: "'fts' query must be a string or FullTextQuery"), and a hybrid query
    takes one vector and one string, so FTS cannot batch: queries run on a thread pool (the search
    runs in Rust and releases the GIL)."""
    if threads <= 1:
        return [fts_leg_one(tbl, t, limit) for t in texts]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(lambda t: fts_leg_one(tbl, t, limit), texts))


def _normalize(col):
    """Min-max to [0, 1], as LanceDB's hybrid query does before fusion (LanceHybridQueryBuilder._normalize_scores)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if len(col) == 0:
        return col
    lo, hi = pc.min_max(col).values()
    rng = pc.subtract(hi, lo)
    if not pc.equal(rng, pa.scalar(0.0)).as_py():
        return pc.divide(pc.subtract(col, lo), rng)
    if not pc.equal(hi, pa.scalar(0.0)).as_py():
        return pc.subtract(col, lo)
    return col


def fuse(reranker, query: str, vector_results, fts_results, limit: int):
    """Hybrid fusion of one query's two legs with a LanceDB reranker, exactly as
    `tbl.search(query_type="hybrid").vector(v).text(q).rerank(reranker).limit(limit)` does it
    (scores min-max normalised per leg: distance 0 = best, BM25 1 = best), without re-running the legs."""
    import pyarrow as pa

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


def _ids(tbl) -> list[str]:
    return tbl["id"].to_pylist()


def _union_ids(a: list[str], b: list[str]) -> list[str]:
    return list(dict.fromkeys([*a, *b]))


# ---------------------------------------------------------------- rerankers


def make_reranker(name: str, spec: EvalSpec):
    """A LanceDB reranker object for a fusion name."""
    from lancedb.rerankers import LinearCombinationReranker, RRFReranker

    if name == "rrf":
        return RRFReranker()
    if name == "linear":
        # Deprecated in LanceDB and once shipped with an inverted final score (1 - weighted sum);
        # 0.40's version ranks in the right direction (tests/test_evaluate.py checks it on real data:
        # weight 1 reproduces the vector ranking, weight 0 the BM25 ranking).
        return LinearCombinationReranker(weight=spec.linear_weight)
    raise ValueError(f"no fusion reranker {name!r}")


class BatchedCrossEncoderReranker:
    """Cross-encoder reranking of many queries' candidate lists in one `predict` call.

    Evaluation scores all (query, candidate) pairs of all queries together in batches of
    `batch_size`, instead of LanceDB's `CrossEncoderReranker`, which runs one small predict per
    query; the ranking is the same (tests/test_rerank.py checks it against LanceDB's reranker
    loaded from the same local path). `as_lancedb()` gives that LanceDB reranker for `.rerank()`."""

    def __init__(self, model, batch_size: int = 64, path: str | None = None, progress: bool = False):
        self.model = model
        self.batch_size = batch_size
        self.path = path
        self.progress = progress
        # (query, document) -> score. A cross-encoder's score does not depend on which retriever
        # found the document, and the candidate lists of the query types and of the models under
        # evaluation overlap heavily, so each distinct pair is scored once: on the local sweep this
        # cut cross-encoder calls several-fold (see `pairs_scored` / `pairs_asked`).
        self._scores: dict[tuple[str, str], float] = {}
        self.pairs_asked = 0
        self.pairs_scored = 0

    def scores(self, pairs: list[tuple[str, str]]) -> list[float]:
        todo = list(dict.fromkeys(p for p in pairs if p not in self._scores))
        self.pairs_asked += len(pairs)
        self.pairs_scored += len(todo)
        if todo:
            fresh = self.model.predict(
                todo,
                batch_size=self.batch_size,
                show_progress_bar=self.progress and len(todo) >= 1000,
                convert_to_numpy=True,
            )
            self._scores.update(zip(todo, (float(x) for x in fresh), strict=True))
        return [self._scores[p] for p in pairs]

    def rerank_many(self, queries: list[str], candidates: list[list[str]], corpus: dict[str, str],
                    limit: int) -> list[list[str]]:  # fmt: skip
        pairs = [(q, corpus[c]) for q, cands in zip(queries, candidates, strict=True) for c in cands]
        if not pairs:
            return [[] for _ in queries]
        scores = self.scores(pairs)
        out, pos = [], 0
        for cands in candidates:
            s = scores[pos : pos + len(cands)]
            pos += len(cands)
            order = sorted(range(len(cands)), key=lambda i: -s[i])  # stable: ties keep retrieval order
            out.append([cands[i] for i in order[:limit]])
        return out

    def as_lancedb(self):
        """LanceDB's own `CrossEncoderReranker` on the same weights (a local path or hub id)."""
        from lancedb.rerankers import CrossEncoderReranker

        ref = self.path or str(getattr(self.model, "name_or_path", "") or "")
        if not ref:
            raise EmbedtuneError("as_lancedb needs the cross-encoder's path or hub id")
        return CrossEncoderReranker(
            model_name=ref,
            column="text",
            device=str(self.model.device),
            batch_size=self.batch_size,
            max_length=self.model.max_length,
        )


# ---------------------------------------------------------------- entry point


def check_depth(spec: EvalSpec, data, key: str = "ks") -> None:
    """Every query returns spec.depth documents: refuse a corpus smaller than that."""
    if spec.depth > len(data.corpus):
        raise EmbedtuneError(
            f"{key}: k={spec.depth} is larger than the corpus of {data.label} ({len(data.corpus)} documents): "
            "lower ks (MRR@10 / nDCG@10 need at least 10 documents) or use a larger corpus (eval_size)"
        )


def _check_inputs(models: list[ModelEntry], data, spec: EvalSpec) -> None:
    from embedtune.index import check_model

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


def evaluate_models(
    models: list[ModelEntry],
    data,
    spec: EvalSpec | None = None,
    db_uri: str = "lancedb",
    cross_encoder_path: str | None = None,
    progress: bool = True,
):
    """Index each model's embeddings of `data.corpus` in LanceDB at `db_uri` (reused when already
    there) and score every (query_type, reranker) of `spec` over `data.queries`.

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
    import logging
    import time

    import pandas as pd

    from embedtune.index import build_table, load_model
    from embedtune.models import truncate

    log = logging.getLogger(__name__)
    spec = spec or EvalSpec()
    _check_inputs(models, data, spec)
    combos = spec.combos()
    cross = None
    if any(r == "cross-encoder" for _, r in combos):
        if cross_encoder_path is None:
            log.warning("no cross_encoder_path given: skipping the cross-encoder rows")
            combos = [c for c in combos if c[1] != "cross-encoder"]
        else:
            from embedtune.rerank import load_cross_encoder

            cross = BatchedCrossEncoderReranker(
                load_cross_encoder(cross_encoder_path), spec.batch_size, str(cross_encoder_path), progress
            )
    if not combos:
        raise EmbedtuneError(f"no valid (query_type, reranker) pair in {spec.query_types} x {spec.rerankers}")

    qids = list(data.queries)
    qtexts = [data.queries[q] for q in qids]
    relevant = [set(data.relevant[q]) for q in qids]
    depth = spec.depth
    deep = min(len(data.corpus), depth * spec.overfetch)
    need_deep = cross is not None
    need_vec = any(q in ("vector", "hybrid") for q, _ in combos)
    need_fts = any(q in ("fts", "hybrid") for q, _ in combos)
    fts_legs, fts_s = None, 0.0  # model-independent: computed once, on the first model's table
    fts_rows: dict[tuple[str, str], tuple[dict, float]] = {}
    rows = []

    def scored(ranked: list[list[str]]) -> dict[str, Any]:
        # the metrics are the per-query values' means (as retrieval_metrics computes them)
        per_query = per_query_metrics(ranked, relevant, spec.ks)
        return {**{m: sum(v) / len(v) for m, v in per_query.items()}, "per_query": per_query}

    for entry in models:
        model = load_model(entry.path)
        truncate(model, spec.max_seq_length)  # queries too, also when the table is reused
        indexed = build_table(entry.path, data, db_uri, model_label=entry.label, model=model,
                              batch_size=spec.batch_size, progress=progress,
                              max_seq_length=spec.max_seq_length)  # fmt: skip
        tbl = indexed.open()
        log.info("%s: table %s (%s)", entry.label, indexed.name, "reused" if indexed.reused else "built")
        results: dict[tuple[str, str], tuple[dict, float]] = {}
        vec_legs, vec_s = None, 0.0
        if need_vec:
            t = time.perf_counter()
            qv = model.encode(qtexts, batch_size=spec.batch_size, normalize_embeddings=True, convert_to_numpy=True,
                              show_progress_bar=False)  # fmt: skip
            vec_legs = vector_leg(tbl, qv, deep if need_deep else depth)
            vec_s = time.perf_counter() - t
        if need_fts and fts_legs is None:
            t = time.perf_counter()
            fts_legs = fts_leg(tbl, qtexts, deep if need_deep else depth, spec.fts_threads)
            fts_s = time.perf_counter() - t
        for qtype, rname in combos:
            if qtype == "fts" and (qtype, rname) in fts_rows:
                continue
            t = time.perf_counter()
            if qtype in ("vector", "fts"):
                legs, base_s = (vec_legs, vec_s) if qtype == "vector" else (fts_legs, fts_s)
                if rname == "none":
                    ranked = [_ids(leg)[:depth] for leg in legs]
                else:
                    ranked = cross.rerank_many(qtexts, [_ids(leg)[:deep] for leg in legs], data.corpus, depth)
            else:
                base_s = vec_s + fts_s
                if rname == "cross-encoder":
                    cands = [
                        _union_ids(_ids(v)[:deep], _ids(f)[:deep])
                        for v, f in zip(vec_legs, fts_legs, strict=True)
                    ]
                    ranked = cross.rerank_many(qtexts, cands, data.corpus, depth)
                else:
                    rr = make_reranker(rname, spec)
                    ranked = [_ids(fuse(rr, q, v.slice(0, depth), f.slice(0, depth), depth))
                              for q, v, f in zip(qtexts, vec_legs, fts_legs, strict=True)]  # fmt: skip
            metrics, seconds = scored(ranked), base_s + time.perf_counter() - t
            if qtype == "fts":
                fts_rows[(qtype, rname)] = (metrics, seconds)
            results[(qtype, rname)] = (metrics, seconds)
        for qtype, rname in combos:
            metrics, seconds = fts_rows[(qtype, rname)] if qtype == "fts" else results[(qtype, rname)]
            rows.append({
                "dataset": data.label, "model": entry.label, "model_path": str(entry.path),
                "base_model": entry.base_model, "kind": entry.kind, "trial_id": entry.trial_id,
                "epochs": entry.epochs, "query_type": qtype, "reranker": rname,
                **{k: v for k, v in metrics.items() if k != "per_query"},
                "n_queries": len(qids), "seconds": round(seconds, 4), "per_query": metrics["per_query"],
            })  # fmt: skip
        del model
    if cross is not None:
        log.info("cross-encoder: %d pairs scored for %d asked", cross.pairs_scored, cross.pairs_asked)
    hit_cols = [f"hit_at_{k}" for k in spec.ks]
    columns = [c for c in COLUMNS if not c.startswith("hit_at_")]
    at = columns.index("mrr_at_10")
    columns = columns[:at] + hit_cols + columns[at:]
    return pd.DataFrame(rows, columns=columns)
