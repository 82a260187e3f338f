"""Retrieval legs over a LanceDB table, batched: the top rows of many queries at once.

A leg result is, per query, a pyarrow table with `id`, `_rowid` and `_distance` (vector) or
`_score` (fts), best first: the shape LanceDB's rerankers take in `rerank_hybrid`.
"""

from __future__ import annotations

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
    return res["id"].combine_chunks(), res["_rowid"].combine_chunks(), unit_rows(mat.reshape(-1, dim))


def unit_rows(mat):
    """`mat` (n x d float32) with each row scaled to unit length (an all-zero row stays zero)."""
    import numpy as np

    return mat / np.maximum(np.linalg.norm(mat, axis=1, keepdims=True), 1e-12)


def exact_top_k(ids, rowids, mat, query_vectors, limit: int, chunk: int = 1024) -> list:
    """Cosine top `limit` per query over `table_vectors` output, as LanceDB-shaped legs
    (`id`, `_rowid`, `_distance` = 1 - cosine, best first)."""
    import numpy as np
    import pyarrow as pa

    q = unit_rows(np.asarray(query_vectors, dtype=np.float32).reshape(len(query_vectors), -1))
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
