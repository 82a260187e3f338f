"""search.second_seed: the best configuration of each dataset trained again with another seed, and a
gain called real only when it holds for both seeds."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient
from specs import TINY_DATA, VECTOR_ONLY_FINAL, tiny_spec, trial_record

from embedtune.records import EpochPoint, TrialRecord
from embedtune.report.seeds import seed_checks
from embedtune.report.verdict import verdict
from embedtune.specs import parse_spec
from embedtune.sweep.identity import ConfigHasher, grid_configs


def _record(trial_id: str, seed: int, score: float, base: float = 0.5, **kw) -> TrialRecord:
    history = [EpochPoint(0, {"ir_mrr_at_10": base}), EpochPoint(1, {"ir_mrr_at_10": score})]
    values = dict(
        seed=seed, epochs_done=1, history=history, best_epoch=1, best_metrics={"ir_mrr_at_10": score}
    )
    return trial_record(trial_id, **{**values, "best_checkpoint": f"/ckpt/{trial_id}", **kw})


def test_twin_of_each_datasets_best_gaining_trial_has_its_identity_but_the_seed():
    from embedtune.sweep.second_seed import best_per_dataset, twin_configs

    raw = tiny_spec(
        "twins",
        models=["paraphrase-MiniLM-L3-v2"],
        search={"epochs": [1, 2], "batch_size": [16], "lr": [5e-5], "second_seed": True},
    )
    spec = parse_spec(raw)
    hasher = ConfigHasher({"medquad": "fp"}, spec.train.model_dump(), {})
    members = {c["epochs"]: c for c in grid_configs(spec, hasher)}
    one = _record("a-e1", 42, 0.60, config_hash=members[1]["config_hash"], lr_schedule="constant_with_warmup")
    two = _record(
        "a", 42, 0.70, config_hash=members[2]["config_hash"], epochs=2, best_epoch=2,
        lr_schedule="constant_with_warmup",
    )  # fmt: skip
    below = _record("b", 42, 0.40, dataset="other", config_hash="x")  # loses to its base: no twin
    failed = _record("f", 42, 0.9, status="FAILED", best_checkpoint=None)  # never picked
    assert best_per_dataset([failed, one, two, below], "ir_mrr_at_10") == [two]
    (twin,) = twin_configs(spec, [one, two, below], hasher)
    assert twin["seed"] == 43 and twin["epochs"] == 2 and twin["branch_epochs"] == "2"
    assert {k: v for k, v in twin.items() if k not in ("seed", "config_hash", "branch_epochs")} == {
        k: v for k, v in members[2].items() if k not in ("seed", "config_hash")
    }
    assert twin["config_hash"] == hasher({**members[2], "seed": 43, "config_hash": None})
    assert twin["config_hash"] != members[2]["config_hash"]
    small = _record("s", 42, 0.52, config_hash=members[1]["config_hash"], dataset="medquad")
    assert twin_configs(spec, [small], hasher) == []  # +2 points: "not worth it" whatever the seed
    done = _record("t", 43, 0.69, epochs=2, best_epoch=2, lr_schedule="constant_with_warmup")
    assert twin_configs(spec, [one, two, below, done], hasher) == []  # its twin is done
    off = parse_spec({**raw, "search": {**raw["search"], "second_seed": False}})
    assert twin_configs(off, [one, two], hasher) == []
    assert parse_spec(tiny_spec("auto", search={"mode": "auto"})).search.checks_second_seed
    assert not parse_spec(tiny_spec("grid")).search.checks_second_seed


def test_a_lone_twin_trains_with_the_cpus_of_the_sweeps_concurrent_trials():
    from embedtune.sweep.second_seed import twin_resources

    spec = parse_spec(tiny_spec("cpus", max_concurrent_trials=2, resources={"cpu": 1}))
    assert twin_resources(spec, 1, node_cpus=2, total_cpus=2).cpu == 2
    assert twin_resources(spec, 2, node_cpus=2, total_cpus=2).cpu == 1  # two twins share them
    assert twin_resources(spec, 1, node_cpus=1, total_cpus=4).cpu == 1  # a trial runs on one node
    gpu = parse_spec(tiny_spec("gpu", max_concurrent_trials=2, resources={"cpu": 1, "gpu": 0.5}))
    assert twin_resources(gpu, 1, node_cpus=8, total_cpus=8) == gpu.resources
    unlimited = parse_spec(tiny_spec("all", max_concurrent_trials=None, resources={"cpu": 2}))
    assert twin_resources(unlimited, 1, node_cpus=16, total_cpus=16).cpu == 16


def test_seed_entries_score_the_twins_of_picked_models_only():
    from embedtune.final.pick import pick_models, seed_entries

    a, twin, other = _record("a", 42, 0.7), _record("b", 43, 0.65), _record("c", 42, 0.6, lr=1e-4)
    picked = pick_models([a, twin, other], ["paraphrase-MiniLM-L3-v2"], top_k=0)
    assert [e.trial_id for e in picked["medquad"] if e.kind == "tuned"] == ["a"]
    extra = seed_entries([a, twin, other], picked)
    assert [(e.trial_id, e.path) for e in extra["medquad"]] == [("b", "/ckpt/b")]
    assert seed_entries([a, twin, other], picked, also=extra) == {}  # already scored


def _board(scores: dict[str, tuple[float, float]], base: float = 0.5) -> pd.DataFrame:
    rows = [
        dict(model="paraphrase-MiniLM-L3-v2", kind="base", trial_id=None, mrr_at_10=base, p_mrr_at_10=None)
    ]
    for tid, (score, p) in scores.items():
        rows.append(dict(model=f"m-{tid}", kind="tuned", trial_id=tid, mrr_at_10=score, p_mrr_at_10=p))
    df = pd.DataFrame(rows).assign(dataset="medquad", query_type="vector", reranker="none")
    return df.assign(delta_mrr_at_10=df["mrr_at_10"] - base)


def test_a_gain_is_called_real_only_when_it_holds_for_both_seeds():
    trials = [_record("a", 42, 0.7), _record("b", 43, 0.65), _record("c", 42, 0.6, lr=1e-4)]
    winner = {"medquad": {"kind": "tuned", "trial_id": "a"}}
    both = seed_checks(_board({"a": (0.70, 0.001), "b": (0.66, 0.004)}), trials, winner, "mrr_at_10")
    check = both["medquad"]
    assert [(s["seed"], s["score"]) for s in check["seeds"]] == [(42, 0.70), (43, 0.66)]
    assert check["holds"] and check["spread"] == pytest.approx(0.04)
    assert "seed 42 0.700 (+20.0 points, p=0.001), seed 43 0.660 (+16.0 points, p=0.004)" in check["line"]
    assert check["line"].endswith("spread 4.0 points: the gain holds for both seeds")
    line = verdict(0.5, 0.7, None, "mrr_at_10", 0.001, check)
    assert line.startswith("Fine-tune:") and "holds for every seed (spread 4.0 points)" in line

    lucky = seed_checks(_board({"a": (0.70, 0.001), "b": (0.53, 0.40)}), trials, winner, "mrr_at_10")
    check = lucky["medquad"]
    assert not check["holds"] and "no real gain with seed 43: a lucky seed is not ruled out" in check["line"]
    noise = seed_checks(_board({"a": (0.51, 0.60), "b": (0.50, 1.0)}), trials, winner, "mrr_at_10")
    assert noise["medquad"]["line"].endswith("no seed gains beyond noise")
    line = verdict(0.5, 0.7, None, "mrr_at_10", 0.001, check)
    assert line.startswith("Promising, not proven:") and "not with every seed" in line
    # no twin scored (or none trained): no seed check, and the verdict stands on its one seed
    assert seed_checks(_board({"a": (0.70, 0.001)}), trials, winner, "mrr_at_10") == {}
    assert verdict(0.5, 0.7, None, "mrr_at_10", 0.001).startswith("Fine-tune:")


@pytest.mark.slow
def test_a_sweep_trains_the_winner_again_with_a_second_seed_and_the_report_compares_them(tmp_path: Path):
    """A real grid sweep with search.second_seed: after the search, the best trial's config runs
    again with seed 43 (one more Tune trial and MLflow run, not early-stopped), the final stage
    scores the twin beside the winner, the summary gives both seeds with the spread, and the same
    command again trains nothing."""
    from embedtune.sweep import run_sweep

    raw = tiny_spec(
        "seeds",
        models=["paraphrase-MiniLM-L3-v2"],
        datasets=[{**TINY_DATA, "max_train_pairs": 128}],  # a gain of 3+ points: worth a second seed
        search={"epochs": [1], "batch_size": [16], "lr": [1e-4], "second_seed": True},
        train={"max_seq_length": 96},
        scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 2},
        mlflow={"log_models": False},
        final={**VECTOR_ONLY_FINAL, "serve": False},
    )
    spec = parse_spec(raw)
    result = run_sweep(spec, tmp_path / "run")
    assert result.launched == 2 and result.experiments == ["tune", "tune-2"]
    first, twin = sorted(result.trials, key=lambda t: t.seed)
    assert first.score("ir_mrr_at_10") > first.base_score("ir_mrr_at_10")  # a gain to confirm
    assert (first.seed, twin.seed) == (42, 43) and first.recipe == twin.recipe
    assert twin.status == "FINISHED" and twin.best_epoch == 1 and twin.config_hash != first.config_hash
    assert Path(twin.best_checkpoint, "model.safetensors").exists()
    client = MlflowClient(result.tracking_uri)
    exp = client.get_experiment_by_name(spec.experiment)
    children = [
        r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("embedtune.kind") == "trial"
    ]
    assert sorted(r.data.params["seed"] for r in children) == ["42", "43"]

    board = pd.read_csv(result.final.files["leaderboard_csv"])
    scored = board[board["kind"] == "tuned"].set_index("trial_id")
    assert set(scored.index) == {first.trial_id, twin.trial_id}
    check = result.final.verdicts["medquad"]["seeds"]
    assert [s["seed"] for s in check["seeds"]] == [42, 43] or [s["seed"] for s in check["seeds"]] == [43, 42]
    by_seed = {s["seed"]: s for s in check["seeds"]}
    assert by_seed[43]["score"] == pytest.approx(scored.loc[twin.trial_id, "mrr_at_10"])
    assert by_seed[42]["score"] == pytest.approx(scored.loc[first.trial_id, "mrr_at_10"])
    assert check["spread"] == pytest.approx(abs(by_seed[42]["score"] - by_seed[43]["score"]))
    md = result.final.files["leaderboard_md"].read_text()
    assert f"**Seeds:** {check['line']}." in md
    meta = json.loads(result.final.files["meta"].read_text())
    assert meta["verdicts"]["medquad"]["seeds"]["holds"] == check["holds"]

    again = run_sweep(spec, tmp_path / "run")
    assert again.launched == 0 and len(again.trials) == 2
