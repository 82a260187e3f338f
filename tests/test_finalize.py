"""Final stage: picking checkpoints (pure), MLflow logging and registry, `embedtune evaluate` end to end."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from embedtune.finalize import FinalSpec, pick_models


def _trial(tid, model, dataset, history, status="FINISHED", ckpt=True, epochs=None):
    hist = [{"epoch": 0, "metrics": {"ir_recall_at_10": 0.5}}]
    hist += [{"epoch": i + 1, "metrics": {"ir_recall_at_10": s}} for i, s in enumerate(history)]
    trained = hist[1:]
    best = max(trained, key=lambda h: (h["metrics"]["ir_recall_at_10"], -h["epoch"])) if trained else None
    return {
        "trial_id": tid, "model": model, "model_label": model.split("/")[-1], "dataset": dataset,
        "epochs": epochs or len(history), "lr": 2e-5, "batch_size": 32, "seed": 42, "status": status,
        "duration_s": 10.0, "gpu_seconds": None, "epochs_done": len(history), "history": hist,
        "best_epoch": best["epoch"] if best else None, "best_metrics": best["metrics"] if best else {},
        "best_checkpoint": f"/ckpt/{tid}/model" if ckpt else None, "mlflow_run_id": None,
    }  # fmt: skip


def _tuned(picks, dataset):
    return [e for e in picks[dataset] if e.kind == "tuned"]


def test_pick_by_best_epoch_not_last_epoch():
    trials = [
        # a: last epoch 0.70 but its best epoch (1) scored 0.90; b: best = last = 0.80
        _trial("a", "mini", "med", [0.90, 0.70]),
        _trial("b", "mini", "med", [0.75, 0.80]),
    ]
    picks = pick_models(trials, ["mini"], top_k=0)
    tuned = _tuned(picks, "med")
    assert [e.trial_id for e in tuned] == ["a"]
    assert tuned[0].epochs == 1 and tuned[0].path == "/ckpt/a/model" and tuned[0].base_model == "mini"
    assert tuned[0].label == "mini-ft-e1-a"


def test_failed_and_checkpointless_trials_are_ignored():
    trials = [
        _trial("bad", "mini", "med", [0.99], status="FAILED"),
        _trial("nockpt", "mini", "med", [0.98], ckpt=False),
        _trial("killed", "mini", "med", [0.60], status="KILLED", epochs=3),  # stopped early: still usable
        _trial("nometric", "mini", "med", []),
    ]
    picks = pick_models(trials, ["mini"], top_k=5)
    assert [e.trial_id for e in _tuned(picks, "med")] == ["killed"]


def test_base_models_untouched_on_every_dataset_and_per_group_best_plus_top_k():
    trials = [
        _trial("m1", "mini", "med", [0.70]),
        _trial("m2", "mini", "med", [0.80]),
        _trial("m3", "mini", "med", [0.79]),
        _trial("l1", "l3", "med", [0.60]),
        _trial("s1", "mini", "squad", [0.95]),
        _trial("s2", "mini", "squad", [0.94]),
    ]
    picks = pick_models(trials, ["mini", "l3"], top_k=2, datasets=["med", "squad", "empty"])
    assert set(picks) == {"med", "squad", "empty"}
    for entries in picks.values():
        bases = [e for e in entries if e.kind == "base"]
        assert [(e.label, e.path, e.base_model) for e in bases] == [
            ("mini", "mini", "mini"),
            ("l3", "l3", "l3"),
        ]
    # best per (model, dataset): m2, l1, s1; top-2 overall: s1 (0.95), s2 (0.94) -> s2 added
    assert sorted(e.trial_id for e in _tuned(picks, "med")) == ["l1", "m2"]
    assert sorted(e.trial_id for e in _tuned(picks, "squad")) == ["s1", "s2"]
    assert _tuned(picks, "empty") == []


def test_ties_are_deterministic():
    trials = [
        _trial("z", "mini", "med", [0.80, 0.80, 0.80]),  # best epoch 1
        _trial("y", "mini", "med", [0.70, 0.80]),  # best epoch 2
        _trial("x", "mini", "med", [0.70, 0.80]),  # same as y: smaller trial id wins
    ]
    first = pick_models(trials, [], top_k=0)
    assert [e.trial_id for e in _tuned(first, "med")] == ["z"]  # fewer epochs wins the tie
    for order in (trials[::-1], trials[1:] + trials[:1]):
        assert [e.trial_id for e in _tuned(pick_models(order, [], top_k=0), "med")] == ["z"]
    picks = pick_models(trials[1:], [], top_k=0)
    assert [e.trial_id for e in _tuned(picks, "med")] == ["x"]
    assert [e.trial_id for e in _tuned(pick_models(trials, [], top_k=3), "med")] == ["z", "x", "y"]


def test_final_spec_rejects_unknown_keys_and_bad_metric():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        FinalSpec(top_kk=3)
    with pytest.raises(ValidationError):
        FinalSpec(leaderboard_metric="accuracy")
    assert FinalSpec(cross_encoder="none").cross_encoder is None
    assert FinalSpec().eval.query_types == ["vector", "fts", "hybrid"]


# ---------------------------------------------------------------- MLflow


def _store(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("embedtune-test", artifact_location=(tmp_path / "mlartifacts").as_uri())
    parent = client.create_run(exp, run_name="sweep").info.run_id
    return uri, client, parent


def _artifact_paths(client, run_id, path=None) -> set[str]:
    out = set()
    for f in client.list_artifacts(run_id, path):
        out |= _artifact_paths(client, run_id, f.path) if f.is_dir else {f.path}
    return out


def test_report_is_logged_to_the_parent_run(tmp_path):
    from test_report import results_frame, trials_list  # tests/ is on sys.path under pytest

    from embedtune.finalize import log_report
    from embedtune.report import build_report

    uri, client, parent = _store(tmp_path)
    rep = build_report(tmp_path / "run", trials_list(), results_frame(), {})
    log_report(uri, parent, rep)
    got = _artifact_paths(client, parent)
    for name in ("leaderboard.md", "leaderboard.csv", "leaderboard.html", "results.csv", "meta.json"):
        assert f"report/{name}" in got
    assert {"report/plots/best_combinations.png", "report/plots/epochs_medquad.png"} <= got
    run = client.get_run(parent)
    assert run.data.metrics["final.medquad.gain"] == pytest.approx(0.05)  # best tuned 0.75 vs best base 0.70
    assert run.data.metrics["final.medquad.base_hit_at_10"] == pytest.approx(0.70)
    assert run.data.metrics["final.winner.hit_at_10"] == pytest.approx(0.75)
    assert run.data.tags["embedtune.winner"] == "mini-ft-e2-t1"


@pytest.fixture(scope="module")
def small_data():
    from embedtune.data import DataSpec, prepare

    return prepare(DataSpec(source="medquad-sample", eval_size=60, max_pairs=300))


@pytest.mark.slow
def test_final_stage_registers_the_winner(tmp_path, small_data):
    """run_final_stage without Ray: a fake trial whose 'checkpoint' is a copy of the L3 base model."""
    from embedtune.evaluate import EvalSpec
    from embedtune.finalize import run_final_stage
    from embedtune.models import resolve_model

    uri, client, parent = _store(tmp_path)
    run_dir = tmp_path / "run"
    ckpt = tmp_path / "ckpt" / "model"
    shutil.copytree(resolve_model("paraphrase-MiniLM-L3-v2"), ckpt)
    trial = _trial("t1", "paraphrase-MiniLM-L3-v2", small_data.label, [0.6, 0.7])
    trial["best_checkpoint"] = str(ckpt)
    run_dir.mkdir()
    (run_dir / "trials.json").write_text(json.dumps([trial]))
    spec = FinalSpec(
        eval=EvalSpec(query_types=["vector", "hybrid"], rerankers=["none", "rrf"]),
        cross_encoder=None,
        register_name="embedtune-test",
        probe_size=40,
    )
    result = run_final_stage(
        run_dir, [trial], {small_data.label: small_data}, {}, ["paraphrase-MiniLM-L3-v2"], spec, parent, uri
    )
    assert result.winner["kind"] == "tuned" and result.winner["trial_id"] == "t1"
    mv = client.get_model_version_by_alias("embedtune-test", "champion")
    assert str(mv.version) == result.registered["version"]
    assert mv.tags["dataset"] == small_data.label
    child = client.get_run(mv.run_id)
    assert child.data.tags["mlflow.parentRunId"] == parent
    assert "report/leaderboard.md" in _artifact_paths(client, parent)
    md = (run_dir / "report" / "leaderboard.md").read_text()
    assert "Should you fine-tune?" in md and "**Verdict:**" in md
    probe = json.loads((run_dir / "report" / "probe.json").read_text())
    (entry,) = probe.values()
    assert 0 < entry["eval_to_train_sim"] <= 1 and 0 <= entry["train_hit_at_10"] <= 1

    # the registered model loads back and embeds
    import mlflow

    from embedtune.tracking import fluent_uri

    with fluent_uri(uri, registry=True):
        model = mlflow.sentence_transformers.load_model("models:/embedtune-test@champion")
    assert "MLFLOW_TRACKING_URI" not in os.environ  # registering left no URI behind for later sweeps
    assert model.encode(["what causes anemia?"]).shape == (1, 384)

    # `embedtune report RUN_DIR` rebuilds from stored results without models (probe cached)
    from embedtune.cli import main

    for name in ("leaderboard.md", "leaderboard.csv", "leaderboard.html"):
        (run_dir / "report" / name).unlink()
    assert main(["report", str(run_dir)]) == 0
    assert all(
        (run_dir / "report" / n).exists() for n in ("leaderboard.md", "leaderboard.csv", "leaderboard.html")
    )
    assert (run_dir / "report" / "leaderboard.md").read_text() == md


@pytest.mark.slow
def test_cli_evaluate_end_to_end(tmp_path, capsys):
    from embedtune.cli import main

    out = tmp_path / "ev"
    argv = ["evaluate", "--models", "all-MiniLM-L6-v2", "paraphrase-MiniLM-L3-v2", "--data", "medquad-sample",
            "--eval-size", "60", "--max-pairs", "300", "--out", str(out), "--probe-size", "40",
            "--query-types", "vector", "hybrid"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "leaderboard" in printed and "best:" in printed
    import pandas as pd

    board = pd.read_csv(out / "report" / "leaderboard.csv")
    assert set(board["model"]) == {"all-MiniLM-L6-v2", "paraphrase-MiniLM-L3-v2"}
    assert set(board["kind"]) == {"base"}
    combos = set(zip(board["query_type"], board["reranker"], strict=True))
    assert {
        ("vector", "none"),
        ("hybrid", "rrf"),
        ("hybrid", "linear"),
        ("vector", "cross-encoder"),
    } <= combos
    assert (board["n_queries"] == 60).all()
    assert (board["delta_hit_at_10"] == 0).all()
    assert (out / "report" / "plots" / "best_combinations.png").exists()
    assert (out / "data" / "medquad-sample.json").exists()
    md = (out / "report" / "leaderboard.md").read_text()
    assert "Should you fine-tune? (medquad-sample)" in md
    # the stored results rebuild the same leaderboard
    assert main(["report", str(out)]) == 0
    assert pd.read_csv(out / "report" / "leaderboard.csv").equals(board)
