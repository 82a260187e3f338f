"""Leaderboard, deltas, overfitting flags, verdicts and report files on hand-made inputs."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from embedtune.report import (
    build_report,
    leaderboard,
    overfitting_flags,
    pick_winner,
    rebuild_report,
    verdict,
)


def _row(dataset, model, base, kind, qt, rr, h10, trial_id=None, epochs=None, mrr=None):
    return {
        "dataset": dataset, "model": model, "model_path": f"/nowhere/{model}", "base_model": base, "kind": kind,
        "trial_id": trial_id, "epochs": epochs, "query_type": qt, "reranker": rr,
        "hit_at_1": h10 / 2, "hit_at_5": h10 - 0.1, "hit_at_10": h10, "mrr_at_10": mrr if mrr is not None else h10 / 2,
        "ndcg_at_10": h10 * 0.6, "n_queries": 50, "seconds": 1.0,
    }  # fmt: skip


def results_frame() -> pd.DataFrame:
    rows = [
        # medquad: MiniLM base and two tuned checkpoints, two query types
        _row("medquad", "mini", "mini", "base", "vector", "none", 0.60),
        _row("medquad", "mini", "mini", "base", "hybrid", "rrf", 0.70),
        _row("medquad", "mini-ft-e2-t1", "mini", "tuned", "vector", "none", 0.72, "t1", 2),
        _row("medquad", "mini-ft-e2-t1", "mini", "tuned", "hybrid", "rrf", 0.75, "t1", 2),
        _row("medquad", "mini-ft-e1-t2", "mini", "tuned", "vector", "none", 0.55, "t2", 1),
        _row("medquad", "mini-ft-e1-t2", "mini", "tuned", "hybrid", "rrf", 0.68, "t2", 1),
        # a second base model on medquad
        _row("medquad", "l3", "l3", "base", "vector", "none", 0.50),
        _row("medquad", "l3", "l3", "base", "hybrid", "rrf", 0.66),
        # squad: base already high, fine-tune loses
        _row("squad", "mini", "mini", "base", "vector", "none", 0.95),
        _row("squad", "mini-ft-e3-t3", "mini", "tuned", "vector", "none", 0.94, "t3", 3),
    ]
    return pd.DataFrame(rows)


def _trial(tid, dataset, epochs, scores, status="FINISHED", lr=2e-5, model="mini", gpu=None, base=0.5):
    history = [{"epoch": 0, "metrics": {"ir_recall_at_10": base}}]
    history += [{"epoch": i + 1, "metrics": {"ir_recall_at_10": s}} for i, s in enumerate(scores)]
    trained = history[1:]
    best = max(trained, key=lambda h: h["metrics"]["ir_recall_at_10"]) if trained else None
    return {
        "trial_id": tid, "model": model, "model_label": model, "dataset": dataset, "epochs": epochs, "lr": lr,
        "batch_size": 32, "seed": 42, "warmup_ratio": 0.1, "status": status, "duration_s": 100.0 * epochs,
        "gpu_seconds": gpu, "epochs_done": len(scores), "history": history,
        "best_epoch": best["epoch"] if best else None, "best_metrics": best["metrics"] if best else {},
        "best_checkpoint": f"/ckpt/{tid}" if status != "FAILED" else None, "mlflow_run_id": None,
    }  # fmt: skip


def trials_list() -> list[dict]:
    return [
        _trial("t1", "medquad", 2, [0.70, 0.74], gpu=48.0),
        _trial("t2", "medquad", 1, [0.66]),
        _trial("t4", "medquad", 4, [0.72, 0.73, 0.69, 0.65]),  # worse than 2 epochs: overfits
        _trial("t5", "medquad", 5, [0.71], status="FAILED"),  # ignored
        _trial(
            "t6", "medquad", 3, [0.60, 0.58, 0.57], lr=1e-4, base=0.62
        ),  # other lr: own group; below base 0.62
        _trial("t3", "squad", 3, [0.93, 0.92, 0.91], base=0.95),
    ]


def test_deltas_against_same_dataset_query_type_and_reranker():
    board = leaderboard(results_frame(), trials_list(), "hit_at_10")
    get = board.set_index(["dataset", "model", "query_type", "reranker"])
    assert get.loc[("medquad", "mini-ft-e2-t1", "vector", "none"), "delta_hit_at_10"] == pytest.approx(0.12)
    assert get.loc[("medquad", "mini-ft-e2-t1", "hybrid", "rrf"), "delta_hit_at_10"] == pytest.approx(0.05)
    assert get.loc[("medquad", "mini-ft-e1-t2", "vector", "none"), "delta_hit_at_10"] == pytest.approx(-0.05)
    assert get.loc[("medquad", "mini-ft-e1-t2", "vector", "none"), "delta_mrr_at_10"] == pytest.approx(-0.025)
    assert get.loc[("squad", "mini-ft-e3-t3", "vector", "none"), "delta_hit_at_10"] == pytest.approx(-0.01)
    # base rows: delta 0 against themselves; the other base model is compared with itself, not MiniLM
    assert get.loc[("medquad", "mini", "vector", "none"), "delta_hit_at_10"] == 0
    assert get.loc[("medquad", "l3", "hybrid", "rrf"), "delta_hit_at_10"] == 0
    # training time from the trial record, 0 for a base model
    assert get.loc[("medquad", "mini-ft-e2-t1", "vector", "none"), "training_s"] == 200.0
    assert get.loc[("medquad", "mini", "vector", "none"), "training_s"] == 0.0
    # GPU seconds per point: 48 s / 12 points; none on CPU (no gpu_seconds) or without a gain
    assert get.loc[("medquad", "mini-ft-e2-t1", "vector", "none"), "gpu_s_per_point"] == pytest.approx(4.0)
    assert math.isnan(get.loc[("medquad", "mini-ft-e1-t2", "vector", "none"), "gpu_s_per_point"])
    assert "below base" in get.loc[("medquad", "mini-ft-e1-t2", "vector", "none"), "flags"]
    # sorted per dataset by the metric, ranked
    med = board[board["dataset"] == "medquad"]
    assert list(med["hit_at_10"]) == sorted(med["hit_at_10"], reverse=True)
    assert list(med["rank"]) == list(range(1, len(med) + 1))


def test_winner_is_best_tuned_row():
    board = leaderboard(results_frame(), trials_list(), "hit_at_10")
    w = pick_winner(board, "hit_at_10")
    assert (w["model"], w["query_type"], w["reranker"]) == ("mini-ft-e2-t1", "hybrid", "rrf")
    assert w["kind"] == "tuned" and w["trial_id"] == "t1"
    base_only = leaderboard(results_frame().query("kind == 'base'"), [], "hit_at_10")
    assert pick_winner(base_only, "hit_at_10")["model"] == "mini"  # squad base 0.95 is best overall


def test_overfitting_flags():
    flags = overfitting_flags(trials_list(), "ir_recall_at_10")
    got = {(f["trial_id"], f["flag"]) for f in flags}
    # t4 (4 epochs, ends at 0.65) falls below the 2-epoch run t1 (0.74) and peaked at epoch 2
    assert ("t4", "below shorter run") in got
    assert ("t4", "peaked early") in got
    t4 = next(f for f in flags if f["trial_id"] == "t4" and f["flag"] == "below shorter run")
    assert t4["reference_epochs"] == 2 and t4["reference_score"] == pytest.approx(0.74)
    # t1 (2 epochs, 0.74) is above the 1-epoch run t2 (0.66): no flag
    assert not any(f["trial_id"] == "t1" for f in flags)
    # t6 has another lr (its own group, nothing shorter) but ends below the base model
    assert ("t6", "below base") in got and ("t6", "below shorter run") not in got
    # squad: below base and peaked at epoch 1
    assert ("t3", "below base") in got and ("t3", "peaked early") in got
    # FAILED trials are ignored
    assert not any(f["trial_id"] == "t5" for f in flags)
    assert overfitting_flags(trials_list(), "ir_recall_at_10", tolerance=0.5) == []


def test_verdict_lines():
    assert verdict(0.60, 0.72, None, "hit_at_10").startswith("Fine-tune")
    assert verdict(0.95, 0.94, None, "hit_at_10").startswith("Don't fine-tune")
    assert "already handles" in verdict(
        0.95, 0.96, {"train_hit_at_10": 0.97, "eval_hit_at_10": 0.95}, "hit_at_10"
    )
    assert verdict(0.95, None, None, "hit_at_10").startswith("Probably not")
    assert verdict(0.40, None, None, "hit_at_10").startswith("Worth trying")


def test_build_report_writes_files_and_rebuilds(tmp_path):
    trials = trials_list()
    (tmp_path / "trials.json").write_text(json.dumps(trials))
    rep = build_report(tmp_path, trials, results_frame(), {}, metric="hit_at_10")
    for key in ("leaderboard_md", "leaderboard_csv", "leaderboard_html", "results", "meta"):
        assert rep.files[key].exists() and rep.files[key].stat().st_size > 0
    names = sorted(p.name for p in rep.plots)
    assert names == ["best_combinations.png", "epochs_medquad.png", "epochs_squad.png"]
    for p in rep.plots:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = rep.files["leaderboard_md"].read_text()
    assert "Should you fine-tune? (medquad)" in md and "**Verdict:** Fine-tune" in md
    assert "**Verdict:** Don't fine-tune" in md  # squad
    assert "Overfitting flags (medquad)" in md and "t4" in md
    assert "mini-ft-e2-t1" in rep.files["leaderboard_html"].read_text()
    csv = pd.read_csv(rep.files["leaderboard_csv"])
    assert len(csv) == len(results_frame()) and "delta_hit_at_10" in csv
    assert rep.winner["model"] == "mini-ft-e2-t1"

    for p in rep.paths:
        if p.name != "results.csv":
            p.unlink()
    rebuilt = rebuild_report(tmp_path)
    assert all(p.exists() for p in rebuilt.paths)
    assert rebuilt.winner["model"] == "mini-ft-e2-t1" and rebuilt.winner["trial_id"] == "t1"
    assert pd.read_csv(rebuilt.files["leaderboard_csv"]).equals(csv)


def test_cli_report_rebuilds(tmp_path, capsys):
    from embedtune.cli import main

    build_report(tmp_path, trials_list(), results_frame(), {})
    (tmp_path / "report" / "leaderboard.md").unlink()
    assert main(["report", str(tmp_path)]) == 0
    assert (tmp_path / "report" / "leaderboard.md").exists()
    assert "leaderboard" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "missing")]) == 2
