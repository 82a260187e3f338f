"""Served tables: one LanceDB table per dataset, searchable by text with the recommended model.

After the final stage each dataset's recommended model (`final.serve` picks it) embeds the
dataset's whole corpus into the table `<dataset>` of the `serve` database under the run's LanceDB
URI (`<lancedb>/serve`, local or on object storage). The table is created through LanceDB's
embedding API with embedtune's registered function (`embedtune.lance_function`), so it knows its
embedding function: `lancedb.connect(uri).open_table("medquad").search("a question")` in a fresh
process (after `import embedtune`) embeds the question and searches. A full-text index on `text`
makes `query_type="hybrid"` work too; a corpus of `index.VECTOR_INDEX_MIN_ROWS` rows or more also gets
a vector index (approximate search; smaller tables are searched exactly). The schema metadata (`embedtune.*`) records the model (a
registry version or a base model), the dataset fingerprint, the metric and its score.

Versions: serving another model writes a new version of the same table (LanceDB keeps the old
ones: `tbl.checkout(version)`); serving the same (model, data, encoder) again reuses the table. A
table version is complete when the tag `served-<identity>` points at it (set after the last row and
the index), so an interrupted build is rebuilt.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from embedtune import storage
from embedtune.cache import stable_hash
from embedtune.data import PreparedData, load_pairs
from embedtune.errors import EmbedtuneError
from embedtune.index import VECTOR_INDEX_MIN_ROWS, _table_names, connect
from embedtune.specs import DataSpec

log = logging.getLogger(__name__)

SERVE_DB = "serve"
META_PREFIX = "embedtune."
CHUNK_ROWS = 2048


@dataclass
class ServedTable:
    """One dataset's served table, as written (or found complete)."""

    db_uri: str
    name: str
    version: int
    rows: int
    reused: bool
    meta: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "db_uri": self.db_uri,
            "table": self.name,
            "version": self.version,
            "rows": self.rows,
            "reused": self.reused,
            **self.meta,
        }


def serve_uri(lancedb_uri: str) -> str:
    """The `serve` database under a run's LanceDB URI."""
    return storage.join(lancedb_uri, SERVE_DB)


def whole_corpus(data: PreparedData, spec: DataSpec | None) -> dict[str, str]:
    """Every answer / passage of the dataset: the evaluated corpus (its ids kept, so eval relevance
    still points at the right rows), then every other distinct answer of the source (the pairs
    `max_pairs` sampled out, a BEIR corpus's other documents) as `x<n>`. Without a spec: the
    evaluated corpus."""
    corpus = dict(data.corpus)
    if spec is None:
        return corpus
    pairs, extra = load_pairs(spec.model_copy(update={"max_pairs": None}))
    seen = set(corpus.values())
    n = 0
    for text in [a for _, a in pairs] + extra:
        if text not in seen:
            seen.add(text)
            corpus[f"x{n}"] = text
            n += 1
    return corpus


def table_meta(tbl) -> dict[str, str]:
    raw = tbl.schema.metadata or {}
    return {
        k.decode()[len(META_PREFIX) :]: v.decode()
        for k, v in raw.items()
        if k.decode().startswith(META_PREFIX)
    }


def _tag(identity: str) -> str:
    return f"served-{identity}"


def _complete(tbl, identity: str) -> bool:
    try:
        tags = tbl.tags.list()
    except Exception:
        return False
    tag = tags.get(_tag(identity))
    version = tag.get("version") if isinstance(tag, dict) else getattr(tag, "version", None)
    return version == tbl.version


def build_served_table(
    db_uri: str,
    name: str,
    corpus: dict[str, str],
    *,
    model: str,
    tracking_uri: str | None,
    backend: str,
    max_seq_length: int | None,
    meta: dict[str, Any],
    batch_size: int = 64,
) -> ServedTable:
    """Write `corpus` (id -> text) into table `name` at `db_uri` through LanceDB's embedding API with
    embedtune's function for `model` (see the module docstring); `meta` goes into the schema
    metadata. Reuses the current version when it is complete for the same identity."""
    from lancedb.embeddings import get_registry
    from lancedb.pydantic import LanceModel, Vector

    from embedtune.lance_function import NAME

    if not corpus:
        raise EmbedtuneError(f"dataset {name}: empty corpus, nothing to serve")
    identity = stable_hash(model, tracking_uri or "", backend, max_seq_length, sorted(corpus.items()))
    db = connect(db_uri)
    if name in _table_names(db):
        old = db.open_table(name)
        if _complete(old, identity):
            return ServedTable(db_uri, name, old.version, old.count_rows(), True, table_meta(old))
    func = (
        get_registry()
        .get(NAME)
        .create(
            model=model,
            tracking_uri=tracking_uri,
            backend=backend,
            max_seq_length=max_seq_length,
            batch_size=batch_size,
        )
    )
    dim = func.ndims()

    class Served(LanceModel):
        id: str
        text: str = func.SourceField()
        vector: Vector(dim) = func.VectorField()  # type: ignore[valid-type]

    full = {
        **meta,
        "model": model,
        "encode_backend": backend,
        "max_seq_length": max_seq_length or "",
        "identity": identity,
        "rows": len(corpus),
        "distance": "cosine",
    }
    schema = Served.to_arrow_schema()
    schema = schema.with_metadata(
        {
            **(schema.metadata or {}),
            **{f"{META_PREFIX}{k}".encode(): str(v).encode() for k, v in full.items()},
        }
    )
    # mode="overwrite" writes a new version of an existing table: earlier versions stay readable.
    tbl = db.create_table(
        name, schema=schema, embedding_functions=Served.parse_embedding_functions(), mode="overwrite"
    )
    items = list(corpus.items())
    for lo in range(0, len(items), CHUNK_ROWS):
        tbl.add([{"id": i, "text": t} for i, t in items[lo : lo + CHUNK_ROWS]])  # LanceDB embeds `text`
    from lancedb.index import FTS, IvfHnswSq

    tbl.create_index("text", config=FTS(), replace=True)
    if len(items) >= VECTOR_INDEX_MIN_ROWS:  # served, not evaluated: an index pays off (embedtune.index)
        tbl.create_index("vector", config=IvfHnswSq(distance_type="cosine"), replace=True)
    tbl.tags.create(_tag(identity), tbl.version)
    log.info("served table %s (%d rows, version %d) at %s", name, len(items), tbl.version, db_uri)
    return ServedTable(db_uri, name, tbl.version, tbl.count_rows(), False, table_meta(tbl))


# ---------------------------------------------------------------- reading


def _candidates(location: str) -> list[str]:
    """Serve databases `location` may mean: a run dir (its spec's LanceDB URI, else `lancedb/`), a
    LanceDB URI, or the serve database itself."""
    from embedtune.rundir import RunDir

    out = []
    if not location.rstrip("/").endswith(f"/{SERVE_DB}"):
        try:
            lance = RunDir(location).lancedb_uri()
        except Exception:  # not a run dir (a LanceDB URI): the candidates below
            lance = None
        if lance:
            out.append(serve_uri(lance))
        out += [serve_uri(storage.join(location, "lancedb")), serve_uri(location)]
    out.append(location)
    return list(dict.fromkeys(out))


def served_tables(location: str) -> tuple[str, list[str]]:
    """(serve database URI, its table names) for a run dir or URI; one-line error when it has none."""
    for uri in _candidates(location):
        if not storage.is_remote(uri) and not storage.local_path(uri).is_dir():
            continue
        try:
            names = _table_names(connect(uri))
        except Exception:
            continue
        if names:
            return uri, sorted(names)
    raise EmbedtuneError(
        f"{location} has no served table: run the sweep's final stage (without --no-final), "
        "or point at the run dir, its LanceDB URI or <lancedb>/serve"
    )


def open_served(location: str, dataset: str | None = None):
    """The served table of `dataset` (default: the only one) under `location`."""
    uri, names = served_tables(location)
    if dataset is None:
        if len(names) > 1:
            raise EmbedtuneError(f"{location} serves {', '.join(names)}: pick one with --dataset")
        dataset = names[0]
    if dataset not in names:
        raise EmbedtuneError(
            f"unknown dataset {dataset!r}: {location} serves {', '.join(names)}; use --dataset with one of them"
        )
    return connect(uri).open_table(dataset)


def search(tbl, question: str, k: int = 5, hybrid: bool = False) -> list[dict[str, Any]]:
    """Ranked answers for `question`: rank, id, score (cosine similarity; hybrid: LanceDB's fused
    relevance score), text."""
    if not question.strip():
        raise EmbedtuneError("empty question: pass the text to search for")
    if k < 1:
        raise EmbedtuneError(f"-k must be at least 1, got {k}")
    if hybrid:
        rows = tbl.search(question, query_type="hybrid").limit(k).to_list()
        scores: Iterable[float] = [float(r["_relevance_score"]) for r in rows]
    else:
        rows = tbl.search(question).distance_type("cosine").limit(k).to_list()
        scores = [1.0 - float(r["_distance"]) for r in rows]
    return [
        {"rank": i, "id": r["id"], "score": round(s, 6), "text": r["text"]}
        for i, (r, s) in enumerate(zip(rows, scores, strict=True), 1)
    ]
