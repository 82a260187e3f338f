"""Memory that fits: the `train.loss` / `train.gradient_checkpointing` spec options reach the real
trainer, every epoch reports its peak memory, and the pre-trial probe refuses a config that cannot
fit its GPU share (the decision is a pure function of the measured peak, tested here on numbers;
the probe step itself runs for real on the CPU, and on the GPU where there is one)."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from embedtune import memory
from embedtune.errors import EmbedtuneError
from embedtune.specs import TrainConfig, parse_spec
from embedtune.sweep import preflight as pf

GIB = 2**30
A10G = 23_836_229_632  # torch.cuda.get_device_properties(0).total_memory of an NVIDIA A10G
KEY = memory.ProbeKey("all-mpnet-base-v2", 128, 384, "mnrl", 32, False, True, True)


def test_the_decision_refuses_a_peak_beyond_the_gpu_share_in_one_line_naming_the_keys() -> None:
    budget = memory.gpu_budget_bytes(A10G, 0.5)
    assert budget == int(A10G * 0.5 * 0.9)
    assert memory.refusal(KEY, budget, A10G, 0.5, "NVIDIA A10G") is None  # exactly at the budget: fits
    line = memory.refusal(KEY, budget + 1, A10G, 0.5, "NVIDIA A10G")
    assert line is not None and "\n" not in line
    for words in ("all-mpnet-base-v2 at batch_size 128, max_seq_length 384, loss mnrl", "NVIDIA A10G",
                  "resources.gpu 0.5", "train.loss: cached_mnrl with train.mini_batch_size",
                  "train.gradient_checkpointing: true", "search.batch_size", "train.max_seq_length",
                  "a larger resources.gpu"):  # fmt: skip
        assert words in line, (words, line)
    # The same peak fits a whole GPU; a whole GPU has no larger share to ask for.
    assert memory.refusal(KEY, budget + 1, A10G, 1) is None
    assert "a larger resources.gpu" not in memory.refusal(KEY, 2 * A10G, A10G, 1)
    # Already cached and checkpointed: the advice is the mini-batch, not what is on already.
    tuned = memory.ProbeKey("all-mpnet-base-v2", 128, 384, "cached_mnrl", 32, True, True, True)
    line = memory.refusal(tuned, A10G, A10G, 0.5)
    assert "train.mini_batch_size below 32" in line and "gradient_checkpointing: true" not in line
    assert "loss cached_mnrl (mini_batch_size 32)" in line
    # A step that ran out of memory on the whole device is refused even at a small measured peak.
    line = memory.refusal(KEY, 2 * GIB, A10G, 0.5, "NVIDIA A10G", out_of_memory=True)
    assert line is not None and "ran out of memory at 2.0 GiB on the NVIDIA A10G" in line


def test_probe_keys_are_the_distinct_memory_shapes_of_a_sweep() -> None:
    spec = parse_spec(
        {
            "name": "k",
            "datasets": [{"source": "medquad-sample"}],
            "models": ["paraphrase-MiniLM-L3-v2", "all-MiniLM-L6-v2"],
            "search": {"mode": "grid", "batch_size": [32, 16, 32], "epochs": [1, 2], "lr": [1e-5, 2e-5]},
            "train": {"max_seq_length": 96, "loss": "cached_mnrl", "mini_batch_size": 8},
            "resources": {"gpu": 0.5},
        }
    )
    keys = pf.probe_keys(spec)
    assert [(k.model, k.batch_size) for k in keys] == [
        ("paraphrase-MiniLM-L3-v2", 16), ("paraphrase-MiniLM-L3-v2", 32),
        ("all-MiniLM-L6-v2", 16), ("all-MiniLM-L6-v2", 32),
    ]  # fmt: skip
    assert {(k.max_seq_length, k.loss, k.mini_batch_size, k.gradient_checkpointing) for k in keys} == {
        (96, "cached_mnrl", 8, False)
    }


def test_the_probe_step_runs_for_real_on_the_cpu() -> None:
    """One optimizer step through the real trainer with the spec's loss and checkpointing; on the
    CPU it reports the host peak (the process's high-water mark covers the model and the step)."""
    from embedtune.train import probe_memory

    config = TrainConfig(model="paraphrase-MiniLM-L3-v2", batch_size=4, max_seq_length=16,
                         loss="cached_mnrl", mini_batch_size=2, gradient_checkpointing=True)  # fmt: skip
    got = probe_memory(config, "cpu")
    assert got["device"] == "cpu" and got["peak_gpu_bytes"] is None and got["device_total_bytes"] is None
    assert got["gradient_checkpointing"] is True
    assert got["peak_rss_bytes"] > 50 * 2**20  # torch and the model at least


def test_sweep_probe_is_skipped_with_a_line_without_a_gpu(caplog, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    spec = parse_spec({"name": "g", "datasets": [{"source": "medquad-sample"}], "models": ["paraphrase-MiniLM-L3-v2"],
                       "resources": {"gpu": 0.5}})  # fmt: skip
    with caplog.at_level(logging.INFO, logger="embedtune.sweep.preflight"):
        assert pf.check_gpu_memory(spec) == []
    assert "memory probe skipped: no CUDA GPU on this machine" in caplog.text
    cpu_only = spec.model_copy(update={"resources": spec.resources.model_copy(update={"gpu": 0})})
    caplog.clear()
    assert pf.check_gpu_memory(cpu_only) == [] and "memory probe" not in caplog.text  # nothing to probe


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU: needs a CUDA GPU")
def test_sweep_probe_on_this_gpu_accepts_a_small_config_and_refuses_a_tiny_share() -> None:
    raw = {"name": "g", "datasets": [{"source": "medquad-sample"}], "models": ["paraphrase-MiniLM-L3-v2"],
           "search": {"mode": "grid", "batch_size": [8]}, "train": {"max_seq_length": 64}, "resources": {"gpu": 0.5}}  # fmt: skip
    [(key, got)] = pf.check_gpu_memory(parse_spec(raw))
    assert got["device"] == "cuda" and 0 < got["peak_gpu_bytes"] < got["device_total_bytes"] * 0.45
    with pytest.raises(EmbedtuneError, match=r"memory probe: paraphrase-MiniLM-L3-v2 at batch_size 8"):
        pf.check_gpu_memory(parse_spec({**raw, "resources": {"gpu": 0.0001}}))


def test_cached_mnrl_with_checkpointing_trains_and_reports_peaks_per_epoch(tmp_path) -> None:
    """A tiny real run with `loss: cached_mnrl`, `mini_batch_size` and gradient checkpointing: the
    loss that trained and the checkpointing are the spec's, and every epoch reports its peaks."""
    from sentence_transformers import SentenceTransformer

    from embedtune.data import prepare
    from embedtune.models import resolve_model
    from embedtune.specs import DataSpec
    from embedtune.train import build_loss, train

    config = TrainConfig(model="paraphrase-MiniLM-L3-v2", epochs=2, batch_size=8, max_seq_length=32,
                         hard_negatives=False, loss="cached_mnrl", mini_batch_size=3,
                         gradient_checkpointing=True, threads=1)  # fmt: skip
    loss = build_loss(config, SentenceTransformer(str(resolve_model(config.model)), device="cpu"))
    assert type(loss).__name__ == "CachedMultipleNegativesRankingLoss" and loss.mini_batch_size == 3
    data = prepare(DataSpec(source="squad-sample", max_pairs=40, eval_size=8, max_train_pairs=16,
                            corpus_distractors=False))  # fmt: skip
    seen: dict[int, dict[str, float]] = {}
    result = train(config, data, None, tmp_path / "out", on_epoch=lambda e, m, c: seen.update({e: m}),
                   progress=False, evaluate_base=False)  # fmt: skip
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["loss"] == "CachedMultipleNegativesRankingLoss" and saved["gradient_checkpointing"] is True
    assert sorted(seen) == [1, 2]
    for metrics in seen.values():
        assert 0 < metrics["train_loss"] < 10
        assert metrics["system/peak_rss_mb"] > 50
        assert ("system/peak_gpu_mem_mb" in metrics) == (result.device == "cuda")


def test_a_trial_on_a_gpu_share_is_capped_at_that_share(monkeypatch) -> None:
    """The decision: a share of a device is a cap, a whole device (or more) or no GPU is none; the
    cap is set on the trial's one visible device only when CUDA is there."""
    assert memory.gpu_cap_fraction(0.5) == 0.5 and memory.gpu_cap_fraction(0.25) == 0.25
    assert memory.gpu_cap_fraction(1.0) is None and memory.gpu_cap_fraction(2) is None
    assert memory.gpu_cap_fraction(0) is None
    calls = []
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d=None: calls.append((f, d)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert memory.cap_gpu_memory(0.5) is None and calls == []  # no CUDA: nothing to cap
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert memory.cap_gpu_memory(1.0) is None and calls == []  # a whole GPU: no cap
    assert memory.cap_gpu_memory(0.5) == 0.5 and calls == [(0.5, 0)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU: needs a CUDA GPU")
def test_the_cap_stops_an_allocation_beyond_the_share_on_a_real_gpu() -> None:
    total = torch.cuda.get_device_properties(0).total_memory
    assert memory.cap_gpu_memory(0.25) == 0.25
    try:
        small = torch.empty(int(total * 0.15), dtype=torch.uint8, device="cuda")  # within the share
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(int(total * 0.15), dtype=torch.uint8, device="cuda")  # 0.30 in all: beyond it
        del small
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
        torch.cuda.empty_cache()


def test_the_probe_waits_for_a_gpu_worker_on_an_autoscaling_cluster_unless_told() -> None:
    assert pf.probe_wait_s(None, autoscaling=True) == pf.PROBE_WAIT_AUTOSCALING_S > 0  # default on
    assert pf.probe_wait_s(None, autoscaling=False) == 0  # a fixed cluster: a GPU node will not come
    assert pf.probe_wait_s("", autoscaling=True) == pf.PROBE_WAIT_AUTOSCALING_S
    assert pf.probe_wait_s("0", autoscaling=True) == 0  # told not to wait
    assert pf.probe_wait_s("120", autoscaling=False) == 120
    with pytest.raises(EmbedtuneError, match=r"EMBEDTUNE_PROBE_WAIT_S='ten' is not a number of seconds"):
        pf.probe_wait_s("ten", autoscaling=True)
