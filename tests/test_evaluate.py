"""Retrieval metrics, batched legs, hybrid fusion and evaluate_models on real data."""

from __future__ import annotations

import math
from pathlib import Path

import lancedb
import numpy as np
import pyarrow as pa
import pytest
from lancedb.index import FTS
from lancedb.rerankers import LinearCombinationReranker

from embedtune import rerank
from embedtune.data import PreparedData, prepare
from embedtune.errors import EmbedtuneError
from embedtune.evaluate import (
    COLUMNS,
    evaluate_models,
    hit_rate_at_k,
    mrr_at_k,
    ndcg_at_k,
    per_query_metrics,
    retrieval_metrics,
)
from embedtune.index import build_table
from embedtune.models import load_model, resolve_model
from embedtune.records import ModelEntry
from embedtune.rerank import combos, fuse
from embedtune.retrieval import fts_leg, fts_leg_one, vector_leg, vector_leg_one
from embedtune.specs import DataSpec, EvalSpec

# ---------------------------------------------------------------- metrics, by hand

RANKED = [["a", "b", "c"], ["b", "a", "c"], ["b", "c", "d"], ["c", "b", "a"]]
RELEVANT = [{"a"}, {"a"}, {"a"}, {"a", "b"}]


def test_hit_rate_hand_checked():
    assert hit_rate_at_k(RANKED, RELEVANT, 1) == 0.25  # only q1 has a relevant doc first
    assert hit_rate_at_k(RANKED, RELEVANT, 2) == 0.75  # q1, q2, q4
    assert hit_rate_at_k(RANKED, RELEVANT, 3) == 0.75  # q3 never finds a
    assert hit_rate_at_k(RANKED, RELEVANT, 10) == 0.75


def test_mrr_and_ndcg_hand_checked():
    assert mrr_at_k(RANKED, RELEVANT, 10) == pytest.approx((1 + 1 / 2 + 0 + 1 / 2) / 4)
    assert mrr_at_k(RANKED, RELEVANT, 1) == 0.25
    l3, l4 = math.log2(3), math.log2(4)
    q4 = (1 / l3 + 1 / l4) / (1 + 1 / l3)  # b at rank 2, a at rank 3; ideal: two relevant at the top
    assert ndcg_at_k(RANKED, RELEVANT, 10) == pytest.approx((1 + 1 / l3 + 0 + q4) / 4)
    m = retrieval_metrics(RANKED, RELEVANT, ks=[1, 2])
    assert set(m) == {"hit_at_1", "hit_at_2", "mrr_at_10", "ndcg_at_10"}


def test_per_query_values_average_to_the_metrics():
    pq = per_query_metrics(RANKED, RELEVANT, ks=[1, 2])
    assert pq["hit_at_1"] == [1.0, 0.0, 0.0, 0.0]
    assert pq["hit_at_2"] == [1.0, 1.0, 0.0, 1.0]
    assert pq["mrr_at_10"] == [1.0, 0.5, 0.0, 0.5]
    m = retrieval_metrics(RANKED, RELEVANT, ks=[1, 2])
    assert set(pq) == set(m)
    for name, values in pq.items():
        assert len(values) == len(RANKED) and np.mean(values) == pytest.approx(m[name])


def test_metrics_take_dicts():
    ranked = {"q1": ["a", "b"], "q2": ["c", "a"]}
    assert hit_rate_at_k(ranked, {"q1": ["b"], "q2": ["c"]}, 1) == 0.5
    with pytest.raises(ValueError):
        hit_rate_at_k(RANKED, RELEVANT[:2], 1)


def _tiny_table(tmp_path: Path):
    """Six one-topic documents with one-hot vectors: rankings are known exactly."""
    docs = ["apple banana", "cherry grape", "lemon melon", "kiwi mango", "peach plum", "olive fig"]
    vecs = np.eye(8, dtype=np.float32)[:6]
    db = lancedb.connect(str(tmp_path / "tiny"))
    tbl = db.create_table(
        "t",
        pa.table(
            {
                "id": [f"d{i}" for i in range(6)],
                "text": docs,
                "vector": pa.FixedSizeListArray.from_arrays(pa.array(vecs.ravel()), 8),
            }
        ),
    )
    tbl.create_index("text", config=FTS())
    return tbl


def test_tiny_corpus_exact_hits(tmp_path):
    tbl = _tiny_table(tmp_path)
    # FTS: each query names one document's fruit; q2 is judged relevant to another document.
    texts = ["banana", "grape", "melon"]
    relevant = [{"d0"}, {"d1"}, {"d5"}]
    fts = [leg["id"].to_pylist() for leg in fts_leg(tbl, texts, limit=3, threads=2)]
    assert [r[0] for r in fts] == ["d0", "d1", "d2"]
    assert hit_rate_at_k(fts, relevant, 1) == pytest.approx(2 / 3)
    assert hit_rate_at_k(fts, relevant, 3) == pytest.approx(2 / 3)  # d5 shares no word with "melon"
    # Vector: query = 0.9 * e_i + 0.4 * e_j ranks d_i first and d_j second.
    q = np.zeros((3, 8), dtype=np.float32)
    q[0, [0, 3]] = [0.9, 0.4]
    q[1, [4, 1]] = [0.9, 0.4]
    q[2, [5, 2]] = [0.9, 0.4]
    vec = [leg["id"].to_pylist() for leg in vector_leg(tbl, q, limit=2)]
    assert vec == [["d0", "d3"], ["d4", "d1"], ["d5", "d2"]]
    rel = [{"d3"}, {"d4"}, {"d2"}]
    assert hit_rate_at_k(vec, rel, 1) == pytest.approx(1 / 3)
    assert hit_rate_at_k(vec, rel, 2) == 1.0
    assert mrr_at_k(vec, rel, 10) == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)


def test_eval_spec_validation():
    spec = EvalSpec()
    assert spec.depth == 10 and spec.overfetch == 4
    assert ("vector", "rrf") not in combos(spec) and ("hybrid", "none") not in combos(spec)
    assert ("hybrid", "linear") in combos(spec) and ("fts", "cross-encoder") in combos(spec)
    with pytest.raises(ValueError):
        EvalSpec(bogus=1)
    with pytest.raises(ValueError):
        EvalSpec(ks=[0])
    with pytest.raises(ValueError):
        EvalSpec(query_types=["sparse"])


# ---------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """MedQuAD sample, all-MiniLM-L6-v2, one LanceDB table (built once for this module)."""
    data = prepare(DataSpec(source="medquad-sample", eval_size=60, max_pairs=300))
    path = resolve_model("all-MiniLM-L6-v2")
    model = load_model(path)
    db = tmp_path_factory.mktemp("lancedb")
    indexed = build_table(path, data, db, model=model, progress=False)
    qtexts = list(data.queries.values())
    qv = model.encode(qtexts, normalize_embeddings=True, convert_to_numpy=True)
    return {
        "data": data,
        "path": path,
        "model": model,
        "db": str(db),
        "tbl": indexed.open(),
        "qtexts": qtexts,
        "qv": qv,
    }


@pytest.mark.slow
def test_batched_vector_equals_per_query_loop(real):
    tbl, qv = real["tbl"], real["qv"]
    batched = vector_leg(tbl, qv, limit=10, chunk=25)  # several chunks, one search each
    assert len(batched) == len(qv)
    for leg, v in zip(batched, qv, strict=True):
        one = vector_leg_one(tbl, v, 10)
        assert leg["id"].to_pylist() == one["id"].to_pylist()
        np.testing.assert_allclose(
            leg["_distance"].to_numpy(), one["_distance"].to_numpy(), rtol=1e-5, atol=1e-6
        )


@pytest.mark.slow
def test_threaded_fts_equals_sequential(real):
    tbl, texts = real["tbl"], real["qtexts"]
    threaded = fts_leg(tbl, texts, 10, threads=4)
    for leg, t in zip(threaded, texts, strict=True):
        assert leg["id"].to_pylist() == fts_leg_one(tbl, t, 10)["id"].to_pylist()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["rrf", "linear"])
def test_fusion_equals_lancedb_hybrid_query(real, name):
    """Our fusion of the batched legs gives exactly LanceDB's own per-query hybrid search."""
    tbl, qv, texts = real["tbl"], real["qv"], real["qtexts"]
    vec, fts = vector_leg(tbl, qv, 10), fts_leg(tbl, texts, 10)
    reranker = rerank.build({name}, EvalSpec(), {})[name].reranker  # the LanceDB reranker it wraps
    for i in range(0, len(texts), 3):
        ours = fuse(reranker, texts[i], vec[i], fts[i], 10)["id"].to_pylist()
        theirs = (
            tbl.search(query_type="hybrid")
            .vector(qv[i])
            .text(texts[i])
            .distance_type("cosine")
            .bypass_vector_index()
            .rerank(reranker)
            .limit(10)
            .to_arrow()["id"]
            .to_pylist()
        )
        assert ours == theirs, texts[i]


@pytest.mark.slow
def test_linear_combination_direction_on_real_data(real):
    """LinearCombinationReranker once returned 1 - weighted sum (best last). Weight 1 must give the
    vector ranking and weight 0 the BM25 ranking, best first, with descending fused scores."""
    tbl, qv, texts = real["tbl"], real["qv"], real["qtexts"]
    vec, fts = vector_leg(tbl, qv, 10), fts_leg(tbl, texts, 10)
    for i in range(len(texts)):
        if fts[i].num_rows < 3:
            continue
        only_vec = fuse(LinearCombinationReranker(weight=1.0), texts[i], vec[i], fts[i], 20)
        only_fts = fuse(LinearCombinationReranker(weight=0.0), texts[i], vec[i], fts[i], 20)
        # The worst row of each leg normalises to 0 and ties with rows missing from that leg.
        assert only_vec["id"].to_pylist()[:9] == vec[i]["id"].to_pylist()[:9]
        n = fts[i].num_rows - 1
        assert only_fts["id"].to_pylist()[:n] == fts[i]["id"].to_pylist()[:n]
        scores = fuse(LinearCombinationReranker(), texts[i], vec[i], fts[i], 20)[
            "_relevance_score"
        ].to_numpy()
        assert np.all(np.diff(scores) <= 1e-6)


@pytest.mark.slow
def test_evaluate_models_rows_and_sensible_hits(real, tmp_path):
    data = real["data"]
    base = ModelEntry("minilm", str(real["path"]), "minilm", "base")
    again = ModelEntry("minilm-copy", str(real["path"]), "minilm", "tuned", trial_id="t1", epochs=2)
    df = evaluate_models(
        [base, again], data, EvalSpec(rerankers=["none", "rrf", "linear"]), real["db"], progress=False
    )
    assert list(df.columns) == COLUMNS
    assert len(df) == 2 * 4  # vector/none, fts/none, hybrid/rrf, hybrid/linear per model
    assert set(df["n_queries"]) == {len(data.queries)}
    chance = 10 / len(data.corpus)
    for _, row in df.iterrows():
        assert row.hit_at_1 <= row.hit_at_5 <= row.hit_at_10
        assert row.hit_at_10 > max(0.4, 5 * chance), (row.query_type, row.reranker, row.hit_at_10)
    fts = df[df.query_type == "fts"]
    assert fts.hit_at_10.nunique() == 1  # FTS does not depend on the model: same numbers in each block
    for _, row in df.iterrows():  # per-query values, one per question, average to the row's metrics
        assert set(row.per_query) == {"hit_at_1", "hit_at_5", "hit_at_10", "mrr_at_10", "ndcg_at_10"}
        for name, values in row.per_query.items():
            assert len(values) == len(data.queries) and np.mean(values) == pytest.approx(row[name])
    tuned = df[df.model == "minilm-copy"].iloc[0]
    assert (tuned.kind, tuned.trial_id, tuned.epochs) == ("tuned", "t1", 2)
    # Same weights, same numbers: the second model reused the first one's table.
    vec = df[df.query_type == "vector"]
    assert vec.hit_at_1.nunique() == 1 and vec.mrr_at_10.nunique() == 1


# ---------------------------------------------------------------- bad input, before any table is written


def _tables(db: Path) -> list[str]:
    if not db.exists():
        return []
    return list(lancedb.connect(str(db)).list_tables().tables)


def _tiny_data(n_docs: int = 20, n_queries: int = 3) -> PreparedData:
    corpus = {f"d{i}": f"document number {i}" for i in range(n_docs)}
    queries = {f"q{i}": f"question {i}" for i in range(n_queries)}
    return PreparedData("fp", "tiny", [], [], queries, corpus, {q: [f"d{i}"] for i, q in enumerate(queries)})


def test_not_a_sentence_transformers_model(tmp_path):
    bad = tmp_path / "notamodel"
    bad.mkdir()
    (bad / "weights.txt").write_text("nope")
    db = tmp_path / "db"
    with pytest.raises(EmbedtuneError, match="not a sentence-transformers model"):
        evaluate_models([ModelEntry("bad", str(bad), "bad")], _tiny_data(), EvalSpec(), str(db))
    hf_only = tmp_path / "hf_only"  # a transformers checkpoint without modules.json
    hf_only.mkdir()
    (hf_only / "config.json").write_text("{}")
    with pytest.raises(EmbedtuneError, match="not a sentence-transformers model"):
        evaluate_models([ModelEntry("bad", str(hf_only), "bad")], _tiny_data(), EvalSpec(), str(db))
    with pytest.raises(EmbedtuneError, match="does not exist"):
        evaluate_models(
            [ModelEntry("bad", str(tmp_path / "missing"), "bad")], _tiny_data(), EvalSpec(), str(db)
        )
    assert _tables(db) == []


def test_empty_eval_set_and_k_beyond_corpus(tmp_path):
    path = str(resolve_model("all-MiniLM-L6-v2"))
    db = tmp_path / "db"
    empty = _tiny_data(n_queries=0)
    with pytest.raises(EmbedtuneError, match="no held-out questions"):
        evaluate_models([ModelEntry("m", path, "m")], empty, EvalSpec(), str(db))
    with pytest.raises(EmbedtuneError, match="larger than the corpus"):
        evaluate_models([ModelEntry("m", path, "m")], _tiny_data(n_docs=20), EvalSpec(ks=[1, 50]), str(db))
    with pytest.raises(EmbedtuneError, match="larger than the corpus"):  # MRR@10 needs 10 documents
        evaluate_models([ModelEntry("m", path, "m")], _tiny_data(n_docs=5), EvalSpec(ks=[1]), str(db))
    assert _tables(db) == []


def test_reranker_that_fails_to_load(tmp_path):
    path = str(resolve_model("all-MiniLM-L6-v2"))
    db = tmp_path / "db"
    broken = tmp_path / "broken_ce"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "bert"}')  # config but no weights
    for ref, match in [
        (str(broken), "failed to load"),
        (str(tmp_path / "empty_dir_x"), "failed to load"),
        ("nobody/no-such-cross-encoder", "failed to load"),
    ]:
        if ref.endswith("empty_dir_x"):
            Path(ref).mkdir()
            match = "not a cross-encoder model directory"
        with pytest.raises(EmbedtuneError, match=match):
            evaluate_models(
                [ModelEntry("m", path, "m")], _tiny_data(), EvalSpec(), str(db), cross_encoder_path=ref
            )
    assert _tables(db) == []
