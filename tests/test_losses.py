"""The training losses beyond MNRL: GIST (sentence-transformers' GISTEmbedLoss) and its cached
form, guided by the frozen base model. Real model (paraphrase-MiniLM-L3-v2), real MedQuAD pairs
from the shipped sample through the project's loaders."""

from __future__ import annotations

import json
import math
from collections import defaultdict

import pytest
from specs import TINY_DATA, tiny_spec

from embedtune.data import load_pairs, prepare
from embedtune.errors import EmbedtuneError
from embedtune.specs import DataSpec, TrainConfig, parse_spec
from embedtune.train import build_loss, load_guide, train

MODEL = "paraphrase-MiniLM-L3-v2"
TINY = TrainConfig(model=MODEL, max_seq_length=48, hard_negatives=False, batch_size=16, epochs=1, lr=1e-4)


@pytest.fixture(scope="module")
def model():
    from sentence_transformers import SentenceTransformer

    from embedtune.models import resolve_model, truncate

    m = SentenceTransformer(str(resolve_model(MODEL)), device="cpu")
    truncate(m, TINY.max_seq_length)
    return m


@pytest.fixture(scope="module")
def duplicate_batch():
    """(clean, with_dup, k): 7 real pairs whose answers are unique, plus row k, a question whose
    answer another question of the sample shares word for word (MedQuAD's "Is X inherited ?"
    questions share one answer); `with_dup` adds that other question with the same answer."""
    pairs, _ = load_pairs(DataSpec(source="medquad-sample"))
    questions = defaultdict(list)
    for q, a in pairs:
        questions[a].append(q)
    shared = next(a for a, qs in questions.items() if len(qs) > 2)
    first, second = questions[shared][:2]
    clean = [(q, a) for q, a in pairs if len(questions[a]) == 1][:7] + [(first, shared)]
    return clean, [*clean, (second, shared)], len(clean) - 1


def _features(model, rows):
    return [model.preprocess([q for q, _ in rows]), model.preprocess([a for _, a in rows])]


def gist_row_losses(config, model, rows, guide):
    """GIST's loss of each anchor row (its own cross-entropy, not the batch mean)."""
    import torch

    loss = build_loss(config.model_copy(update={"loss": "gist"}), model, guide)
    loss.cross_entropy_loss = torch.nn.CrossEntropyLoss(reduction="none")
    with torch.no_grad():
        return loss(_features(model, rows), None)


def mnrl_row_loss(model, rows, k):
    """MNRL's loss of anchor row k: its question against every answer of the batch (MNRL's default
    direction is query → documents only, so this is exactly row k's term of the batch loss)."""
    import torch

    loss = build_loss(TINY, model)
    assert type(loss).__name__ == "MultipleNegativesRankingLoss"
    with torch.no_grad():
        queries, docs = (model(f)["sentence_embedding"] for f in _features(model, rows))
        order = [k] + [i for i in range(len(rows)) if i != k]  # its positive first
        return loss.compute_loss_from_embeddings([queries[k : k + 1], docs[order]], None).item()


def test_gist_ignores_an_in_batch_duplicate_that_mnrl_counts_as_a_negative(model, duplicate_batch):
    clean, with_dup, k = duplicate_batch
    assert clean[k][1] == with_dup[-1][1] and clean[k][0] != with_dup[-1][0]
    guide = load_guide(TINY, "cpu")
    gist_clean = gist_row_losses(TINY, model, clean, guide)[k].item()
    gist_dup = gist_row_losses(TINY, model, with_dup, guide)[k].item()
    assert gist_clean > 0.01  # a real loss, not one masked away whole
    assert abs(gist_dup - gist_clean) < 1e-4, (gist_clean, gist_dup)  # the duplicate is masked

    # MNRL: the duplicate answer scores exactly as the positive does, one more term of the same size
    # in the softmax: the row's loss rises by log(1 + e^-loss)
    mnrl_clean, mnrl_dup = mnrl_row_loss(model, clean, k), mnrl_row_loss(model, with_dup, k)
    assert mnrl_dup - mnrl_clean > 0.05
    assert abs((mnrl_dup - mnrl_clean) - math.log1p(math.exp(-mnrl_clean))) < 1e-3, (mnrl_clean, mnrl_dup)


def test_cached_gist_is_gist_in_chunks(model, duplicate_batch):
    """cached_gist computes the same loss in chunks of mini_batch_size rows."""
    import torch

    _, rows, _ = duplicate_batch
    guide = load_guide(TINY, "cpu")
    whole = build_loss(TINY.model_copy(update={"loss": "gist"}), model, guide)
    cached = build_loss(TINY.model_copy(update={"loss": "cached_gist", "mini_batch_size": 3}), model, guide)
    assert type(cached).__name__ == "CachedGISTEmbedLoss" and cached.mini_batch_size == 3
    assert (cached.margin_strategy, cached.margin, cached.temperature) == ("relative", 0.05, 0.01)
    with torch.no_grad():
        expected = whole(_features(model, rows), None).item()
    got = cached(_features(model, rows), None).item()
    assert abs(got - expected) < 1e-4, (got, expected)


def test_guide_is_the_frozen_base_model(model):
    import torch

    guide = load_guide(TINY, "cpu")
    assert not guide.training and not any(p.requires_grad for p in guide.parameters())
    assert guide.max_seq_length == TINY.max_seq_length
    for (name, p), (_, q) in zip(model.named_parameters(), guide.named_parameters(), strict=True):
        assert torch.equal(p, q), name  # the base model's weights


@pytest.mark.slow
def test_gist_fine_tune_changes_the_model_and_not_its_guide(tmp_path, monkeypatch):
    import torch
    from sentence_transformers import SentenceTransformer

    import embedtune.train as train_module

    guides = []

    def keep(config, device):  # the real loader; the test keeps what it loaded, to look at after
        guides.append(load_guide(config, device))
        return guides[-1]

    monkeypatch.setattr(train_module, "load_guide", keep)
    data = prepare(DataSpec(**TINY_DATA))
    assert len(data.train) == 48
    out = tmp_path / "model"
    result = train(TINY.model_copy(update={"loss": "gist"}), data, None, out, progress=False)
    assert result.loss == "GISTEmbedLoss" and [h.epoch for h in result.history] == [0, 1]
    assert math.isfinite(result.history[1].metrics["train_loss"])
    assert json.loads((out / "metrics.json").read_text())["loss"] == "GISTEmbedLoss"

    (guide,) = guides
    assert not guide.training and not any(p.requires_grad for p in guide.parameters())
    base = load_guide(TINY, "cpu")
    for (name, p), (_, q) in zip(guide.named_parameters(), base.named_parameters(), strict=True):
        assert torch.equal(p.cpu(), q), f"the guide was trained: {name}"  # (it ran on the training device)
    texts = [q for q, _ in data.train[:8]]
    tuned = SentenceTransformer(str(out), device="cpu").encode(texts, convert_to_tensor=True)
    before = base.encode(texts, convert_to_tensor=True)
    assert (tuned - before).abs().max().item() > 1e-3  # the model itself learned


# ---------------------------------------------------------------- the loss as a search axis


def test_search_loss_is_an_axis_whose_mnrl_configs_keep_their_identity():
    """search.loss [mnrl, gist] doubles the grid; its mnrl configs hash as the same configs of a
    sweep without the axis (train.loss mnrl), so a run dir grown by the axis reruns none of them."""
    from embedtune.sweep.identity import ConfigHasher, grid_configs, param_space, trial_configs

    plain = parse_spec(tiny_spec("losses", search={"epochs": [1, 2], "lr": [5e-5]}))
    both = parse_spec(tiny_spec("losses", search={"epochs": [1, 2], "lr": [5e-5], "loss": ["mnrl", "gist"]}))
    assert both.losses == ["mnrl", "gist"] and plain.losses == ["mnrl"]
    hasher = ConfigHasher({"medquad": "fp"}, both.train.model_dump(), {"medquad": "neg"})
    before, after = grid_configs(plain, hasher), grid_configs(both, hasher)
    assert len(after) == 2 * len(before) and {c.get("loss") for c in after} == {"mnrl", "gist"}
    mnrl = {c["config_hash"] for c in after if c["loss"] == "mnrl"}
    assert mnrl == {c["config_hash"] for c in before}
    gist = {c["config_hash"] for c in after if c["loss"] == "gist"}
    assert len(gist) == len(before) and not gist & mnrl
    # with train.loss gist (no axis) a config hashes as its gist twin of the axis
    as_setting = ConfigHasher(
        {"medquad": "fp"}, {**both.train.model_dump(), "loss": "gist"}, {"medquad": "neg"}
    )
    assert {c["config_hash"] for c in grid_configs(plain, as_setting)} == gist
    branches = trial_configs(both, hasher)  # branch mode: one run per (model, loss), checkpointed at 1 and 2
    assert len(branches) == 2 * 2 and {(c["model"], c["loss"]) for c in branches} == {
        (m, loss) for m in both.models for loss in ("mnrl", "gist")
    }
    sampled = tiny_spec(
        "losses", search={"mode": "random", "num_samples": 2, "loss": ["mnrl", "cached_gist"]}
    )
    assert type(param_space(parse_spec(sampled))["loss"]).__name__ == "Categorical"
    assert "loss" not in param_space(plain)


def test_search_loss_bad_input_is_one_clear_line():
    with pytest.raises(EmbedtuneError, match="search.loss"):
        parse_spec(tiny_spec("x", search={"loss": ["mnrl", "mnrl"]}))
    with pytest.raises(EmbedtuneError, match="search.loss.0"):
        parse_spec(tiny_spec("x", search={"loss": ["gistt"]}))
    with pytest.raises(
        EmbedtuneError, match="train.loss .cached_mnrl. and search.loss .mnrl, gist. are both set"
    ):
        parse_spec(tiny_spec("x", search={"loss": ["mnrl", "gist"]}, train={"loss": "cached_mnrl"}))
    with pytest.raises(EmbedtuneError, match="train.loss"):
        parse_spec(tiny_spec("x", train={"loss": "gist_embed"}))
    # a stored spec.json spells out train.loss: it reads back
    spec = parse_spec(tiny_spec("x", search={"loss": ["mnrl", "gist"]}))
    assert parse_spec(spec.model_dump(mode="json")).losses == ["mnrl", "gist"]


@pytest.mark.slow
def test_a_sweep_over_search_loss_trains_each_loss(tmp_path):
    """A real (Ray Tune) sweep with search.loss [mnrl, gist] and nothing else searched: two trials,
    each recorded with its loss, and their models differ: the trial trained with the loss its
    config names (the same seed and data with one loss would give the same weights)."""
    from sentence_transformers import SentenceTransformer

    from embedtune.sweep import run_sweep
    from embedtune.sweep.results import results_table

    raw = tiny_spec(
        "losses",
        models=[MODEL],
        mlflow={"log_models": False},
        search={"epochs": [1], "batch_size": [16], "lr": [1e-4], "loss": ["mnrl", "gist"]},
        train={"max_seq_length": 48, "hard_negatives": False},
    )
    result = run_sweep(parse_spec(raw), tmp_path / "run", final=False)
    assert result.launched == 2 and [t.status for t in result.trials] == ["FINISHED"] * 2
    by_loss = {t.loss: t for t in result.trials}
    assert sorted(by_loss) == ["gist", "mnrl"]
    assert by_loss["gist"].config_hash != by_loss["mnrl"].config_hash
    stored = json.loads((tmp_path / "run" / "trials.json").read_text())
    assert sorted(t["loss"] for t in stored) == ["gist", "mnrl"]
    texts = ["What causes Tay-Sachs disease ?", "Is fish-eye disease inherited ?", "What is glaucoma ?"]
    vectors = {
        loss: SentenceTransformer(t.best_checkpoint, device="cpu").encode(texts, convert_to_tensor=True)
        for loss, t in by_loss.items()
    }
    assert (vectors["gist"] - vectors["mnrl"]).abs().max().item() > 1e-3
    assert "loss" in [c.header for c in results_table(result.trials, "ir_mrr_at_10").columns]


def test_memory_refusal_names_the_cached_form_of_the_loss():
    from embedtune.memory import ProbeKey, refusal

    def line(loss):
        key = ProbeKey(MODEL, 64, 48, loss, 32, False, False, False)
        return refusal(key, 30 * 2**30, 24 * 2**30, 1.0)

    assert "train.loss: cached_gist with train.mini_batch_size" in line("gist")
    assert "train.loss: cached_mnrl with train.mini_batch_size" in line("mnrl")
    assert "train.mini_batch_size below 32" in line("cached_gist") and "(mini_batch_size 32)" in line(
        "cached_gist"
    )
