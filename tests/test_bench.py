"""`make bench` pieces on small real data: the three evaluation paths agree hit for hit, the
ratios come out as plain positive numbers, and results.json carries the keys others check by
script. No timing is asserted (a slow machine fails nothing)."""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import bench  # noqa: E402  (scripts/bench.py: `make bench`)

SAMPLE = REPO / "embedtune" / "samples" / "medquad_sample.jsonl.gz"
REQUIRED = [
    "eval_speedup_vs_loop",
    "eval_time_vs_bruteforce",
    "trial_throughput_vs_plain",
    "mining_cost_vs_per_trial",
    "ingest_vs_encode",
    "encode_speedup_backend",
    "encode_backend_hit10_delta",
    "sweep_local_seconds",
    "sweep_wall_over_trial_sum",
    "machine",
]


@pytest.fixture(scope="module")
def small_eval(tmp_path_factory):
    return bench.bench_eval(
        SAMPLE, n_queries=60, corpus_rows=300, repeats=1, work=tmp_path_factory.mktemp("ev")
    )


def test_eval_paths_agree_and_ratios_are_numbers(small_eval):
    ev = small_eval
    assert ev["eval_same_hits"] is True  # batched exact == per-query LanceDB loop == numpy product
    assert ev["eval_n_queries"] == 60 and ev["eval_corpus_rows"] >= 300
    assert 0.3 < ev["eval_hit_at_10"] <= 1.0
    assert ev["eval_mrr_max_abs_diff"] < 1e-3  # only ties among duplicate answers may reorder
    # Each ratio is what its name says, from the median times measured on this data.
    secs = {k: statistics.median(v) for k, v in ev["eval_seconds"].items()}
    assert ev["eval_speedup_vs_loop"] == pytest.approx(secs["loop"] / secs["embedtune"])
    assert ev["eval_time_vs_bruteforce"] == pytest.approx(secs["embedtune"] / secs["bruteforce"])
    assert all(math.isfinite(ev[k]) for k in ("eval_speedup_vs_loop", "eval_time_vs_bruteforce"))


def test_ingest_ratio(small_eval, tmp_path):
    ing = bench.bench_ingest(small_eval["_data"], small_eval["_model"], small_eval["_path"], 100, 1, tmp_path)
    assert ing["ingest_rows"] == 100
    # rows/s into LanceDB over rows/s of encoding alone; ingest encodes too, so it cannot be much faster
    assert ing["ingest_vs_encode"] == pytest.approx(ing["ingest_rows_per_s"] / ing["encode_rows_per_s"])
    assert 0 < ing["ingest_vs_encode"] < 1.5


def test_encode_backend_keys(small_eval, tmp_path):
    """auto (openvino on this CPU) against torch on the same corpus and questions: plain numbers,
    a real speed ratio and a hit@10 difference within what bf16 arithmetic can move."""
    enc = bench.bench_encode(small_eval["_data"], 64, 1, tmp_path, max_seq_length=64)
    assert enc["encode_backend"] == "openvino" and enc["encode_model"] == bench.ENCODE_MODEL
    assert isinstance(enc["encode_speedup_backend"], float) and 0 < enc["encode_speedup_backend"] < 100
    assert abs(enc["encode_backend_hit10_delta"]) <= 0.05
    assert all(0.3 < h <= 1.0 for h in enc["encode_hit_at_10"].values())


def test_missing_eval_data_is_a_clear_error(tmp_path):
    from embedtune.errors import EmbedtuneError

    with pytest.raises(EmbedtuneError, match="--eval-data .*nope.jsonl not found"):
        bench.bench_eval(tmp_path / "nope.jsonl", 10, 100, 1, tmp_path)


def test_outputs_carry_the_checked_keys(tmp_path):
    results = {
        "machine": bench.machine(),
        "repeats": 3,
        "eval_speedup_vs_loop": 25.0,
        "eval_time_vs_bruteforce": 2.5,
        "trial_throughput_vs_plain": 0.97,
        "mining_cost_vs_per_trial": 0.17,
        "ingest_vs_encode": 0.93,
        "encode_speedup_backend": 3.1,
        "encode_backend_hit10_delta": -0.006,
        "sweep_local_seconds": 800.0,
        "sweep_wall_over_trial_sum": 0.55,
        "epoch_axis_cost_ratio": 0.5,
        "epoch_axis_quality_p": 0.01,
    }
    js, md = bench.write_outputs(results, tmp_path)
    loaded = json.loads(js.read_text())
    assert all(key in loaded for key in REQUIRED)
    assert all(isinstance(loaded[k], float) for k in REQUIRED if k != "machine")
    assert loaded["machine"]["cpus"] >= 1
    text = md.read_text()
    assert "| `eval_speedup_vs_loop` | 25.000 | met (>= 20) |" in text
    assert "| `eval_time_vs_bruteforce` | 2.500 | MISSED (<= 2) |" in text
    assert "| `encode_speedup_backend` | 3.100 | met (>= 2) |" in text
    assert "| `encode_backend_hit10_delta` | -0.006 | MISSED (abs<= 0.005) |" in text
    assert "| `epoch_axis_cost_ratio` | 0.500 | met (<= 0.55) |" in text
    assert "| `epoch_axis_quality_p` | 0.010 | MISSED (>= 0.05) |" in text


@pytest.mark.slow
def test_epoch_axis_keys_on_tiny_data(tmp_path):
    """The epoch-axis part on tiny real data: both modes really train (the branch run once, one run
    per count separately), the ratio and the McNemar p come out as plain numbers."""
    from embedtune.specs import load_spec

    spec = load_spec(REPO / "sweeps" / "local.yaml")
    tiny = {"source": "medquad-sample", "max_pairs": 200, "eval_size": 30, "max_train_pairs": 48}
    out = bench.bench_epoch_axis(spec, tmp_path, tiny, epochs=(1, 2))
    assert 0 < out["epoch_axis_cost_ratio"] < 1.5 and 0 <= out["epoch_axis_quality_p"] <= 1
    m = spec.scheduler.metric  # the headline metric's trial name
    assert sorted(out[f"epoch_axis_branch_{m}"]) == [1, 2]
    assert sorted(out[f"epoch_axis_separate_{m}"]) == ["1@1", "2@1", "2@2"]
    assert out["epoch_axis_n_queries"] == 30 and out["epoch_axis_branch_best_epoch"] in (1, 2)


def test_driver_bookkeeping_part_counts_real_writes(tmp_path):
    """The bookkeeping part feeds the driver's real callbacks against a real tracking server: every
    trial ends as a FINISHED run (bench_driver raises otherwise) and the ratio is the two costs'."""
    out = bench.bench_driver(tmp_path, sizes=(3, 9))
    assert out["driver_us_per_result_3"] > 0 and out["driver_us_per_result_9"] > 0
    assert out["driver_cost_ratio"] == pytest.approx(
        out["driver_us_per_result_9"] / out["driver_us_per_result_3"]
    )
    # the cost is per result: seconds / (trials x epochs)
    assert out["driver_us_per_result_9"] == pytest.approx(out["driver_seconds_9"] / (9 * 3) * 1e6)
    assert json.loads((tmp_path / "run-9" / "trials.json").read_text()).__len__() == 9


def test_a_failed_part_is_named_and_the_others_are_still_written(tmp_path, monkeypatch):
    """One part that raises (the driver part once met MLflow's 1,000-run page) costs only its own
    keys: the others land in results.json, the failure is named there and the exit code is 1.
    The parts are stand-ins here; each real part has its own test above."""
    keys = {
        "bench_sweep_local": {"sweep_local_seconds": 600.0, "sweep_local_tune_trials": 4},
        "bench_ingest": {"ingest_vs_encode": 0.95},
        "bench_encode": {"encode_speedup_backend": 2.5},
        "bench_mining": {"mining_cost_vs_per_trial": 0.2},
        "bench_throughput": {"trial_throughput_vs_plain": 1.0},
        "bench_epoch_axis": {"epoch_axis_cost_ratio": 0.5},
    }
    for name, out in keys.items():
        monkeypatch.setattr(bench, name, lambda *a, _out=out, **k: dict(_out))
    monkeypatch.setattr(
        bench,
        "bench_eval",
        lambda *a, **k: {"eval_speedup_vs_loop": 30.0, "_data": 0, "_model": 0, "_path": 0},
    )

    def broken(*a, **k):
        raise RuntimeError("1000 finished trial runs in MLflow, expected 2000")

    monkeypatch.setattr(bench, "bench_driver", broken)
    monkeypatch.setattr(bench, "log_to_mlflow", lambda *a, **k: None)
    code = bench.main(["--out", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work")])
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert code == 1
    assert written["failed_parts"] == {
        "driver": "RuntimeError: 1000 finished trial runs in MLflow, expected 2000"
    }
    for out in keys.values():
        assert all(written[k] == v for k, v in out.items())
    assert written["eval_speedup_vs_loop"] == 30.0 and "driver_cost_ratio" not in written
