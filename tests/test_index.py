"""LanceDB ingest: identity, reuse, interrupted ingest, indexes."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import lancedb
import pytest

from embedtune.data import prepare
from embedtune.errors import EmbedtuneError
from embedtune.index import COMPLETE_TAG, build_table, is_complete, table_name
from embedtune.models import load_model, model_identity, resolve_model
from embedtune.specs import DataSpec


def test_model_identity_follows_content_not_location(tmp_path):
    a = tmp_path / "a"
    a.mkdir()
    (a / "config.json").write_text('{"x": 1}')
    (a / "model.safetensors").write_bytes(b"\0" * (3 << 20))
    b = tmp_path / "b"
    shutil.copytree(a, b)
    assert model_identity(a) == model_identity(b)
    raw = bytearray((b / "model.safetensors").read_bytes())
    raw[-10] = 1  # retrained weights differ somewhere in the tail
    (b / "model.safetensors").write_bytes(bytes(raw))
    assert model_identity(a) != model_identity(b)
    before = model_identity(a)
    (a / "config.json").write_text('{"x": 2}')
    assert model_identity(a) != before
    with pytest.raises(EmbedtuneError):
        model_identity(tmp_path / "missing")


@pytest.fixture(scope="module")
def small():
    """A real MedQuAD sample, corpus cut to 60 documents to keep encoding short."""
    data = prepare(DataSpec(source="medquad-sample", eval_size=20, max_pairs=200))
    corpus = dict(list(data.corpus.items())[:60])
    relevant = {q: [c for c in cs if c in corpus] for q, cs in data.relevant.items()}
    queries = {q: t for q, t in data.queries.items() if relevant[q]}
    data = dataclasses.replace(
        data, corpus=corpus, queries=queries, relevant={q: relevant[q] for q in queries}
    )
    path = resolve_model("all-MiniLM-L6-v2")
    return data, path, load_model(path)


@pytest.mark.slow
def test_build_then_reuse(small, tmp_path):
    data, path, model = small
    first = build_table(path, data, tmp_path / "db", model=model, progress=False)
    assert not first.reused and first.rows == len(data.corpus) and first.dim == 384
    assert first.vector_index is None
    tbl = first.open()
    assert tbl.schema.names == ["id", "text", "vector"]
    indexed = {i.columns[0]: i.index_type for i in tbl.list_indices()}
    assert indexed["text"] == "FTS" and "vector" not in indexed  # 60 rows: exhaustive search
    assert COMPLETE_TAG in tbl.tags.list()
    assert first.name == table_name(model_identity(path), data)
    again = build_table(path, data, tmp_path / "db", model=model, progress=False)
    assert again.reused and again.name == first.name and again.seconds < first.seconds
    assert again.open().version == tbl.version  # nothing written
    # Full-text search works on the native index.
    some_text = next(iter(data.corpus.values()))
    hits = (
        tbl.search(" ".join(some_text.split()[:6]), query_type="fts").limit(3).to_arrow()["text"].to_pylist()
    )
    assert some_text in hits


@pytest.mark.slow
def test_truncation_is_part_of_the_table_identity(small, tmp_path):
    """Base and tuned models are compared under the sweep's truncation: a table embedded at another
    max_seq_length holds other vectors, so it is another table, never a reused one."""
    import numpy as np

    data, path, _ = small
    full = build_table(path, data, tmp_path / "db", model=load_model(path), progress=False)
    short = build_table(
        path, data, tmp_path / "db", model=load_model(path), progress=False, max_seq_length=16
    )
    assert short.name != full.name and short.name.endswith("__s16") and not short.reused
    meta = short.open().schema.metadata
    assert meta[b"embedtune.max_seq_length"] == b"16"
    long_doc = max(data.corpus, key=lambda c: len(data.corpus[c]))
    vec = {
        t.name: t.open().search().where(f"id = '{long_doc}'").to_arrow()["vector"][0].as_py()
        for t in (full, short)
    }
    assert not np.allclose(vec[full.name], vec[short.name])  # truncation changed the embedding
    assert build_table(path, data, tmp_path / "db", progress=False, max_seq_length=16).reused


INGEST = """
import sys
from embedtune.data import prepare
from embedtune.index import build_table
from embedtune.models import resolve_model
from embedtune.specs import DataSpec

data = prepare(DataSpec(source="medquad-sample", eval_size=20, max_pairs=int(sys.argv[2])))
build_table(resolve_model("all-MiniLM-L6-v2"), data, sys.argv[1], progress=False, chunk_rows=16)
"""


@pytest.mark.slow
def test_ingest_killed_midway_is_rebuilt(tmp_path):
    """A real ingesting process is SIGKILLed between two batches (no Python cleanup runs): its
    table is left with some rows and no completion tag, and the next build rebuilds it whole."""
    import os
    import signal
    import subprocess
    import sys
    import time

    pairs, db = 300, tmp_path / "db"
    data = prepare(DataSpec(source="medquad-sample", eval_size=20, max_pairs=pairs))
    path = resolve_model("all-MiniLM-L6-v2")
    name = table_name(model_identity(path), data)
    child = subprocess.Popen(
        [sys.executable, "-c", INGEST, str(db), str(pairs)],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    rows, deadline = 0, time.time() + 300
    try:
        while rows < 32 and child.poll() is None and time.time() < deadline:
            time.sleep(0.05)
            try:
                rows = lancedb.connect(str(db)).open_table(name).count_rows()
            except Exception:  # not created yet
                rows = 0
        assert child.poll() is None, "the ingest ended before it could be killed"
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
    half = lancedb.connect(str(db)).open_table(name)
    assert 0 < half.count_rows() < len(data.corpus) and not is_complete(half)
    rebuilt = build_table(path, data, db, progress=False)
    assert not rebuilt.reused and rebuilt.rows == len(data.corpus)
    assert is_complete(rebuilt.open())
    # A complete-tagged table that lost rows afterwards is not trusted either.
    rebuilt.open().delete(f"id = '{next(iter(data.corpus))}'")
    assert not is_complete(rebuilt.open())
    again = build_table(path, data, db, progress=False)
    assert not again.reused and again.rows == len(data.corpus)


@pytest.mark.slow
def test_forced_vector_index(small, tmp_path):
    data, path, model = small
    built = build_table(path, data, tmp_path / "db", model=model, progress=False, vector_index=True)
    assert built.vector_index == "IVF_HNSW_SQ"
    indexed = {i.columns[0]: i.index_type for i in built.open().list_indices()}
    assert indexed["vector"] == "IvfHnswSq" and indexed["text"] == "FTS"


@pytest.mark.slow
def test_a_disk_that_fills_mid_ingest_ends_in_one_line_and_leaves_no_table(tmp_path):
    """`embedtune evaluate` ingests into LanceDB on a real 8 MiB disk (a tmpfs) filled to the brim
    but 256 KiB, less than the corpus's embeddings: the run ends with one line naming the LanceDB
    path and the fix, leaves no table (a half-written one is dropped) and no report. With the space
    given back, the same command builds the table whole and writes the report."""
    import sys

    from small_disk import on_small_disk

    disk, out = tmp_path / "disk", tmp_path / "eval"
    run = [sys.executable, "-m", "embedtune.cli", "evaluate", "--models", "paraphrase-MiniLM-L3-v2",
           "--data", "medquad-sample", "--max-pairs", "200", "--eval-size", "30", "--out", str(out),
           "--lancedb", str(disk / "lancedb"), "--query-types", "vector", "--rerankers", "none",
           "--cross-encoder", "none", "--encode-backend", "torch"]  # fmt: skip
    t = tmp_path
    script = (
        f'leave_free 256K; "$@" 2> {t}/first.err; echo $? > {t}/first.rc; ls -a {disk} > {t}/first.ls; '
        f"ls -a {out} > {t}/first-out.ls; "
        f"mkdir -p {disk}/lancedb; cp -a {disk}/lancedb {t}/first-db; rm {disk}/.filler; "
        f'"$@" 2> {t}/second.err; echo $? > {t}/second.rc; cp -a {disk}/lancedb {t}/second-db'
    )
    done = on_small_disk(disk, "8m", script, run, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    first = (t / "first.err").read_text()
    errors = [ln for ln in first.splitlines() if ln.startswith("embedtune: error:")]
    assert (t / "first.rc").read_text().strip() == "2" and "Traceback" not in first, first[-3000:]
    assert len(errors) == 1 and first.strip().splitlines()[-1] == errors[0], first[-3000:]
    assert errors[0].startswith(f"embedtune: error: no space left on the disk of {disk}/lancedb while writing "
                                "LanceDB table medquad-sample__"), errors  # fmt: skip
    assert errors[0].endswith("(not kept); free space there or point final.lancedb_uri "
                              "(embedtune evaluate: --lancedb) at a bigger disk"), errors  # fmt: skip
    assert (t / "first.ls").read_text().split() == [".", "..", ".filler", "lancedb"]  # the ingest began
    assert list(lancedb.connect(str(t / "first-db")).table_names()) == []  # nothing a rerun could trust
    left = (t / "first-out.ls").read_text().split()
    assert "data" in left and not [n for n in left if "report" in n], left  # no report, not even half

    assert (t / "second.rc").read_text().strip() == "0", (t / "second.err").read_text()[-3000:]
    (name,) = lancedb.connect(str(t / "second-db")).table_names()
    assert is_complete(lancedb.connect(str(t / "second-db")).open_table(name))
    assert (out / "report" / "leaderboard.md").is_file()
