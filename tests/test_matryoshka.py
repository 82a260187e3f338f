"""Matryoshka training (`train.matryoshka_dims`: MatryoshkaLoss around the spec's loss) and the final
stage's truncated rows (`final.eval.dims`, set from the sweep's dims): real model, real MedQuAD pairs
from the shipped sample, real LanceDB tables."""

from __future__ import annotations

import pytest
from specs import tiny_spec

from embedtune.errors import EmbedtuneError
from embedtune.records import TRUNCATED, ModelEntry
from embedtune.specs import EvalSpec, FinalSpec, TrainConfig, parse_spec

MODEL = "paraphrase-MiniLM-L3-v2"  # 384 dimensions
SMALL_DIM = 32


def test_matryoshka_dims_spelling_and_bad_values():
    spec = parse_spec(tiny_spec("m", train={"matryoshka_dims": [64, 384, 128]}))
    assert spec.train.matryoshka_dims == [384, 128, 64]  # one spelling: largest first
    for bad in ([], [0, 64], [64, 64]):
        with pytest.raises(EmbedtuneError, match="train.matryoshka_dims"):
            parse_spec(tiny_spec("m", train={"matryoshka_dims": bad}))
    with pytest.raises(EmbedtuneError, match="dims"):
        parse_spec(tiny_spec("m", final={"eval": {"dims": [0]}}))


def test_matryoshka_dims_are_part_of_a_trials_identity_only_when_set():
    from embedtune.sweep.identity import ConfigHasher, grid_configs

    plain = parse_spec(tiny_spec("m"))
    nested = parse_spec(tiny_spec("m", train={"matryoshka_dims": [384, 64]}))
    hashes = {}
    for name, spec in (("plain", plain), ("nested", nested)):
        settings = spec.train.model_dump()
        hasher = ConfigHasher({"medquad": "fp"}, settings, {"medquad": "neg"})
        hashes[name] = {c["config_hash"] for c in grid_configs(spec, hasher)}
        if name == "plain":  # a run dir from before the setting existed keeps its trials
            del settings["matryoshka_dims"]
            old = ConfigHasher({"medquad": "fp"}, settings, {"medquad": "neg"})
            assert {c["config_hash"] for c in grid_configs(spec, old)} == hashes["plain"]
    assert len(hashes["nested"]) == len(hashes["plain"]) and not hashes["nested"] & hashes["plain"]


def test_the_sweeps_dims_become_the_final_stages_unless_it_sets_its_own():
    from embedtune.final.stage import with_eval_cut

    assert with_eval_cut(FinalSpec(), 128, [384, 64]).eval.dims == [384, 64]
    assert with_eval_cut(FinalSpec(), 128).eval.dims is None
    own = FinalSpec(eval=EvalSpec(dims=[16]))
    assert with_eval_cut(own, 128, [384, 64]).eval.dims == [16]


def test_dimensions_beyond_the_model_are_one_clear_error():
    from sentence_transformers import SentenceTransformer

    from embedtune.models import resolve_model
    from embedtune.train import build_loss

    model = SentenceTransformer(str(resolve_model(MODEL)), device="cpu")
    config = TrainConfig(model=MODEL, matryoshka_dims=[512, 64])
    with pytest.raises(EmbedtuneError, match=r"train.matryoshka_dims \[512, 64\].*384 dimensions"):
        build_loss(config, model)
    loss = build_loss(config.model_copy(update={"matryoshka_dims": [384, 64]}), model)
    assert type(loss).__name__ == "MatryoshkaLoss" and list(loss.matryoshka_dims) == [384, 64]
    assert type(loss.loss).__name__ == "MultipleNegativesRankingLoss"


@pytest.mark.slow
def test_matryoshka_training_keeps_quality_in_a_small_slice_of_the_embedding(small_data, tmp_path):
    """The same data, seed and steps with and without `matryoshka_dims`: scored by the final stage's
    evaluation with `dims` (real LanceDB tables, one truncated row per model), the Matryoshka model
    loses much less when its embedding is cut to its first 32 dimensions, at about the same quality
    with all 384."""
    import pandas as pd

    from embedtune.evaluate import evaluate_models
    from embedtune.models import resolve_model
    from embedtune.train import train

    config = TrainConfig(
        model=MODEL, epochs=1, lr=1e-4, batch_size=32, max_seq_length=64, hard_negatives=False, seed=7
    )
    entries = [ModelEntry(label="base", path=str(resolve_model(MODEL)), base_model="base")]
    for name, dims in (("plain", None), ("nested", [384, 128, SMALL_DIM])):
        out = tmp_path / name
        result = train(
            config.model_copy(update={"matryoshka_dims": dims}), small_data, None, out, progress=False
        )
        assert result.loss == ("MatryoshkaLoss" if dims else "MultipleNegativesRankingLoss")
        entries.append(ModelEntry(label=name, path=str(out), base_model="base", kind="tuned"))
    spec = EvalSpec(query_types=["vector"], rerankers=["none"], max_seq_length=64, dims=[SMALL_DIM])
    board = evaluate_models(entries, small_data, spec, str(tmp_path / "lancedb"), progress=False)
    assert isinstance(board, pd.DataFrame) and len(board) == 6  # each model in full and at 32 dimensions
    cut = board[board["kind"] == TRUNCATED].set_index("model")
    assert sorted(cut.index) == [f"{m}@{SMALL_DIM}d" for m in ("base", "nested", "plain")]
    assert set(cut["dim"]) == {SMALL_DIM} and set(board[board["kind"] != TRUNCATED]["dim"]) == {384}
    full = board[board["kind"] != TRUNCATED].set_index("model")["mrr_at_10"]
    small = {m: cut.loc[f"{m}@{SMALL_DIM}d", "mrr_at_10"] for m in full.index}
    assert all(0 < small[m] < full[m] for m in full.index), (small, dict(full))  # a cut costs quality
    kept = {m: small[m] / full[m] for m in full.index}
    assert kept["nested"] > kept["plain"] + 0.05, kept  # what Matryoshka training buys
    assert small["nested"] > small["plain"] + 0.03, small
    assert full["nested"] > full["plain"] - 0.03, dict(full)  # at little cost in full
