"""`embedtune init DATA`: a commented sweep spec for a user's data, its columns found by name, its
sizes taken from the data as the loader reads it, loaded back by `load_spec`; bad input is one line
and nothing written. One written spec is run for real with `embedtune sweep`."""

from __future__ import annotations

import csv
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from paths import shared_data

from embedtune import env
from embedtune.cli import main
from embedtune.columns import guess_columns
from embedtune.data import load_pairs, make_spec, prepare
from embedtune.specs import Distribution, load_spec

DEFAULT_MODELS = ["all-MiniLM-L6-v2", "paraphrase-MiniLM-L3-v2"]


def _medquad_rows(n: int) -> list[dict]:
    path = Path(env.__file__).parent / "samples" / "medquad_sample.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line, _ in zip(fh, range(n), strict=False)]


def _csv(path: Path, question: str, answer: str, n: int = 300) -> Path:
    """Real MedQuAD pairs under the given column names, between an id and a url column."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        out = csv.writer(fh)
        out.writerow(["ID", question, answer, "url"])
        for i, row in enumerate(_medquad_rows(n)):
            out.writerow([i, row["question"], row["answer"], row["url"]])
    return path


def _expected_eval(questions: int) -> int:
    """The rule the spec's comment states: 20% of the questions, at least 100 where at most half
    of them, at most 1000."""
    want = round(0.2 * questions)
    if want < 100:
        want = min(100, questions // 2)
    return min(want, 1000)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("embedtune: error: ")
    return err[0]


def _check_sized(out: Path, source_spec: dict, models: list[str] = DEFAULT_MODELS) -> tuple:
    """The written spec loads, its numbers are those of the data (loaded independently here) and
    the loader takes its dataset entry as written."""
    spec = load_spec(out)
    (ds,) = spec.datasets
    pairs, _ = load_pairs(make_spec(source_spec))
    questions = len({q for q, _ in pairs})
    assert ds.max_pairs is None  # small data: no sampling
    assert ds.eval_size == _expected_eval(questions)
    data = prepare(ds)  # the sweep's own split of the spec as written
    assert data.counts["pairs"] == len(pairs)
    assert data.counts["eval_questions"] >= ds.eval_size
    # every training pair left after the hold-out fits the hour: none dropped, none invented
    held = prepare(ds.model_copy(update={"max_train_pairs": None}))
    assert ds.max_train_pairs == held.counts["train_pairs"] == data.counts["train_pairs"]
    assert spec.models == models and spec.search.mode == "auto"
    assert 5 <= spec.search.budget.minutes <= 50 and spec.search.budget.trial_epochs is None
    assert spec.losses == ["mnrl", "gist"] and isinstance(spec.search.warmup_ratio, Distribution)
    lr = spec.search.lr
    assert isinstance(lr, Distribution) and (lr.distribution, lr.low, lr.high) == ("loguniform", 1e-5, 1e-4)
    assert spec.search.epochs == [1, 2, 3] and spec.search.branch
    text = out.read_text()
    assert f"# {len(pairs):,} usable (question, answer) pairs" in text
    assert "2-core CPU machine" in text and f"20% of the {questions:,} distinct questions" in text
    return spec, data


@pytest.mark.parametrize("sample", ["medquad-sample", "squad-sample", "scifact-sample"])
def test_init_on_each_shipped_sample(sample, tmp_path, capsys):
    out = tmp_path / "spec.yaml"
    assert main(["init", sample, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and f"embedtune sweep {out}" in printed
    spec, _ = _check_sized(out, {"source": sample})
    ds = spec.datasets[0]
    assert ds.source == sample and spec.name == sample and ds.label == sample
    if sample == "scifact-sample":  # BEIR: no columns to map; do no harm checked on another sample
        assert "BEIR folder" in out.read_text()
        assert [o.source for o in spec.final.ood] == ["medquad-sample"]
    else:
        assert (ds.question_column, ds.answer_column) == ("question", "answer")
        assert [o.source for o in spec.final.ood] == ["scifact-sample"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]  # no temp file left


def test_init_odd_column_names_one_error_listing_them(tmp_path, capsys):
    data = _csv(tmp_path / "fragen.csv", "Frage", "Antwort Text")
    out = tmp_path / "new" / "fragen.yaml"
    assert main(["init", str(data), "--out", str(out)]) == 2
    line = _one_error_line(capsys)
    assert "cannot tell the question column" in line
    assert "columns found: 'ID', 'Frage', 'Antwort Text', 'url'" in line
    assert "--question-column COL" in line and "question_column" in line
    assert not (tmp_path / "new").exists()  # nothing written, no folder made
    # Told the question column, the answer column is found by a word of its name.
    assert main(["init", str(data), "--out", str(out), "--question-column", "Frage"]) == 0
    spec, _ = _check_sized(
        out, {"source": str(data), "question_column": "Frage", "answer_column": "Antwort Text"}
    )
    assert (spec.datasets[0].question_column, spec.datasets[0].answer_column) == ("Frage", "Antwort Text")


def test_init_odd_but_telling_column_names(tmp_path, monkeypatch, capsys):
    """`User Query` / `Best Answer`: found by name. Default out: sweeps/<name>.yaml under the
    current folder, with the data path relative to the spec (load_spec resolves it there)."""
    _csv(tmp_path / "faq.csv", "User Query", "Best Answer")
    monkeypatch.chdir(tmp_path)
    assert main(["init", "faq.csv"]) == 0
    assert "columns: question 'User Query', answer 'Best Answer'" in capsys.readouterr().out
    out = tmp_path / "sweeps" / "faq.yaml"
    raw = yaml.safe_load(out.read_text())
    assert raw["name"] == "faq" and raw["datasets"][0]["source"] == "../faq.csv"
    spec, data = _check_sized(
        out, {"source": "faq.csv", "question_column": "User Query", "answer_column": "Best Answer"}
    )
    assert spec.datasets[0].source == str(tmp_path / "faq.csv")
    assert data.counts["pairs"] == 300 and spec.datasets[0].eval_size == 100  # 20% of 300 raised to 100


def test_init_refuses_to_overwrite_without_force(tmp_path, capsys):
    out = tmp_path / "mine.yaml"
    out.write_text("name: keep-me\n")
    assert main(["init", "medquad-sample", "--out", str(out)]) == 2
    line = _one_error_line(capsys)
    assert str(out) in line and "--force" in line
    assert out.read_text() == "name: keep-me\n"
    assert main(["init", "medquad-sample", "--out", str(out), "--force", "--name", "mq"]) == 0
    assert load_spec(out).name == "mq"


def _bad_data(d: Path, kind: str) -> Path:
    if kind == "unreadable":
        (d / "junk.parquet").write_bytes(os.urandom(256))
        return d / "junk.parquet"
    if kind == "empty":
        (d / "empty.jsonl").write_text("")
        return d / "empty.jsonl"
    return d / "nope.csv"


@pytest.mark.parametrize(
    ("kind", "needle"),
    [("missing", "data file not found: "), ("unreadable", "cannot read"), ("empty", "has no rows")],
)
def test_init_bad_data_one_line_nothing_written(kind, needle, tmp_path, capsys):
    data = _bad_data(tmp_path, kind)
    out = tmp_path / "out" / "spec.yaml"
    assert main(["init", str(data), "--out", str(out)]) == 2
    line = _one_error_line(capsys)
    assert needle in line and str(data) in line
    assert not (tmp_path / "out").exists()


def test_init_bad_arguments_one_line(tmp_path, capsys):
    assert main(["init", "medquad-sample", "--name", "bad name", "--out", str(tmp_path / "x.yaml")]) == 2
    assert "--name 'bad name'" in _one_error_line(capsys)
    assert main(["init", "medquad-sample", "--models", "a", "a", "--out", str(tmp_path / "x.yaml")]) == 2
    assert "given twice" in _one_error_line(capsys)
    assert main(["init", "medquad-sample", "--out", str(tmp_path)]) == 2
    assert "is a folder" in _one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_init_models_override_sizes_the_search(tmp_path):
    out = tmp_path / "one.yaml"
    assert main(["init", "medquad-sample", "--models", "paraphrase-MiniLM-L3-v2", "--out", str(out)]) == 0
    spec = load_spec(out)
    assert spec.models == ["paraphrase-MiniLM-L3-v2"] and spec.mining.model == "paraphrase-MiniLM-L3-v2"
    assert "the time of ~3 whole trials (3 per model)" in out.read_text()
    assert main(["init", "medquad-sample", "--out", str(tmp_path / "two.yaml")]) == 0
    assert "the time of ~6 whole trials (3 per model)" in (tmp_path / "two.yaml").read_text()
    assert spec.search.budget.minutes <= load_spec(tmp_path / "two.yaml").search.budget.minutes


def test_init_large_data_caps_corpus_eval_and_training(tmp_path):
    """All of SQuAD v1.1 train (87,599 questions over ~19k paragraphs): max_pairs keeps the eval
    corpus near 2,000 paragraphs, eval_size stops at 1,000 and the training pairs at what fits the
    hour (fewer than the split leaves)."""
    data = shared_data("squad_v1.1/squad_train_pairs.jsonl.gz")
    out = tmp_path / "squad.yaml"
    assert main(["init", str(data), "--out", str(out)]) == 0
    ds = load_spec(out).datasets[0]
    assert ds.source == str(data.resolve())  # no folder but `/` in common with tmp_path: absolute
    assert ds.max_pairs is not None and 2 <= ds.max_pairs < 87_599
    assert ds.eval_size == 1000
    full = prepare(ds.model_copy(update={"max_train_pairs": None}))
    assert 1900 <= full.counts["corpus"] <= 2100
    assert ds.max_train_pairs % 32 == 0 and 64 <= ds.max_train_pairs < full.counts["train_pairs"]
    text = out.read_text()
    assert f"{ds.max_train_pairs:,} of the {full.counts['train_pairs']:,} left" in text
    usable, _ = load_pairs(make_spec({"source": str(data)}))
    assert f"# {len(usable):,} usable (question, answer) pairs" in text
    assert f"the spec keeps {full.counts['pairs']:,} of them (max_pairs)" in text


def test_init_hf_saved_dataset_and_parquet(tmp_path):
    """Column names are read from a saved Hugging Face dataset and from a Parquet file too; a
    non-text column (SQuAD's `answers` dict) is never mapped."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {"query": r["question"], "answers": {"text": ["x"]}, "context": r["answer"]}
        for r in _medquad_rows(200)
    ]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    assert main(["init", f"hf:{tmp_path / 'saved'}", "--out", str(tmp_path / "hf.yaml"), "--name", "hf"]) == 0
    ds = load_spec(tmp_path / "hf.yaml").datasets[0]
    assert (ds.question_column, ds.answer_column) == ("query", "context")
    assert ds.source == f"hf:{tmp_path / 'saved'}" and prepare(ds).counts["pairs"] == 200

    table = pa.Table.from_pylist(
        [{"anchor": r["query"], "positive": r["context"], "row_id": 1} for r in rows]
    )
    pq.write_table(table, tmp_path / "pairs.parquet")
    assert main(["init", str(tmp_path / "pairs.parquet"), "--out", str(tmp_path / "pq.yaml")]) == 0
    ds = load_spec(tmp_path / "pq.yaml").datasets[0]
    assert (ds.question_column, ds.answer_column) == ("anchor", "positive")


@pytest.mark.parametrize(
    ("columns", "expected"),
    [
        (["question_id", "question", "answer"], ("question", "answer")),
        (["qid", "questionText", "answerText"], ("questionText", "answerText")),
        (["id", "title", "text"], ("title", "text")),
        (["q", "a"], ("q", "a")),
        (["query_id", "query", "doc_id", "document"], ("query", "document")),
        (["Frage", "Antwort"], (None, None)),
        (["text"], (None, "text")),
    ],
)
def test_guess_columns(columns, expected):
    rows = [{c: f"value of {c}" for c in columns}]
    guess = guess_columns(rows)
    assert (guess.question, guess.answer) == expected and guess.columns == columns


@pytest.mark.slow
def test_init_spec_runs_as_a_sweep(tmp_path):
    """The spec `init` writes for a CSV of its own, made tiny by a small edit (one model, one
    auto-searched epoch, 32 training pairs, no second seed, no final stage), runs with `embedtune sweep`."""
    data = _csv(tmp_path / "faq.csv", "User Query", "Best Answer", n=240)
    spec_file = tmp_path / "faq.yaml"
    cli = [sys.executable, "-m", "embedtune.cli"]
    made = subprocess.run(
        [*cli, "init", str(data), "--out", str(spec_file)], capture_output=True, text=True, timeout=120
    )
    assert made.returncode == 0, made.stderr
    raw = yaml.safe_load(spec_file.read_text())
    assert raw["search"]["mode"] == "auto" and raw["datasets"][0]["question_column"] == "User Query"
    raw["models"] = ["paraphrase-MiniLM-L3-v2"]
    raw["mining"]["model"] = "paraphrase-MiniLM-L3-v2"
    assert raw["search"]["second_seed"] is True  # tested in test_second_seed.py; off here: one trial
    raw["search"].update(budget={"trial_epochs": 1}, epochs=[1], loss=["mnrl"], second_seed=False)
    raw["datasets"][0].update(max_train_pairs=32, eval_size=40)
    raw["train"]["max_seq_length"] = 64
    raw["mlflow"]["log_models"] = False
    raw["final"] = {"enabled": False}
    spec_file.write_text(yaml.safe_dump(raw))
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [*cli, "--offline", "sweep", str(spec_file), "--run-dir", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (trial,) = json.loads((run_dir / "trials.json").read_text())
    assert trial["status"] == "FINISHED" and trial["epochs_done"] == 1
    assert trial["model"] == "paraphrase-MiniLM-L3-v2" and 1e-5 <= trial["lr"] <= 1e-4  # drawn by Optuna
    assert (run_dir / "mlflow.db").exists()
