"""Hard negatives: what is mined against, and the on-disk cache keyed by (data, miner, settings).
Also the atomic build-once cache the negatives and the packaged models live in."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest

from embedtune.cache import COMPLETE_MARKER, build_once, is_complete, stable_hash
from embedtune.data import prepare
from embedtune.errors import EmbedtuneError
from embedtune.negatives import cache_key, mine
from embedtune.specs import DataSpec, MiningSpec

# Tiny, without distractors and truncated, so each real mining run encodes ~150 short texts.
TINY = DataSpec(
    source="medquad-sample", max_pairs=100, eval_size=20, max_train_pairs=48, corpus_distractors=False, seed=3
)


@pytest.fixture(scope="module")
def tiny_data():
    return prepare(TINY)


def test_first_mine_builds_triplets_from_the_right_texts(small_data, small_triplets, negatives_cache):
    t = small_triplets
    assert t.mined is True
    assert t.path.parent == negatives_cache and t.path.name == f"{small_data.label}-{t.key}"
    assert (t.path / COMPLETE_MARKER).exists()
    assert t.train.column_names == ["anchor", "positive", "negative"]
    assert t.eval.column_names == ["anchor", "positive", "negative"]
    assert 0.5 * len(small_data.train) <= len(t.train) <= len(small_data.train)
    assert t.counts == {"train_triplets": len(t.train), "eval_triplets": len(t.eval)}

    train_pairs = set(small_data.train)
    train_answers = {a for _, a in small_data.train}
    eval_texts = set(small_data.queries.values()) | {a for _, a in small_data.eval_pairs}
    for row in t.train:
        assert (row["anchor"], row["positive"]) in train_pairs
        assert row["negative"] in train_answers and row["negative"] != row["positive"]
        assert not {row["anchor"], row["positive"], row["negative"]} & eval_texts  # no eval text in training
    corpus = set(small_data.corpus.values())
    for row in t.eval:
        assert row["anchor"] in small_data.queries.values()
        assert row["negative"] in corpus and row["negative"] != row["positive"]


def test_second_call_with_the_same_key_loads_the_cache(small_data, small_triplets, negatives_cache):
    started = time.time()
    again = mine(small_data, MiningSpec(max_seq_length=64), cache_dir=negatives_cache)
    assert again.mined is False
    assert time.time() - started < 10  # no model loaded, nothing encoded
    assert (again.key, again.path) == (small_triplets.key, small_triplets.path)
    assert again.train.to_list() == small_triplets.train.to_list()
    assert again.eval.to_list() == small_triplets.eval.to_list()
    # the hub spelling of a packaged miner is the same model, so the same cache
    hub_spelling = MiningSpec(model="sentence-transformers/all-MiniLM-L6-v2", max_seq_length=64)
    hub = mine(small_data, hub_spelling, cache_dir=negatives_cache)
    assert (hub.mined, hub.key) == (False, small_triplets.key)


def test_cache_key_follows_every_setting_and_the_data(tiny_data):
    base = cache_key(tiny_data, MiningSpec())
    assert cache_key(tiny_data, MiningSpec()) == base
    changes = [
        {"model": "paraphrase-MiniLM-L3-v2"},
        {"num_negatives": 2},
        {"range_min": 1},
        {"range_max": 20},
        {"relative_margin": None},
        {"absolute_margin": 0.1},
        {"sampling_strategy": "random"},
        {"max_seq_length": 64},
    ]
    keys = {cache_key(tiny_data, MiningSpec(**change)) for change in changes}
    assert base not in keys and len(keys) == len(changes)
    for update in ({"seed": 4}, {"eval_size": 21}, {"corpus_distractors": True}):
        assert cache_key(prepare(TINY.model_copy(update=update)), MiningSpec()) != base


def test_changed_setting_or_data_re_mines(tiny_data, tmp_path):
    first = mine(tiny_data, MiningSpec(max_seq_length=64), cache_dir=tmp_path)
    assert first.mined is True
    assert mine(tiny_data, MiningSpec(max_seq_length=64), cache_dir=tmp_path).mined is False
    wider = mine(tiny_data, MiningSpec(num_negatives=2, range_max=10, max_seq_length=64), cache_dir=tmp_path)
    assert wider.mined is True and wider.key != first.key
    assert len(wider.train) > len(first.train)  # two triplets per pair where two negatives qualify
    reseeded = prepare(TINY.model_copy(update={"seed": 4}))
    again = mine(reseeded, MiningSpec(max_seq_length=64), cache_dir=tmp_path)
    assert again.mined is True and again.key not in {first.key, wider.key}
    assert len(list(tmp_path.iterdir())) == 3 + 3  # three artefacts, each with its lock file


def test_nothing_mined_is_a_clear_error_and_leaves_no_cache(tiny_data, tmp_path):
    # cosine scores differ by at most 2, so no negative can be 5 below its positive
    impossible = MiningSpec(relative_margin=None, absolute_margin=5.0, max_seq_length=64)
    with pytest.raises(EmbedtuneError, match="no triplets mined"):
        mine(tiny_data, impossible, cache_dir=tmp_path)
    assert not [p for p in tmp_path.iterdir() if not p.name.endswith(".lock")]


def test_mining_spec_rejects_bad_ranges():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="range_max"):
        MiningSpec(range_min=10, range_max=5)
    with pytest.raises(ValidationError):
        MiningSpec(sampling_strategy="best")
    with pytest.raises(ValidationError):
        MiningSpec(num_negatives=0)


# ------------------------------------------------------------------ build-once cache


def test_stable_hash_is_order_free_for_dicts_and_sensitive_to_values():
    assert stable_hash({"a": 1, "b": 2}) == stable_hash({"b": 2, "a": 1})
    assert stable_hash({"a": 1}) != stable_hash({"a": 2})
    assert stable_hash("ab", "c") != stable_hash("a", "bc")
    assert len(stable_hash("x", length=64)) == 64


def test_build_once_replaces_a_half_written_dir_and_cleans_a_failed_build(tmp_path):
    target = tmp_path / "artefact"
    target.mkdir()
    (target / "stale.txt").write_text("from an interrupted run")

    def build(d: Path) -> None:
        (d / "out.txt").write_text("done")

    path, built = build_once(target, build)
    assert (
        built and is_complete(path) and sorted(p.name for p in path.iterdir()) == [COMPLETE_MARKER, "out.txt"]
    )
    assert build_once(target, build) == (target, False)

    def broken(d: Path) -> None:
        (d / "partial.txt").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        build_once(tmp_path / "other", broken)
    assert not (tmp_path / "other").exists()
    assert [
        p.name for p in tmp_path.iterdir() if p.name.startswith(".other.") and not p.name.endswith(".lock")
    ] == []


def _slow_build_worker(target: str, log: str) -> None:
    def build(d: Path) -> None:
        with open(log, "a") as fh:
            fh.write("built\n")
        time.sleep(0.5)
        (d / "out.txt").write_text("done")

    build_once(Path(target), build)


def test_build_once_builds_once_across_processes(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    log = tmp_path / "log.txt"
    procs = [ctx.Process(target=_slow_build_worker, args=(str(tmp_path / "a"), str(log))) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert log.read_text() == "built\n"
    assert (tmp_path / "a" / "out.txt").read_text() == "done"
