"""When does a LanceDB vector index pay off over exhaustive (flat) search? A measurement note.

Synthetic but embedding-like data (384-d, unit-norm, 2,000 Gaussian clusters; queries are noisy
copies of random rows), cosine distance, 256 queries sent as ONE batched search (as
`embedtune.evaluate` does), top-10. For each corpus size: flat search time, then IVF_HNSW_SQ index
build time, indexed search time and recall@10 against the flat result. Run:

    .venv/bin/python scripts/bench_index.py [sizes ...]

The result is summarised next to VECTOR_INDEX_MIN_ROWS in embedtune/index.py.
"""

from __future__ import annotations

import sys
import tempfile
import time

import lancedb
import numpy as np
import pyarrow as pa
from lancedb.index import IvfHnswSq

DIM, N_QUERIES, K = 384, 256, 10


def data(n: int, rng: np.random.Generator) -> np.ndarray:
    centers = rng.standard_normal((2000, DIM)).astype(np.float32)
    x = centers[rng.integers(0, len(centers), n)] + 0.6 * rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def search(tbl, queries: np.ndarray) -> tuple[list[list[int]], float]:
    t = time.perf_counter()
    res = tbl.search(list(queries)).distance_type("cosine").select(["id", "_distance"]).limit(K).to_arrow()
    dt = time.perf_counter() - t
    qi, ids = res["query_index"].to_pylist(), res["id"].to_pylist()
    out: list[list[int]] = [[] for _ in range(len(queries))]
    for q, i in zip(qi, ids, strict=True):
        out[q].append(i)
    return out, dt


def main(sizes: list[int]) -> None:
    rng = np.random.default_rng(0)
    print(f"{'rows':>8} {'flat_s':>8} {'build_s':>8} {'ann_s':>8} {'recall@10':>9}")
    for n in sizes:
        x = data(n, rng)
        q = x[rng.integers(0, n, N_QUERIES)] + 0.05 * rng.standard_normal((N_QUERIES, DIM)).astype(np.float32)
        with tempfile.TemporaryDirectory() as d:
            db = lancedb.connect(d)
            vec = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), DIM)
            tbl = db.create_table("t", pa.table({"id": pa.array(np.arange(n)), "vector": vec}))
            search(tbl, q[:8])  # warm up
            flat, flat_s = search(tbl, q)
            t = time.perf_counter()
            tbl.create_index("vector", config=IvfHnswSq(distance_type="cosine"))
            build_s = time.perf_counter() - t
            search(tbl, q[:8])
            ann, ann_s = search(tbl, q)
            recall = np.mean([len(set(a) & set(f)) / K for a, f in zip(ann, flat, strict=True)])
            print(f"{n:>8} {flat_s:>8.3f} {build_s:>8.2f} {ann_s:>8.3f} {recall:>9.3f}", flush=True)


if __name__ == "__main__":
    main([int(s) for s in sys.argv[1:]] or [10_000, 50_000, 100_000, 200_000])
