"""Ingest a model's embeddings of a corpus into LanceDB (columns id, text, vector), with a native
full-text index on text and, for large corpora only, a vector index.

Where: any LanceDB URI (`<run_dir>/lancedb` by default in finalize; `s3://bucket/path` etc. work
the same for cluster users). One table per (model, data): its name carries the data label, a model
identity hash (config files + weight file sizes and head/tail bytes, so a copied checkpoint keeps
its identity and a retrained one does not) and the data fingerprint; not the model label, so the
same weights listed under two labels share one table.

Reuse and interruption: the table is created with its expected row count and identity in the
schema metadata and is tagged `embedtune-complete` only after every row and index is written. A
table without that tag, or whose row count differs from the expected one, is the leftover of an
interrupted ingest: it is dropped and rebuilt. (LanceDB OSS has no rename_table, so a staging
table + rename is not available; the tag is the completion marker.)

Vector index threshold (`VECTOR_INDEX_MIN_ROWS` = 50,000), measured with scripts/bench_index.py
on this machine (2 CPU cores, shared with other jobs; 384-d unit vectors in 2,000 clusters, cosine,
256 queries sent as one batched search, top 10; IVF_HNSW_SQ with default parameters):

    rows     flat (256 q)   index build   indexed (256 q)   recall@10 vs flat
    10k      0.33 s          2.1 s        0.10 s            0.86
    50k      1.49 s         13.9 s        0.09 s            0.95
    100k     2.74 s         47.5 s        0.11 s            0.86
    200k     5.26 s        184.7 s        0.11 s            0.82

Exhaustive search costs ~0.1 ms per 1k rows per query and is exact; the index pays for its build
only after ~2,400 (10k rows) to ~9,000 (200k rows) queries and loses 5-18 % of the true top 10.
Evaluation sets are at most a few thousand questions, so evaluation always searches exactly
(`bypass_vector_index`, see evaluate.vector_leg) and its numbers carry no ANN loss. The index is
for the table as a served artefact: from 50k rows a flat query takes > 5 ms, and building the
index (~14 s at 50k) is small next to embedding 50k documents (minutes at 50-475 docs/s here).
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embedtune import storage
from embedtune.cache import lock_for
from embedtune.data import PreparedData
from embedtune.errors import EmbedtuneError
from embedtune.models import check_model, model_identity

log = logging.getLogger(__name__)

VECTOR_INDEX_MIN_ROWS = 50_000
COMPLETE_TAG = "embedtune-complete"
META_PREFIX = "embedtune."
DISTANCE = "cosine"


@dataclass
class IndexedTable:
    """A complete table of one model's corpus embeddings."""

    db_uri: str
    name: str
    rows: int
    dim: int
    reused: bool  # True when an existing complete table was used instead of re-embedding
    vector_index: str | None  # index type, or None for exhaustive search
    seconds: float
    encode_seconds: float = 0.0  # of `seconds`, the time spent encoding the corpus (0 when reused)

    def open(self):
        return connect(self.db_uri).open_table(self.name)


# ---------------------------------------------------------------- identity and names


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._") or "x"


def table_name(
    model_id: str, data: PreparedData, max_seq_length: int | None = None, backend: str = "torch"
) -> str:
    """`<data label>__m<model hash>__d<data fingerprint>[__s<max tokens>][__b<backend>]`: identity
    only, so the same weights under another label (a base model listed twice, a copied checkpoint)
    reuse one table; a truncation other than the model's own, or an encoder backend other than
    torch (bf16 / int8 arithmetic), gives other embeddings, so another table."""
    name = f"{_safe(data.label)}__m{model_id[:16]}__d{data.fingerprint[:16]}"
    if max_seq_length:
        name = f"{name}__s{max_seq_length}"
    return name if backend == "torch" else f"{name}__b{_safe(backend)}"


def connect(db_uri: str | Path, **kwargs):
    import lancedb

    try:
        return lancedb.connect(str(db_uri), **kwargs)
    except Exception as exc:
        raise EmbedtuneError(
            f"cannot open LanceDB at {db_uri}: {type(exc).__name__}: {exc}".splitlines()[0]
        ) from exc


def _lock(db_uri: str, name: str):
    """Serialise builders of one table on a local database (remote URIs: no lock)."""
    if storage.is_remote(db_uri):
        return contextlib.nullcontext()
    return lock_for(storage.local_path(db_uri) / name)


# ---------------------------------------------------------------- completeness


def _meta(tbl) -> dict[str, str]:
    raw = tbl.schema.metadata or {}
    return {k.decode(): v.decode() for k, v in raw.items() if k.decode().startswith(META_PREFIX)}


def is_complete(tbl) -> bool:
    """A table is complete when it carries the completion tag and its row count is the expected one."""
    try:
        tags = tbl.tags.list()
    except Exception:  # backends without tags: fall back to the metadata flag
        tags = {}
    meta = _meta(tbl)
    expected = meta.get(META_PREFIX + "expected_rows")
    if COMPLETE_TAG not in tags and meta.get(META_PREFIX + "complete") != "1":
        return False
    return expected is not None and tbl.count_rows() == int(expected)


def _table_names(db) -> list[str]:
    result = db.list_tables()
    names = getattr(result, "tables", result)
    out = list(names)
    while getattr(result, "page_token", None):
        result = db.list_tables(page_token=result.page_token)
        out.extend(result.tables)
    return out


# ---------------------------------------------------------------- build


def _schema(dim: int, meta: dict[str, str]):
    import pyarrow as pa

    return pa.schema(
        [
            pa.field("id", pa.string()),
            pa.field("text", pa.string()),
            pa.field("vector", pa.list_(pa.float32(), dim)),
        ],
        metadata={f"{META_PREFIX}{k}": str(v) for k, v in meta.items()},
    )


def _batch(ids: list[str], texts: list[str], vectors, dim: int):
    import numpy as np
    import pyarrow as pa

    flat = pa.array(np.asarray(vectors, dtype=np.float32).ravel())
    return pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "text": pa.array(texts, pa.string()),
            "vector": pa.FixedSizeListArray.from_arrays(flat, dim),
        }
    )


def build_table(
    model_path: str | Path,
    data: PreparedData,
    db_uri: str | Path,
    *,
    model_label: str | None = None,
    model=None,
    batch_size: int = 64,
    chunk_rows: int = 2048,
    vector_index: bool | None = None,
    progress: bool = True,
    max_seq_length: int | None = None,
    backend: str = "torch",
) -> IndexedTable:
    """Embed `data.corpus` with the model at `model_path` into a LanceDB table at `db_uri`, or reuse
    a complete one for the same (model, data). `vector_index`: None = only when the corpus has at
    least VECTOR_INDEX_MIN_ROWS rows; True / False force it. `model` may pass an already loaded
    `encode.Encoder` (or SentenceTransformer) for `model_path`; else one is loaded on `backend`
    (see `embedtune.encode`). `max_seq_length` truncates documents to at most that many
    tokens (default: the model's own limit)."""
    start = time.perf_counter()
    db_uri = str(db_uri)
    path = check_model(model_path)
    if not data.corpus:
        raise EmbedtuneError(f"dataset {data.label} has an empty corpus: nothing to index")
    from tqdm.auto import tqdm

    from embedtune.encode import as_encoder, load_encoder, resolve_backend
    from embedtune.models import model_label as label_of

    encoder = as_encoder(model, path) if model is not None else None
    backend = encoder.backend if encoder is not None else resolve_backend(backend)
    mid = model_identity(path)
    name = table_name(mid, data, max_seq_length, backend)
    with _lock(db_uri, name):
        db = connect(db_uri)
        existing = db.open_table(name) if name in _table_names(db) else None
        if existing is not None and is_complete(existing):
            meta = _meta(existing)
            return IndexedTable(
                db_uri,
                name,
                existing.count_rows(),
                int(meta[META_PREFIX + "dim"]),
                True,
                meta.get(META_PREFIX + "vector_index") or None,
                time.perf_counter() - start,
            )
        if existing is not None:
            log.warning("table %s in %s is incomplete (interrupted ingest?): rebuilding it", name, db_uri)
            db.drop_table(name)
        encoder = encoder if encoder is not None else load_encoder(path, backend)
        encoder.truncate(max_seq_length)
        dim = encoder.dim
        ids, texts = list(data.corpus), list(data.corpus.values())
        want_index = len(ids) >= VECTOR_INDEX_MIN_ROWS if vector_index is None else vector_index
        index_type = "IVF_HNSW_SQ" if want_index else None
        meta = {
            "expected_rows": len(ids),
            "dim": dim,
            "model_id": mid,
            "model_path": str(path),
            "data_fingerprint": data.fingerprint,
            "data_label": data.label,
            "distance": DISTANCE,
            "vector_index": index_type or "",
            "max_seq_length": encoder.max_seq_length or "",
            "encode_backend": backend,
        }
        label = model_label or label_of(str(model_path))
        try:
            tbl, encode_s = _ingest(db, name, _schema(dim, meta), ids, texts, encoder, batch_size, chunk_rows,
                                    tqdm(total=len(ids), desc=f"embedding {data.label} with {label}", unit="doc",
                                         disable=not progress))  # fmt: skip
            _create_indexes(tbl, want_index)
            tbl.tags.create(COMPLETE_TAG, tbl.version)
        except Exception as exc:
            if not storage.is_disk_full(exc):
                raise
            with contextlib.suppress(Exception):  # untagged, so never trusted; dropped to free the space
                db.drop_table(name)
            raise storage.disk_full_error(
                db_uri, f"LanceDB table {name} (not kept)",
                "point final.lancedb_uri (embedtune evaluate: --lancedb) at a bigger disk",
            ) from None  # fmt: skip
        return IndexedTable(
            db_uri, name, tbl.count_rows(), dim, False, index_type, time.perf_counter() - start, encode_s
        )


def _ingest(db, name: str, schema, ids: list[str], texts: list[str], encoder, batch_size: int,
            chunk_rows: int, bar) -> tuple[Any, float]:  # fmt: skip
    """Create table `name` and add the encoded corpus in chunks; returns it and the encode seconds."""
    tbl = db.create_table(name, schema=schema, mode="overwrite")
    encode_s = 0.0
    try:
        for lo in range(0, len(ids), chunk_rows):
            chunk_ids, chunk_texts = ids[lo : lo + chunk_rows], texts[lo : lo + chunk_rows]
            t = time.perf_counter()
            vecs = encoder.encode(chunk_texts, batch_size=batch_size)
            encode_s += time.perf_counter() - t
            tbl.add(_batch(chunk_ids, chunk_texts, vecs, schema.field("vector").type.list_size))
            bar.update(len(chunk_ids))
    finally:
        bar.close()
    return tbl, encode_s


def _create_indexes(tbl, vector_index: bool) -> None:
    from lancedb.index import FTS, BTree, IvfHnswSq

    tbl.create_index("text", config=FTS(), replace=True)
    tbl.create_index("id", config=BTree(), replace=True)
    if vector_index:
        tbl.create_index("vector", config=IvfHnswSq(distance_type=DISTANCE), replace=True)
