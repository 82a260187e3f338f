"""Data: loaders (samples, JSONL(.gz), Parquet, CSV, Hugging Face, BEIR), column mapping,
cleaning, the leak-free split, the leak check and the fingerprint. All on real data, offline."""

from __future__ import annotations

import csv
import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from paths import shared_data

from embedtune.data import PreparedData, check_no_leak, load_pairs, parse_data_arg, prepare, split
from embedtune.errors import EmbedtuneError
from embedtune.specs import DataSpec

SQUAD_DEV = shared_data("squad_v1.1/squad_dev_pairs.jsonl.gz")
SCIFACT = shared_data("scifact")


def _rows(path: Path, n: int | None = None) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh]
    return rows[:n] if n else rows


@pytest.fixture(scope="module")
def squad_rows() -> list[dict]:
    """SQuAD-style rows (`question`, `context`, `title`): the first 300 questions of the shipped sample."""
    from importlib import resources

    sample = Path(str(resources.files("embedtune") / "samples" / "squad_sample.jsonl.gz"))
    return [
        {"question": r["question"], "context": r["answer"], "title": r["title"]} for r in _rows(sample, 300)
    ]


def _write(path: Path, rows: list[dict]) -> Path:
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "wt", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
    elif path.name.endswith(".csv"):
        with open(path, "w", encoding="utf-8", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif path.name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _assert_consistent(data: PreparedData) -> None:
    check_no_leak(data)
    assert set(data.relevant) == set(data.queries)
    assert all(cid in data.corpus for cids in data.relevant.values() for cid in cids)
    assert {q for q, _ in data.eval_pairs} == set(data.queries.values())
    # every eval pair's answer is a relevant document of its question
    qid_of = {q: qid for qid, q in data.queries.items()}
    cid_of = {t: cid for cid, t in data.corpus.items()}
    assert all(cid_of[a] in data.relevant[qid_of[q]] for q, a in data.eval_pairs)


# ------------------------------------------------------------------ loaders


@pytest.mark.parametrize("name", ["medquad-sample", "squad-sample"])
def test_packaged_samples_prepare(name):
    data = prepare(DataSpec(source=name))
    assert data.label == name
    assert data.counts["pairs"] > 1000
    assert data.counts["eval_questions"] == len(data.queries) > 100
    assert len(data.train) == data.counts["train_pairs"]
    _assert_consistent(data)


@pytest.mark.parametrize("filename", ["pairs.jsonl", "pairs.jsonl.gz", "pairs.parquet", "pairs.csv"])
def test_file_loaders_with_column_mapping(tmp_path, squad_rows, filename):
    path = _write(tmp_path / filename, squad_rows)
    spec = DataSpec(source=str(path), answer_column="context", eval_size=30)
    pairs, extra = load_pairs(spec)
    assert extra == []
    assert pairs[0] == (squad_rows[0]["question"], squad_rows[0]["context"])
    assert len(pairs) == len({(r["question"], r["context"]) for r in squad_rows})
    data = prepare(spec)
    assert data.label == "pairs"
    assert len(data.queries) >= 30
    _assert_consistent(data)


def test_same_content_in_every_format_gives_same_fingerprint(tmp_path, squad_rows):
    prints = {
        fmt: prepare(
            DataSpec(source=str(_write(tmp_path / f"p.{fmt}", squad_rows)), answer_column="context")
        ).fingerprint
        for fmt in ("jsonl", "csv", "parquet")
    }
    assert len(set(prints.values())) == 1, prints


def test_data_arg_settings_map_columns(tmp_path, squad_rows):
    path = _write(tmp_path / "squad.csv", squad_rows)
    spec = parse_data_arg(
        f"{path}?question_column=question&answer_column=context&eval_size=20", max_pairs=None
    )
    assert (spec.answer_column, spec.eval_size) == ("context", 20)
    assert len(prepare(spec).queries) >= 20
    with pytest.raises(EmbedtuneError, match="eval_size"):
        parse_data_arg(f"{path}?eval_size=zero")
    with pytest.raises(EmbedtuneError, match="key=value"):
        parse_data_arg(f"{path}?eval_size")


def test_missing_column_names_it_and_suggests(tmp_path, squad_rows):
    path = _write(tmp_path / "squad.jsonl", squad_rows)
    with pytest.raises(EmbedtuneError) as err:
        load_pairs(DataSpec(source=str(path), answer_column="contxt"))
    msg = str(err.value)
    assert "'contxt' not found" in msg and "did you mean 'context'" in msg and "question, title" in msg
    assert "\n" not in msg


def test_cleaning_strips_drops_empty_and_duplicates(tmp_path):
    rows = [
        {"question": "  What is A? ", "answer": "A is a letter. "},
        {"question": "What is A?", "answer": "A is a letter."},  # duplicate after stripping
        {"question": "", "answer": "orphan answer"},
        {"question": "no answer", "answer": None},
        {"question": "What is B?", "answer": "B follows A."},
    ]
    pairs, _ = load_pairs(DataSpec(source=str(_write(tmp_path / "p.jsonl", rows))))
    assert pairs == [("What is A?", "A is a letter."), ("What is B?", "B follows A.")]


def test_hf_saved_dataset_offline(tmp_path, squad_rows):
    import datasets

    ds = datasets.Dataset.from_list(squad_rows)
    ds.save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": ds, "validation": ds.select(range(50))}).save_to_disk(
        str(tmp_path / "dict")
    )
    by_prefix, _ = load_pairs(DataSpec(source=f"hf:{tmp_path / 'one'}", answer_column="context"))
    by_format, _ = load_pairs(DataSpec(source=str(tmp_path / "one"), format="hf", answer_column="context"))
    auto, _ = load_pairs(
        DataSpec(source=str(tmp_path / "one"), answer_column="context")
    )  # a dir without qrels/
    assert by_prefix == by_format == auto
    assert len(by_prefix) == len({(r["question"], r["context"]) for r in squad_rows})
    validation, _ = load_pairs(
        DataSpec(source=f"hf:{tmp_path / 'dict'}", hf_split="validation", answer_column="context")
    )
    assert len(validation) == 50
    with pytest.raises(EmbedtuneError, match="available splits: train, validation"):
        load_pairs(DataSpec(source=f"hf:{tmp_path / 'dict'}", hf_split="test", answer_column="context"))
    with pytest.raises(EmbedtuneError, match="'answer' not found"):
        load_pairs(DataSpec(source=f"hf:{tmp_path / 'one'}"))


def test_hf_hub_id_offline_fails_fast_and_clearly():
    assert os.environ["HF_DATASETS_OFFLINE"] == "1"
    started = time.time()
    with pytest.raises(EmbedtuneError) as err:
        load_pairs(DataSpec(source="hf:rajpurkar/squad", answer_column="context"))
    assert time.time() - started < 30
    msg = str(err.value)
    assert "rajpurkar/squad" in msg and "offline" in msg.lower() and "\n" not in msg


def test_beir_folder_scifact():
    spec = DataSpec(source=str(SCIFACT), eval_fraction=0.3)
    pairs, extra = load_pairs(spec)
    n_corpus = sum(1 for _ in gzip.open(SCIFACT / "corpus.jsonl.gz", "rt"))
    assert len(extra) == n_corpus == 5183
    test_queries = {r[0] for r in csv.reader(open(SCIFACT / "qrels" / "test.tsv"), delimiter="\t")} - {
        "query-id"
    }
    assert len({q for q, _ in pairs}) == len(test_queries) == 300
    data = prepare(spec)
    assert data.label == "scifact"
    _assert_consistent(data)
    assert len(data.corpus) == n_corpus  # every abstract is in the eval corpus
    assert max(len(c) for c in data.relevant.values()) > 1  # some claims cite several abstracts
    train_split, _ = load_pairs(DataSpec(source=str(SCIFACT), beir_split="train"))
    assert len({q for q, _ in train_split}) > 300
    no_distractors = prepare(DataSpec(source=str(SCIFACT), corpus_distractors=False))
    assert set(no_distractors.corpus.values()) == {a for _, a in no_distractors.eval_pairs}


# ------------------------------------------------------------------ bad input


def test_bad_files_raise_one_clear_line(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "header.csv").write_text("question,answer\n")
    (tmp_path / "latin1.csv").write_bytes("question,answer\ncaf\xe9 au lait?,a drink\n".encode("latin-1"))
    (tmp_path / "broken.jsonl").write_text('{"question": "q", "answer": "a"}\nnot json\n')
    (tmp_path / "notes.txt").write_text("question,answer\n")
    (tmp_path / "fake.jsonl.gz").write_text("plain text")
    cases = {
        "empty.jsonl": "has no rows",
        "header.csv": "has no rows",
        "latin1.csv": "not UTF-8",
        "broken.jsonl": "broken.jsonl:2: not valid JSON",
        "notes.txt": "cannot tell the format",
        "fake.jsonl.gz": "cannot read",
        "missing.jsonl": "data file not found",
    }
    for name, expected in cases.items():
        with pytest.raises(EmbedtuneError) as err:
            prepare(DataSpec(source=str(tmp_path / name)))
        assert expected in str(err.value), (name, str(err.value))
        assert "\n" not in str(err.value)


def test_too_small_for_the_split(tmp_path):
    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(5)]
    path = _write(tmp_path / "tiny.jsonl", rows)
    with pytest.raises(EmbedtuneError, match="too small for the split asked"):
        prepare(DataSpec(source=str(path), eval_size=5))
    with pytest.raises(EmbedtuneError, match="too small for the split asked"):
        prepare(DataSpec(source=str(path), eval_size=4))  # would leave one train pair
    one_group = [{"question": f"q{i}", "answer": "the same answer"} for i in range(5)]
    with pytest.raises(EmbedtuneError, match="1 independent group"):
        prepare(DataSpec(source=str(_write(tmp_path / "one.jsonl", one_group)), eval_size=1))
    assert len(prepare(DataSpec(source=str(path), eval_size=3)).train) == 2


# ------------------------------------------------------------------ split and leak check


def test_split_keeps_shared_text_groups_together():
    # q1-a1, q2-a1 share an answer; q2-a2 shares q2; "a3" is also a question elsewhere (paraphrase data)
    pairs = [("q1", "a1"), ("q2", "a1"), ("q2", "a2"), ("a3", "x"), ("q4", "a3")]
    pairs += [(f"free{i}", f"ans{i}") for i in range(20)]
    for seed in range(20):
        data = split(pairs, DataSpec(source="inline", eval_size=3, seed=seed))
        check_no_leak(data)
        train = set(data.train)
        assert len({p in train for p in pairs[:3]}) == 1, seed  # the q1/q2 group is never cut
        assert len({p in train for p in pairs[3:5]}) == 1, seed


def test_split_is_leak_free_on_squad_paragraphs():
    """SQuAD: many questions share one paragraph, so a naive row split would leak paragraphs."""
    rows = _rows(SQUAD_DEV, 3000)
    pairs = list(dict.fromkeys((r["question"], r["answer"]) for r in rows))
    data = split(pairs, DataSpec(source=str(SQUAD_DEV), eval_size=300, seed=7))
    _assert_consistent(data)
    eval_paragraphs = {a for _, a in data.eval_pairs}
    assert not eval_paragraphs & {a for _, a in data.train}
    assert len(data.queries) >= 300
    assert len(eval_paragraphs) < len(data.queries)  # several questions per paragraph held out together


def test_split_is_deterministic_by_seed_and_caps_train():
    spec = DataSpec(source="medquad-sample", eval_size=100, max_train_pairs=256)
    a, b = prepare(spec), prepare(spec)
    assert (a.train, a.queries, a.corpus) == (b.train, b.queries, b.corpus)
    assert len(a.train) == 256 and a.counts["train_pairs"] == 256
    c = prepare(spec.model_copy(update={"seed": 1}))
    assert set(c.queries.values()) != set(a.queries.values())
    _assert_consistent(c)
    only_eval = prepare(spec.model_copy(update={"corpus_distractors": False}))
    assert set(only_eval.corpus.values()) == {ans for _, ans in only_eval.eval_pairs}
    assert len(a.corpus) > len(only_eval.corpus)


def test_max_pairs_samples_whole_groups():
    data = prepare(DataSpec(source="squad-sample", max_pairs=200, eval_size=40))
    assert 200 <= data.counts["pairs"] < 260  # whole paragraphs: may overshoot by one group
    _assert_consistent(data)


def test_check_no_leak_catches_planted_leaks():
    data = prepare(DataSpec(source="medquad-sample", eval_size=50, max_train_pairs=100))
    check_no_leak(data)
    q, a = data.eval_pairs[0]
    for planted in [
        (q, a),
        (q, "an unrelated answer"),
        ("an unrelated question", a),
        (a, "answer text as question"),
    ]:
        leaky = PreparedData(**{**data.__dict__, "train": [*data.train, planted]})
        with pytest.raises(AssertionError, match="leak"):
            check_no_leak(leaky)


# ------------------------------------------------------------------ fingerprint


def test_fingerprint_changes_with_content_mapping_and_seed(tmp_path, squad_rows):
    path = _write(tmp_path / "s.jsonl", squad_rows)
    spec = DataSpec(source=str(path), answer_column="context")
    base = prepare(spec).fingerprint
    assert prepare(spec).fingerprint == base
    assert prepare(spec.model_copy(update={"name": "renamed"})).fingerprint == base  # a label is not content
    copy = _write(tmp_path / "copy.jsonl", squad_rows)
    assert prepare(spec.model_copy(update={"source": str(copy)})).fingerprint == base

    edited = [dict(r) for r in squad_rows]
    edited[5]["context"] += " Edited."
    changed = _write(tmp_path / "edited.jsonl", edited)
    assert prepare(spec.model_copy(update={"source": str(changed)})).fingerprint != base
    assert prepare(spec.model_copy(update={"answer_column": "title"})).fingerprint != base
    assert prepare(spec.model_copy(update={"seed": 43})).fingerprint != base
    assert prepare(spec.model_copy(update={"eval_size": 25})).fingerprint != base
    assert prepare(spec.model_copy(update={"max_train_pairs": 50})).fingerprint != base


def test_fingerprint_is_stable_across_processes():
    spec = DataSpec(source="medquad-sample", eval_size=50)
    code = "from embedtune.data import prepare; from embedtune.specs import DataSpec; print(prepare(DataSpec(source='medquad-sample', eval_size=50)).fingerprint)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "123"},
    )
    assert out.stdout.strip() == prepare(spec).fingerprint


def test_prepared_data_round_trips(tmp_path):
    data = prepare(DataSpec(source="squad-sample", eval_size=30, max_train_pairs=50))
    (tmp_path / "d.json").write_text(json.dumps(data.to_dict()))
    assert PreparedData.from_dict(json.loads((tmp_path / "d.json").read_text())) == data


def test_malformed_beir_folder_is_one_clear_line(tmp_path):
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    (beir / "queries.jsonl").write_text('{"_id": "1", "text": "a claim"}\n')
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n1\td1\t1\n")
    (beir / "corpus.jsonl").write_bytes('{"_id": "d1", "text": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(EmbedtuneError, match="not UTF-8"):
        load_pairs(DataSpec(source=str(beir)))
    (beir / "corpus.jsonl").write_text('{"text": "no id"}\n')
    with pytest.raises(EmbedtuneError, match="malformed"):
        load_pairs(DataSpec(source=str(beir)))
    (beir / "corpus.jsonl").write_text('{"_id": "d1", "title": "T", "text": "an abstract"}\n')
    with pytest.raises(EmbedtuneError, match="qrels/dev.tsv"):
        load_pairs(DataSpec(source=str(beir), beir_split="dev"))
    assert load_pairs(DataSpec(source=str(beir))) == ([("a claim", "T an abstract")], ["T an abstract"])
