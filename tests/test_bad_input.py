"""Bad input to `embedtune sweep`, one kind per test: each stops before any work with exit code 2
and one line that names the field, file or value and what would fix it, and writes nothing (no
run dir, no Ray temp dir, nothing beside the inputs). `embedtune train`'s own table of bad inputs
is in test_cli_train.py; spec validation details in test_config.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

GOOD = {
    "name": "bad-input",
    "datasets": [{"name": "medquad", "source": "medquad-sample", "max_pairs": 200, "eval_size": 30}],
    "models": ["paraphrase-MiniLM-L3-v2"],
    "search": {"epochs": [1], "batch_size": [16]},
    "ray": {"num_gpus": 0},
}


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _with_data(**dataset) -> dict:
    return {**GOOD, "datasets": [{"name": "d", **dataset}]}


def _case(name: str, d: Path) -> tuple[str | dict, str]:
    """(spec text or mapping, text the one error line must contain) for bad-input kind `name`."""
    pairs = [
        {"question": f"What is condition {i}?", "answer": f"Condition {i} is a disease of organ {i}."}
        for i in range(40)
    ]
    if name == "malformed YAML":
        return "name: [unclosed\nmodels: {\n", "not valid YAML"
    if name == "unknown key":
        return {**GOOD, "epochz": [1]}, "epochz: unknown key"
    if name == "wrong type":
        return {**GOOD, "resources": {"cpu": "two"}}, "resources.cpu: Input should be a valid number"
    if name == "empty search space":
        return {**GOOD, "search": {"epochs": []}}, "search.epochs"
    if name == "epochs < 1":
        return {**GOOD, "search": {"epochs": [0, 1]}}, "search.epochs"
    if name == "batch size < 2":
        return {**GOOD, "search": {"epochs": [1], "batch_size": [1]}}, "search.batch_size"
    if name == "unknown model":
        return {**GOOD, "models": ["all-MiniLM-L6-v3"]}, "unknown model 'all-MiniLM-L6-v3'"
    if name == "not a sentence-transformers model":
        folder = d / "some-folder"
        folder.mkdir()
        (folder / "weights.bin").write_bytes(os.urandom(64))
        return {**GOOD, "models": [str(folder)]}, "not a sentence-transformers model"
    if name == "missing column":
        rows = [{"q": p["question"], "a": p["answer"]} for p in pairs]
        return _with_data(
            source=_jsonl(d / "qa.jsonl", rows), eval_size=5
        ), "column 'question', 'answer' not found"
    if name == "empty dataset":
        (d / "empty.jsonl").write_text("")
        return _with_data(source=str(d / "empty.jsonl")), "has no rows"
    if name == "all-duplicate dataset":
        return _with_data(
            source=_jsonl(d / "dups.jsonl", [pairs[0]] * 50), eval_size=5
        ), "all 50 rows are one (question, answer) pair"
    if name == "non-UTF-8 file":
        (d / "latin1.csv").write_bytes("question,answer\ncaf\xe9 au lait?,a drink\n".encode("latin-1"))
        return _with_data(source=str(d / "latin1.csv")), "not UTF-8"
    if name == "resources beyond the cluster":
        return {**GOOD, "resources": {"gpu": 1}}, "resources.gpu: 1 per trial"
    if name == "k larger than the corpus":
        spec = {
            **_with_data(source=_jsonl(d / "few.jsonl", pairs), eval_size=5),
            "final": {"eval": {"ks": [1, 100]}},
        }
        return spec, "final.eval.ks: k=100 is larger than the corpus of d (40 documents)"
    raise KeyError(name)


KINDS = [
    "malformed YAML",
    "unknown key",
    "wrong type",
    "empty search space",
    "epochs < 1",
    "batch size < 2",
    "unknown model",
    "not a sentence-transformers model",
    "missing column",
    "empty dataset",
    "all-duplicate dataset",
    "non-UTF-8 file",
    "resources beyond the cluster",
    "k larger than the corpus",
]


def _ray_dirs() -> set[Path]:
    return {*Path("/tmp").glob("etray-*"), *Path("/tmp").glob("embedtune-rayhome-*")}


@pytest.mark.parametrize("kind", KINDS)
def test_bad_sweep_input_is_refused_in_one_line(kind: str, tmp_path: Path, capsys) -> None:
    from embedtune.cli import main

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    spec, expected = _case(kind, inputs)
    spec_file = inputs / "spec.yaml"
    spec_file.write_text(spec if isinstance(spec, str) else yaml.safe_dump(spec))
    before_inputs = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    before_ray = _ray_dirs()
    run_dir = tmp_path / "run"

    assert main(["sweep", str(spec_file), "--run-dir", str(run_dir)]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("embedtune: error: ") and expected in lines[0], lines[0]
    assert "Traceback" not in out + err
    assert not run_dir.exists()  # nothing written
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before_inputs
    assert _ray_dirs() <= before_ray  # no Ray was started
