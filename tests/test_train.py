"""One training run: a real fine-tune of all-MiniLM-L6-v2 on real MedQuAD pairs (slow), and the
small pieces around it (config validation, metric names, best-epoch choice)."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from embedtune.errors import EmbedtuneError
from embedtune.specs import TrainConfig
from embedtune.sweep.trainable import cpu_threads_for
from embedtune.train import EpochMetrics, TrainResult, clean_metric_name, train

METRICS = {"ir_recall_at_10", "ir_accuracy_at_1", "ir_mrr_at_10", "ir_ndcg_at_10", "triplet_accuracy"}


def test_config_rejects_bad_hyperparameters():
    for bad in ({"epochs": 0}, {"batch_size": 1}, {"lr": 0}, {"max_seq_length": 4}, {"unknown": 1}):
        with pytest.raises(ValidationError):
            TrainConfig(**bad)


def test_metric_names_are_mlflow_safe():
    assert clean_metric_name("eval_ir_cosine_recall@10") == "ir_recall_at_10"
    assert clean_metric_name("eval_triplet_cosine_accuracy") == "triplet_accuracy"
    assert clean_metric_name("ir_cosine_mrr@10") == "ir_mrr_at_10"


def test_best_is_the_best_trained_epoch_not_the_last_nor_the_base():
    history = [
        EpochMetrics(0, {"ir_recall_at_10": 0.9}, 1.0),
        EpochMetrics(1, {"ir_recall_at_10": 0.7}, 1.0),
        EpochMetrics(2, {"ir_recall_at_10": 0.8}, 1.0),
        EpochMetrics(3, {"ir_recall_at_10": 0.6}, 1.0),
    ]
    assert TrainResult(None, history).best("ir_recall_at_10").epoch == 2
    assert TrainResult(None, history[:1]).best().epoch == 0
    assert cpu_threads_for(0.5) == 1 and cpu_threads_for(4) == 4


def test_hard_negatives_without_triplets_fails_at_once(small_data, tmp_path):
    with pytest.raises(EmbedtuneError, match="no triplets were given"):
        train(TrainConfig(), small_data, None, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_one_epoch_fine_tune_on_medquad(small_data, small_triplets, tmp_path):
    from sentence_transformers import SentenceTransformer

    seen: list[tuple[int, dict, object]] = []
    out = tmp_path / "model"
    config = TrainConfig(epochs=1, batch_size=32, max_seq_length=64, lr=5e-5, seed=7)
    result = train(
        config,
        small_data,
        small_triplets,
        out,
        on_epoch=lambda e, m, c: seen.append((e, m, c)),
        progress=False,
    )

    assert [h.epoch for h in result.history] == [0, 1]
    base, tuned = (h.metrics for h in result.history)
    assert METRICS <= base.keys() and METRICS | {"train_loss"} <= tuned.keys()
    assert tuned["ir_recall_at_10"] >= base["ir_recall_at_10"], (base, tuned)
    assert 0 < tuned["train_loss"] < 10
    assert [(e, c) for e, _, c in seen] == [(0, None), (1, None)]
    assert result.best().epoch == 1 and result.model_dir == out

    saved = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in saved["history"]] == [0, 1]
    assert saved["loss"] == "MultipleNegativesRankingLoss" and saved["gradient_checkpointing"] is False
    assert saved["history"][1]["metrics"]["ir_recall_at_10"] == tuned["ir_recall_at_10"]
    assert not list(tmp_path.glob(".*partial*"))

    model = SentenceTransformer(str(out), device="cpu")
    assert model.max_seq_length == 64
    emb = model.encode(
        ["How is asthma treated?", "What are the treatments for asthma ?", "SQuAD is a dataset."]
    )
    assert emb.shape == (3, 384)
    assert float(emb[0] @ emb[1]) > float(emb[0] @ emb[2])


@pytest.mark.slow
def test_plain_pairs_with_checkpoints_and_no_final_model(small_data, tmp_path):
    """The sweep's path: no hard negatives, a checkpoint per epoch handed to the callback, no out_dir."""
    from sentence_transformers import SentenceTransformer

    from embedtune.data import prepare
    from embedtune.specs import DataSpec

    tiny = {"max_pairs": 60, "eval_size": 10, "max_train_pairs": 32, "corpus_distractors": False}
    data = prepare(DataSpec(source="squad-sample", **tiny))
    loaded: list[int] = []

    def on_epoch(epoch, metrics, ckpt):
        assert METRICS - {"triplet_accuracy"} <= metrics.keys()
        if epoch > 0:
            assert ckpt is not None and (ckpt / "model" / "modules.json").exists()
            SentenceTransformer(str(ckpt / "model"), device="cpu")
            loaded.append(epoch)

    config = TrainConfig(epochs=2, batch_size=16, max_seq_length=32, hard_negatives=False)
    result = train(
        config,
        data,
        None,
        None,
        on_epoch=on_epoch,
        checkpoint_every_epoch=True,
        progress=False,
        evaluate_base=False,
    )
    assert result.model_dir is None
    assert [h.epoch for h in result.history] == [1, 2] and loaded == [1, 2]
    assert "triplet_accuracy" not in result.history[0].metrics


@pytest.mark.slow
def test_a_diverged_loss_fails_the_run_loudly(monkeypatch, tmp_path):
    """A loss that goes NaN ends the run with one clear error (a sweep trial is then FAILED), instead
    of "finishing" with a broken model. The loss is forced to NaN: a unit test of our check."""
    import torch
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    from embedtune.data import prepare
    from embedtune.specs import DataSpec

    real_forward = MultipleNegativesRankingLoss.forward
    monkeypatch.setattr(
        MultipleNegativesRankingLoss,
        "forward",
        lambda self, *a, **k: real_forward(self, *a, **k) * torch.tensor(float("nan")),
    )
    tiny = {"max_pairs": 60, "eval_size": 10, "max_train_pairs": 32, "corpus_distractors": False}
    data = prepare(DataSpec(source="squad-sample", **tiny))
    config = TrainConfig(
        model="paraphrase-MiniLM-L3-v2", epochs=1, batch_size=16, max_seq_length=32, hard_negatives=False
    )
    with pytest.raises(EmbedtuneError, match="training loss went nan by epoch 1 .*diverged"):
        train(config, data, None, tmp_path / "out", progress=False, evaluate_base=False)
    assert not (tmp_path / "out").exists()  # nothing half-written


def _lr_curve(config: TrainConfig, rows: int, tmp_path) -> list[float]:
    """The learning rate of every optimizer step of `config`, from transformers' own scheduler
    built from the arguments `train` gives the trainer."""
    import math

    import torch
    from transformers import get_scheduler

    from embedtune.train import _training_args

    args = _training_args(config, tmp_path, range(rows), 0, "cpu", progress=False)
    total = math.ceil(rows / config.batch_size) * config.epochs
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.lr)
    sched = get_scheduler(
        args.lr_scheduler_type,
        opt,
        num_warmup_steps=args.get_warmup_steps(total),
        num_training_steps=total,
    )
    lrs = []
    for _ in range(total):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return lrs


def test_branch_schedule_does_not_depend_on_the_total_epochs(tmp_path):
    """constant_with_warmup: the first epoch's learning rates are the same whether the run is 1 or 3
    epochs long (warmup = ceil(warmup_ratio x one epoch's steps)), so the branch run's checkpoint
    after epoch 1 stands for a 1-epoch run; the study's linear schedule differs."""
    rows, base = 320, {"batch_size": 32, "lr": 1e-4, "warmup_ratio": 0.25}  # 10 steps per epoch
    one = _lr_curve(TrainConfig(epochs=1, lr_schedule="constant_with_warmup", **base), rows, tmp_path)
    three = _lr_curve(TrainConfig(epochs=3, lr_schedule="constant_with_warmup", **base), rows, tmp_path)
    assert three[:10] == one
    assert one[:3] == pytest.approx([0.0, 1e-4 / 3, 2e-4 / 3]) and set(three[3:]) == {1e-4}
    linear1 = _lr_curve(TrainConfig(epochs=1, **base), rows, tmp_path)
    linear3 = _lr_curve(TrainConfig(epochs=3, **base), rows, tmp_path)
    assert linear3[:10] != linear1


@pytest.mark.parametrize("damage", ["none", "truncated weights", "no state", "no weights"])
def test_a_damaged_checkpoint_is_named_in_one_line(damage: str, tmp_path) -> None:
    """A trial restored from a checkpoint checks it before loading: a truncated model.safetensors (a
    partial copy), a missing state.json or missing weights end the trial with one line naming the
    checkpoint, not a loader traceback on every retry. Real model files, really truncated."""
    import shutil

    from embedtune.models import resolve_model
    from embedtune.sweep.trainable import check_checkpoint

    ckpt = tmp_path / "checkpoint_000001"
    shutil.copytree(resolve_model("paraphrase-MiniLM-L3-v2"), ckpt / "model")
    (ckpt / "state.json").write_text(json.dumps({"epoch": 2}))
    weights = ckpt / "model" / "model.safetensors"
    if damage == "truncated weights":
        with weights.open("r+b") as f:
            f.truncate(weights.stat().st_size // 2)
    elif damage == "no state":
        (ckpt / "state.json").unlink()
    elif damage == "no weights":
        weights.unlink()
    if damage == "none":
        assert check_checkpoint(ckpt, "s3://bucket/run/tune/t1/checkpoint_000001") == 2
        return
    with pytest.raises(EmbedtuneError) as err:
        check_checkpoint(ckpt, "s3://bucket/run/tune/t1/checkpoint_000001")
    message = str(err.value)
    assert message.startswith("checkpoint s3://bucket/run/tune/t1/checkpoint_000001 is damaged (")
    assert "\n" not in message
    why = {
        "truncated weights": "model.safetensors is",
        "no state": "state.json",
        "no weights": "no model weights",
    }
    assert why[damage] in message, message
