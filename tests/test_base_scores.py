"""Base models are scored once per (model, data, triplets, truncation), across runs: a second
sweep on the same data into a new run dir reuses the scores kept in embedtune's home."""

from __future__ import annotations

from pathlib import Path

import pytest

import embedtune.models
from embedtune.rundir import RunDir
from embedtune.specs import parse_spec
from embedtune.sweep.inputs import base_metrics, base_scores_cache


def _spec(max_seq_length: int):
    return parse_spec(
        {
            "name": "base-cache",
            "datasets": [{"source": "medquad-sample"}],
            "models": ["paraphrase-MiniLM-L3-v2"],
            "train": {"max_seq_length": max_seq_length},
        }
    )


def test_base_scores_are_kept_across_runs_by_what_decides_them(
    small_data, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("EMBEDTUNE_HOME", str(tmp_path / "home"))
    datasets = {small_data.label: small_data}
    first = base_metrics(_spec(64), datasets, {}, RunDir(tmp_path / "run1"))
    scores = first[next(iter(first))]
    assert 0.2 < scores["ir_mrr_at_10"] <= 1 and 0 < scores["ir_accuracy_at_1"] <= scores["ir_accuracy_at_10"]

    loads: list[str] = []
    real_load = embedtune.models.load_model

    def counted(path, *a, **k):
        loads.append(str(path))
        return real_load(path, *a, **k)

    monkeypatch.setattr(embedtune.models, "load_model", counted)
    # a new run dir on the same data and settings: the kept scores, no model loaded
    assert base_metrics(_spec(64), datasets, {}, RunDir(tmp_path / "run2")) == first and loads == []

    # another truncation scores again (and differently: 16 tokens cut most answers short)
    shorter = base_metrics(_spec(16), datasets, {}, RunDir(tmp_path / "run3"))
    assert len(loads) == 1 and shorter != first

    # a damaged kept file is scored again and rewritten, never read as scores
    cache = base_scores_cache("paraphrase-MiniLM-L3-v2", small_data, None, 64)
    assert cache.exists()
    cache.write_text('{"ir_mrr_at_10": ')
    assert base_metrics(_spec(64), datasets, {}, RunDir(tmp_path / "run4")) == first and len(loads) == 2
    assert base_metrics(_spec(64), datasets, {}, RunDir(tmp_path / "run5")) == first and len(loads) == 2


@pytest.mark.parametrize("content", ["[]", "{}", '{"ir_mrr_at_10": "high"}'])
def test_a_kept_file_that_is_not_scores_is_not_used(content: str, tmp_path: Path, monkeypatch) -> None:
    from embedtune.sweep.inputs import _read_cached

    path = tmp_path / "kept.json"
    path.write_text(content)
    assert _read_cached(path) == {}
    assert _read_cached(tmp_path / "missing.json") == {}
