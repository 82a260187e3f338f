"""Cross-encoder reranker: training pairs, training on real mined negatives, loading errors."""

from __future__ import annotations

import random
import time

import numpy as np
import pytest

from embedtune.data import prepare
from embedtune.errors import EmbedtuneError
from embedtune.evaluate import evaluate_models
from embedtune.final.cross_encoder_train import train_reranker, training_pairs
from embedtune.models import resolve_model
from embedtune.negatives import Triplets, mine
from embedtune.records import ModelEntry
from embedtune.rerank import load_cross_encoder
from embedtune.specs import DataSpec, EvalSpec, RerankerTrainConfig

SMALL = RerankerTrainConfig(max_pairs=240, max_length=64)  # a quick training, as measured


def _triplets(n: int = 10) -> Triplets:
    from datasets import Dataset

    ds = Dataset.from_dict(
        {
            "anchor": [f"q{i}" for i in range(n)],
            "positive": [f"a{i}" for i in range(n)],
            "negative": [f"a{(i + 1) % n}" for i in range(n)],
        }
    )
    return Triplets("k", None, ds, ds, False)


def test_training_pairs_labels_and_cap():
    pairs = training_pairs(_triplets(), max_pairs=None, random_negatives=False)
    assert sorted(p[2] for p in pairs) == [0.0] * 10 + [1.0] * 10
    assert all((p[2] == 1.0) == (p[1] == "a" + p[0][1:]) for p in pairs)  # positives are the true answers
    pairs = training_pairs(_triplets(), max_pairs=None, random_negatives=True)
    assert len(pairs) == 30 and sum(p[2] for p in pairs) == 10
    assert all(p[1] != "a" + p[0][1:] for p in pairs if p[2] == 0.0)  # no positive labelled 0
    assert len(training_pairs(_triplets(), max_pairs=7)) == 7


def test_load_errors(tmp_path):
    with pytest.raises(EmbedtuneError, match="failed to load"):
        load_cross_encoder("nobody/no-such-cross-encoder")  # hub id, offline
    (tmp_path / "empty").mkdir()
    with pytest.raises(EmbedtuneError, match="not a cross-encoder model directory"):
        load_cross_encoder(tmp_path / "empty")


def test_train_rejects_bad_settings():
    data = prepare(DataSpec(source="medquad-sample", eval_size=10, max_pairs=40))
    with pytest.raises(EmbedtuneError):
        train_reranker(data, _triplets(), RerankerTrainConfig(epochs=0))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    data = prepare(DataSpec(source="medquad-sample", eval_size=40, max_pairs=300))
    triplets = mine(data)  # cached under EMBEDTUNE_HOME across test runs
    out = tmp_path_factory.mktemp("rerankers")
    t = time.perf_counter()
    path = train_reranker(data, triplets, SMALL, out_dir=out)
    return {"data": data, "triplets": triplets, "path": path, "out": out, "train_s": time.perf_counter() - t}


@pytest.mark.slow
def test_trained_reranker_is_cached(trained):
    t = time.perf_counter()
    again = train_reranker(trained["data"], trained["triplets"], SMALL, out_dir=trained["out"])
    assert again == trained["path"] and time.perf_counter() - t < 5
    assert (again / "config.json").exists()


@pytest.mark.slow
def test_trained_reranker_ranks_relevant_above_irrelevant(trained):
    """Held-out eval questions: the true answer vs a random other corpus answer and vs the mined hard
    negative; the trained head beats an untrained one (which ranks at chance)."""
    import torch
    from sentence_transformers.cross_encoder import CrossEncoder

    ev, corpus = trained["triplets"].eval, list(trained["data"].corpus.values())
    rng = random.Random(0)
    anchors, positives, hard = ev["anchor"], ev["positive"], ev["negative"]
    randoms = [rng.choice([c for c in corpus if c != p]) for p in positives]
    ce = load_cross_encoder(trained["path"])
    pos = ce.predict(list(zip(anchors, positives, strict=True)))
    assert np.mean(pos > ce.predict(list(zip(anchors, randoms, strict=True)))) >= 0.8
    trained_hard = np.mean(pos > ce.predict(list(zip(anchors, hard, strict=True))))
    torch.manual_seed(0)
    raw = CrossEncoder(str(resolve_model("all-MiniLM-L6-v2")), num_labels=1, max_length=64)
    raw_pos = raw.predict(list(zip(anchors, positives, strict=True)))
    raw_hard = np.mean(raw_pos > raw.predict(list(zip(anchors, hard, strict=True))))
    assert trained_hard > raw_hard and trained_hard >= 0.6


@pytest.mark.slow
def test_trained_reranker_improves_hit_at_1_over_untrained_head(trained, tmp_path):
    """Rerank vector candidates of held-out questions: trained head vs an untrained one."""
    import torch
    from sentence_transformers.cross_encoder import CrossEncoder

    torch.manual_seed(0)
    raw_dir = tmp_path / "untrained"
    CrossEncoder(str(resolve_model("all-MiniLM-L6-v2")), num_labels=1, max_length=64).save_pretrained(
        str(raw_dir)
    )
    model = ModelEntry("minilm", str(resolve_model("all-MiniLM-L6-v2")), "minilm")
    spec = EvalSpec(query_types=["vector"], rerankers=["none", "cross-encoder"], overfetch=2)
    db = str(tmp_path / "db")
    good = evaluate_models(
        [model], trained["data"], spec, db, cross_encoder_path=str(trained["path"]), progress=False
    )
    bad = evaluate_models([model], trained["data"], spec, db, cross_encoder_path=str(raw_dir), progress=False)
    good_ce = good[good.reranker == "cross-encoder"].iloc[0]
    bad_ce = bad[bad.reranker == "cross-encoder"].iloc[0]
    assert good_ce.hit_at_1 > bad_ce.hit_at_1 + 0.05, (good_ce.hit_at_1, bad_ce.hit_at_1)
    # Reranking only reorders the top depth x overfetch = 10 x 2 vector candidates: vector hit@20
    # bounds any reranked hit@10 (a reranker that fetched more, or leaked labels, would exceed it).
    deep = evaluate_models(
        [model], trained["data"], EvalSpec(query_types=["vector"], rerankers=["none"], ks=[20]), db,
        progress=False,
    )  # fmt: skip
    vector_hit_20 = float(deep.iloc[0].hit_at_20)
    assert bad_ce.hit_at_10 <= vector_hit_20 + 1e-9 and good_ce.hit_at_10 <= vector_hit_20 + 1e-9
    assert good_ce.n_queries == len(trained["data"].queries)


@pytest.mark.slow
def test_batched_reranking_equals_lancedb_cross_encoder_reranker(trained, tmp_path):
    """The trained reranker from its local path through LanceDB's own CrossEncoderReranker, one
    query at a time, orders vector candidates exactly as the batched evaluation path does."""
    from lancedb.rerankers import CrossEncoderReranker as LanceCrossEncoder

    from embedtune.index import build_table
    from embedtune.models import load_model
    from embedtune.rerank import CrossEncoderReranker

    data = trained["data"]
    base = resolve_model("all-MiniLM-L6-v2")
    encoder = load_model(base)
    tbl = build_table(base, data, tmp_path / "db", model=encoder, progress=False).open()
    batched = CrossEncoderReranker(load_cross_encoder(trained["path"]), data.corpus, 32, str(trained["path"]))
    lance = batched.as_lancedb()
    assert isinstance(lance, LanceCrossEncoder) and lance.model_name == str(trained["path"])

    qids = list(data.queries)[:12]
    texts = [data.queries[q] for q in qids]
    vectors = encoder.encode(texts, normalize_embeddings=True)
    candidates, per_query = [], []
    for text, vec in zip(texts, vectors, strict=True):
        q = tbl.search(vec).distance_type("cosine").limit(15)
        candidates.append(q.to_arrow()["id"].to_pylist())
        reranked = (
            tbl.search(vec).distance_type("cosine").limit(15).rerank(lance, query_string=text).to_arrow()
        )
        per_query.append(reranked["id"].to_pylist()[:5])
    assert batched.rerank_many(texts, candidates, limit=5) == per_query
    # The reranker changes the order for some queries (else this would test nothing).
    assert any(p != c[:5] for p, c in zip(per_query, candidates, strict=True))


@pytest.mark.slow
def test_gate_skips_a_cross_encoder_that_does_not_improve_the_bi_encoder(trained, tmp_path):
    """A cross-encoder with an untrained head reorders the bi-encoder's top 10 at chance: on the
    held-back training questions it scores below the bi-encoder's own ordering, so the gate leaves
    it out and its line gives both numbers. The held-back questions are never in its training pairs."""
    import torch
    from sentence_transformers.cross_encoder import CrossEncoder

    from embedtune.final.cross_encoder_gate import HELD_BACK_MIN, gate_cross_encoder, held_back_questions

    data = trained["data"]
    held = held_back_questions(data)
    assert len(held) >= HELD_BACK_MIN and held <= {q for q, _ in data.train}
    pairs = training_pairs(trained["triplets"], None, exclude=held)
    assert pairs and not held & {q for q, _, _ in pairs}

    torch.manual_seed(0)
    raw_dir = tmp_path / "untrained"
    CrossEncoder(str(resolve_model("all-MiniLM-L6-v2")), num_labels=1, max_length=64).save_pretrained(
        str(raw_dir)
    )
    gate = gate_cross_encoder(data, held, str(raw_dir), "all-MiniLM-L6-v2", "mrr_at_10")
    assert gate is not None and gate.n_questions == len(held)
    assert 0.3 < gate.retrieved <= 1.0 and gate.reranked < gate.retrieved and not gate.used
    assert f"{gate.retrieved:.3f}" in gate.line() and "skipped" in gate.line()


@pytest.mark.slow
def test_cross_encoders_trained_beside_the_trials_are_the_final_stages_and_stop_on_cancel(caplog):
    """The driver's background training (started before the trials) leaves each dataset's
    cross-encoder in the cache, so the final stage only gates it; cancelled mid-training (Ctrl-C
    during the trials), it stops at the next step and caches nothing half-trained."""
    import logging
    import shutil

    from embedtune import env
    from embedtune.final.cross_encoder_early import EarlyCrossEncoders, reranker_jobs
    from embedtune.final.stage import cross_encoders
    from embedtune.specs import FinalSpec

    data = prepare(DataSpec(source="medquad-sample", eval_size=40, max_pairs=200))
    datasets, triplets = {"medquad": data}, {"medquad": mine(data)}
    # pair counts no other test uses: a cold cache entry each, removed after
    spec = FinalSpec(cross_encoder="train", cross_encoder_max_pairs=37)
    (job,) = reranker_jobs(spec, datasets, triplets)
    assert job.held_back and job.held_back <= {q for q, _ in data.train}
    cache = env.home() / "rerankers"
    cache.mkdir(parents=True, exist_ok=True)
    first = set(cache.iterdir())
    try:
        early = EarlyCrossEncoders.start(spec, datasets, triplets)
        assert early is not None
        done = early.wait()
        assert early.error is None and early.seconds > 0 and not early.running
        (path,) = [p for p in set(cache.iterdir()) - first if (p / "config.json").exists()]
        (gate,) = [g for _, p, g in done.values() if p == path]
        assert gate.dataset == data.label and gate.n_questions == len(job.held_back)
        stamp = path.stat().st_mtime_ns
        # The final stage takes what was made beside the trials as it is: no training, no second gate
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="embedtune"):
            cross, gates = cross_encoders(spec, datasets, triplets, None, done)
        said = [r.getMessage() for r in caplog.records]
        assert not [m for m in said if "training a cross-encoder" in m or "held-back" in m], said
        assert gates == [gate] and path.stat().st_mtime_ns == stamp
        assert cross == ({"medquad": str(path)} if gate.used else {})
        # Without it (a resumed final stage), the model comes from the cache and the gate is redone alike
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="embedtune"):
            again, regated = cross_encoders(spec, datasets, triplets)
        assert not [r for r in caplog.records if "training a cross-encoder" in r.getMessage()]
        assert again == cross and [g.reranked for g in regated] == [gate.reranked]

        # what the cache held before the start: a training that made its temp folder before a later
        # snapshot would be seen only once it had finished, and cancelled too late
        before = set(cache.iterdir())
        stopped = EarlyCrossEncoders.start(
            FinalSpec(cross_encoder="train", cross_encoder_max_pairs=41), datasets, triplets
        )
        deadline = time.time() + 120
        while not [p for p in set(cache.iterdir()) - before if p.is_dir()]:  # build_once's temp folder
            assert stopped.running and time.time() < deadline, "the training never started"
            time.sleep(0.05)
        stopped.cancel()
        assert not stopped.running and stopped.error is None
        assert set(cache.iterdir()) - before <= {p for p in cache.iterdir() if p.suffix == ".lock"}
        # nothing cached for the stopped one: the final stage would train it itself
        assert not list(reranker_jobs(spec, {}, {}))  # no datasets: no jobs
        assert EarlyCrossEncoders.start(FinalSpec(cross_encoder=None), datasets, triplets) is None
    finally:  # what this test cached goes, so the next run starts cold again
        for p in set(cache.iterdir()) - first:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
