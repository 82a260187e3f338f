"""Leaderboard, deltas, overfitting flags, verdicts and report files on hand-made inputs."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from paths import SHARED_DATA

from embedtune.records import HarmCheck, TrialRecord
from embedtune.report import build_report, rebuild_report
from embedtune.report.epochs import epoch_advice, overfitting_flags
from embedtune.report.leaderboard import leaderboard, pick_winner
from embedtune.report.verdict import verdict
from embedtune.rundir import RunDir


def _row(dataset, model, base, kind, qt, rr, h10, trial_id=None, epochs=None, mrr=None):
    return {
        "dataset": dataset,
        "model": model,
        "model_path": f"/nowhere/{model}",
        "base_model": base,
        "kind": kind,
        "trial_id": trial_id,
        "epochs": epochs,
        "query_type": qt,
        "reranker": rr,
        "hit_at_1": h10 / 2,
        "hit_at_5": h10 - 0.1,
        "hit_at_10": h10,
        "mrr_at_10": mrr if mrr is not None else h10 / 2,
        "ndcg_at_10": h10 * 0.6,
        "n_queries": 50,
        "seconds": 1.0,
    }


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
    # the evaluator reports both; with one answer per question a test may judge on either
    history = [{"epoch": 0, "metrics": {"ir_recall_at_10": base, "ir_mrr_at_10": base}}]
    history += [
        {"epoch": i + 1, "metrics": {"ir_recall_at_10": s, "ir_mrr_at_10": s}} for i, s in enumerate(scores)
    ]
    trained = history[1:]
    best = max(trained, key=lambda h: h["metrics"]["ir_recall_at_10"]) if trained else None
    return TrialRecord.from_dict(
        {
            "trial_id": tid,
            "config_hash": f"h-{tid}",
            "model": model,
            "model_label": model,
            "dataset": dataset,
            "epochs": epochs,
            "lr": lr,
            "batch_size": 32,
            "seed": 42,
            "warmup_ratio": 0.1,
            "status": status,
            "duration_s": 100.0 * epochs,
            "gpu_seconds": gpu,
            "epochs_done": len(scores),
            "history": history,
            "best_epoch": best["epoch"] if best else None,
            "best_metrics": best["metrics"] if best else {},
            "best_checkpoint": f"/ckpt/{tid}" if status != "FAILED" else None,
            "mlflow_run_id": None,
        }
    )


def _save_trials(run_dir, trials) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "trials.json").write_text(json.dumps([t.to_dict() for t in trials]))


def trials_list() -> list[TrialRecord]:
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
    _save_trials(tmp_path, trials)
    rep = build_report(RunDir(tmp_path), trials, results_frame(), {}, metric="hit_at_10")
    for key in ("leaderboard_md", "leaderboard_csv", "leaderboard_html", "results", "meta"):
        assert rep.files[key].exists() and rep.files[key].stat().st_size > 0
    names = sorted(p.name for p in rep.plots)
    assert names == [
        "best_combinations.png",
        "epochs_medquad.png",
        "epochs_squad.png",
        "quality_vs_throughput.png",
    ]
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
    rebuilt = rebuild_report(tmp_path, metric="hit_at_10")  # meta.json is gone: say the metric
    assert all(p.exists() for p in rebuilt.paths)
    assert rebuilt.winner["model"] == "mini-ft-e2-t1" and rebuilt.winner["trial_id"] == "t1"
    assert pd.read_csv(rebuilt.files["leaderboard_csv"]).equals(csv)


def test_time_line_is_stamped_on_a_built_report_once_and_survives_rebuild(tmp_path):
    from embedtune.clock import time_line
    from embedtune.report import report_with_timings

    trials = trials_list()
    _save_trials(tmp_path, trials)
    rundir = RunDir(tmp_path)
    rep = build_report(rundir, trials, results_frame(), {}, metric="hit_at_10")
    assert "**Time:**" not in rep.files["leaderboard_md"].read_text()  # not timed (yet): no line
    first = {"total_s": 70.0, "stages": {"data": 10.0, "trials": 50.0}, "skipped": {}}
    later = {
        "total_s": 75.0,
        "stages": {"data": 10.0, "trials": 0.0, "final": 60.0},
        "skipped": {"trials": "done"},
    }
    for timings in (first, later):  # stamped again: one line, the later one
        report_with_timings(rundir, rep.blocks, timings)
    md = rep.files["leaderboard_md"].read_text().splitlines()
    lines = [x for x in md if x.startswith("**Time:**")]
    assert lines == [f"**Time:** {time_line(later)}"] == [md[md.index("## Summary") + 2]]
    assert "1 min 15 s — data 10 s, final stage 1 min 0 s; other 5.0 s; skipped: trials (done)" in lines[0]
    assert f"<p><b>Time:</b> {time_line(later)}</p>" in rep.files["leaderboard_html"].read_text()
    meta = json.loads(rep.files["meta"].read_text())
    assert meta["timings"] == later and meta["metric"] == "hit_at_10"  # the rest of meta.json kept
    rebuilt = rebuild_report(tmp_path)
    assert lines[0] in rebuilt.files["leaderboard_md"].read_text().splitlines()


# encode cost per model (as evaluate_models reports it): the L3 base is 3x faster than MiniLM
COSTS = {
    "mini": ("openvino", 300.0, 384, 86.4),
    "mini-ft-e2-t1": ("openvino", 290.0, 384, 86.4),
    "mini-ft-e1-t2": ("openvino", 310.0, 384, 86.4),
    "l3": ("openvino", 900.0, 384, 66.0),
    "mini-ft-e3-t3": ("openvino", 305.0, 384, 86.4),
}


def _with_costs(frame: pd.DataFrame) -> pd.DataFrame:
    cols = ["encode_backend", "docs_per_s", "dim", "size_mb"]
    return frame.assign(
        **{c: [COSTS[m][i] for m in frame["model"]] for i, c in enumerate(cols)}, export_s=0.0
    )


def test_pareto_front_hand_checked():
    from embedtune.report.leaderboard import pareto_front

    # (docs/s, quality): b is beaten by a (faster and better); c and a and d trade speed for quality
    points = [(300.0, 0.72), (290.0, 0.60), (900.0, 0.50), (100.0, 0.80), (900.0, 0.45)]
    assert pareto_front(points) == [3, 0, 2]
    assert pareto_front([(1.0, 1.0)]) == [0]
    assert pareto_front([(1.0, 0.5), (1.0, 0.5)]) == [0, 1]  # ties dominate nothing


def test_report_has_encode_cost_columns_and_pareto_plot(tmp_path):
    trials = trials_list()
    _save_trials(tmp_path, trials)
    rep = build_report(RunDir(tmp_path), trials, _with_costs(results_frame()), {}, metric="hit_at_10")
    csv = pd.read_csv(rep.files["leaderboard_csv"])
    assert {"encode_backend", "docs_per_s", "dim", "size_mb", "export_s"} <= set(csv.columns)
    assert csv["docs_per_s"].between(1, 1e5).all() and (csv["dim"] == 384).all()
    assert csv["size_mb"].between(1, 1e4).all() and (csv["encode_backend"] == "openvino").all()
    md = rep.files["leaderboard_md"].read_text()
    header = next(line for line in md.splitlines() if line.startswith("| # |"))
    assert all(h in header for h in ("| encoder |", "| docs/s |", "| dim |", "| MB |"))
    l3_row = next(line for line in md.splitlines() if line.startswith("|") and "| l3 |" in line)
    assert "| openvino | 900 | 384 | 66.0 |" in l3_row
    # medquad vector search: mini-ft-e2-t1 is best (0.72); without per-query values there is no
    # interval, so no other model is within noise of it
    assert "**Cost:** the best model (vector search, hit_at_10) `mini-ft-e2-t1`" in md
    assert "docs/s" in rep.files["leaderboard_html"].read_text()
    plot = rep.report_dir / "plots" / "quality_vs_throughput.png"
    assert plot in rep.plots and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "plots/quality_vs_throughput.png" in md
    # a rebuild from the stored results keeps the costs
    rebuilt = rebuild_report(tmp_path)
    assert pd.read_csv(rebuilt.files["leaderboard_csv"])["docs_per_s"].tolist() == csv["docs_per_s"].tolist()


def test_cheapest_model_within_noise_of_the_best():
    from embedtune.report.leaderboard import cheapest_within_noise, leaderboard

    frame = _with_costs(results_frame())
    board = leaderboard(frame, trials_list(), "hit_at_10")
    rows = board[board["dataset"] == "medquad"]
    # without intervals the floor is the best score itself: the best is its own cheapest choice
    pick = cheapest_within_noise(rows, "hit_at_10")
    assert pick["best"]["model"] == pick["cheapest"]["model"] == "mini-ft-e2-t1"
    # with a wide interval on the best (down to 0.5), the 3x faster l3 base (0.50) is within noise
    rows = rows.assign(hit_at_10_lo=0.5)
    pick = cheapest_within_noise(rows, "hit_at_10")
    assert pick["best"]["model"] == "mini-ft-e2-t1" and pick["cheapest"]["model"] == "l3"
    assert (
        cheapest_within_noise(leaderboard(results_frame(), trials_list(), "hit_at_10"), "hit_at_10") is None
    )


def test_cli_report_rebuilds(tmp_path, capsys):
    from embedtune.cli import main

    build_report(RunDir(tmp_path), trials_list(), results_frame(), {})
    (tmp_path / "report" / "leaderboard.md").unlink()
    assert main(["report", str(tmp_path)]) == 0
    assert (tmp_path / "report" / "leaderboard.md").exists()
    assert "leaderboard" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "missing")]) == 2


# ---------------------------------------------------------------- confidence: intervals, paired tests, epochs


def results_with_queries(n: int = 400, seed: int = 0, independent=(), scores=None) -> pd.DataFrame:
    """results_frame() with per-query values: every row of a (dataset, query type, reranker) draws
    its queries from one shared latent difficulty, so a better row hits a superset of the queries
    (a paired difference) and an equal row the same ones; rows whose (model, query_type) is in
    `independent` get a shuffled copy of it (same scores, different queries). The latent is evenly
    spread over [0, 1], so a row's hit@10 is its nominal score exactly. `scores` overrides hit@10 of
    (model, query_type)."""
    rng = np.random.default_rng(seed)
    latent: dict[tuple, np.ndarray] = {}
    out = []
    for r in results_frame().to_dict("records"):
        q = (scores or {}).get((r["model"], r["query_type"]), r["hit_at_10"])
        key = (r["dataset"], r["query_type"], r["reranker"])
        u = latent.setdefault(key, rng.permutation((np.arange(n) + 0.5) / n))
        u = rng.permutation(u) if (r["model"], r["query_type"]) in independent else u
        per_query = {
            "hit_at_1": (u < q / 2).astype(float),
            "hit_at_5": (u < q - 0.1).astype(float),
            "hit_at_10": (u < q).astype(float),
            "mrr_at_10": np.where(u < q, 1 - u / 2, 0.0),
            "ndcg_at_10": np.where(u < q, 1 - u / 3, 0.0),
        }
        r.update({m: float(v.mean()) for m, v in per_query.items()})
        r["n_queries"] = n
        r["per_query"] = {m: v.tolist() for m, v in per_query.items()}
        out.append(r)
    return pd.DataFrame(out)


METRIC_COLS = ["hit_at_1", "hit_at_5", "hit_at_10", "mrr_at_10", "ndcg_at_10"]


def test_leaderboard_intervals_and_paired_tests():
    res = results_with_queries(independent={("mini-ft-e1-t2", "hybrid")})
    board = leaderboard(res, trials_list(), "hit_at_10")
    assert "per_query" not in board
    for m in METRIC_COLS:
        assert (board[f"{m}_lo"] <= board[m]).all() and (board[m] <= board[f"{m}_hi"]).all()
        assert (board[f"{m}_hi"] - board[f"{m}_lo"] > 0.01).all()  # 400 queries: no point intervals
    get = board.set_index(["dataset", "model", "query_type", "reranker"])
    gain = get.loc[("medquad", "mini-ft-e2-t1", "vector", "none")]  # +0.12 on the same queries
    assert gain["p_hit_at_10"] < 0.01 and gain["p_mrr_at_10"] < 0.01 and gain["p_ndcg_at_10"] < 0.01
    assert bool(gain["significant"]) and gain["vs_base"] == "real gain"
    loss = get.loc[("medquad", "mini-ft-e1-t2", "vector", "none")]  # -0.05 on the same queries
    assert loss["p_hit_at_10"] < 0.01 and loss["vs_base"] == "real loss"
    noise = get.loc[("medquad", "mini-ft-e1-t2", "hybrid", "rrf")]  # -0.02, other queries
    assert noise["p_hit_at_10"] > 0.05 and not bool(noise["significant"]) and noise["vs_base"] == "noise"
    same = leaderboard(res, [], "hit_at_10")  # no trial records: still tested against the base rows
    base = same[same["kind"] == "base"]
    assert base["p_hit_at_10"].isna().all() and (base["vs_base"] == "").all()  # no test of a base row
    # a tuned row that is its base model over again: p = 1, noise
    twin = res[(res["model"] == "mini") & (res["dataset"] == "medquad")].assign(
        model="mini-twin", kind="tuned", trial_id="tw", epochs=1
    )
    b2 = leaderboard(pd.concat([res, twin], ignore_index=True), [], "hit_at_10")
    tw = b2[b2["model"] == "mini-twin"]
    for m in METRIC_COLS:
        assert (tw[f"p_{m}"] == 1.0).all()
    assert (tw["vs_base"] == "noise").all()


def test_leaderboard_without_per_query_values_has_blank_intervals():
    board = leaderboard(results_frame(), trials_list(), "hit_at_10")
    for m in METRIC_COLS:
        assert board[f"{m}_lo"].isna().all() and board[f"p_{m}"].isna().all()
    assert board["significant"].isna().all() and (board["vs_base"] == "").all()


def test_best_and_last_epoch_columns_from_the_trial_records():
    board = leaderboard(results_frame(), trials_list(), "hit_at_10")
    get = board.set_index(["dataset", "model", "query_type", "reranker"])
    t3 = get.loc[("squad", "mini-ft-e3-t3", "vector", "none")]  # peaked at epoch 1, ran 3
    assert (t3["best_epoch"], t3["last_epoch"]) == (1, 3)
    assert t3["best_epoch_score"] == pytest.approx(0.93) and t3["last_epoch_score"] == pytest.approx(0.91)
    t1 = get.loc[("medquad", "mini-ft-e2-t1", "vector", "none")]
    assert (t1["best_epoch"], t1["last_epoch"], t1["best_epoch_score"]) == (2, 2, pytest.approx(0.74))
    assert get.loc[("medquad", "mini", "vector", "none")][["best_epoch", "last_epoch"]].isna().all()


def test_epoch_advice_names_a_best_only_beyond_noise():
    # 2 epochs (0.72) beats 1 epoch (0.55) on the same queries: named best
    (named,) = epoch_advice(results_with_queries(), "hit_at_10")["medquad"]
    assert named["named_best"] and named["best_epochs"] == named["recommended_epochs"] == 2
    assert "best epoch count **2**" in named["text"] and named["comparisons"][0]["p"] < 0.01
    # 2 epochs 0.72 vs 1 epoch 0.71 on other queries: noise, so the cheaper 1 epoch is recommended
    close = results_with_queries(
        independent={("mini-ft-e1-t2", "vector")}, scores={("mini-ft-e1-t2", "vector"): 0.71}
    )
    (adv,) = epoch_advice(close, "hit_at_10")["medquad"]
    assert not adv["named_best"] and adv["best_epochs"] == 2 and adv["recommended_epochs"] == 1
    assert "within noise" in adv["text"] and "**1 epoch**" in adv["text"]
    # without per-query values nothing is named
    (plain,) = epoch_advice(results_frame(), "hit_at_10")["medquad"]
    assert not plain["named_best"] and "unknown" in plain["text"]
    (single,) = epoch_advice(results_frame(), "hit_at_10")["squad"]
    assert "only checkpoints at 3 epochs" in single["text"]


def test_report_with_per_query_values_round_trips(tmp_path):
    trials = trials_list()
    _save_trials(tmp_path, trials)
    res = results_with_queries(independent={("mini-ft-e1-t2", "hybrid")})
    rep = build_report(RunDir(tmp_path), trials, res, {}, metric="hit_at_10")
    md = rep.files["leaderboard_md"].read_text()
    gains = next(line for line in md.splitlines() if line.startswith("- Real gains (p < 0.05):"))
    assert "`mini-ft-e2-t1` vector/none +0.120 (p<0.001)" in gains and "hybrid/rrf +0.050" in gains
    assert "Real losses (p < 0.05): `mini-ft-e1-t2` vector/none -0.050" in md
    assert "Noise (p ≥ 0.05" in md and "`mini-ft-e1-t2` hybrid/rrf -0.020" in md
    assert "| real gain |" in md and "| noise |" in md
    assert "0.720 [" in md and "(p<0.001)" in md  # score with its interval, delta with its p-value
    assert "### Epochs (medquad)" in md and "best epoch count **2**" in md
    assert "1 (0.930) | 3 (0.910)" in md  # squad's t3: best epoch 1, last epoch 3 (sweep metric)
    page = rep.files["leaderboard_html"].read_text()
    assert "Real gains" in page and "<b>2</b>" in page
    stored = pd.read_csv(rep.files["results"])
    assert "per_query" not in stored and (tmp_path / "report" / "per_query.parquet").exists()
    csv = pd.read_csv(rep.files["leaderboard_csv"])
    assert {"hit_at_10_lo", "hit_at_10_hi", "p_hit_at_10", "significant", "vs_base", "best_epoch"} <= set(csv)
    meta = json.loads(rep.files["meta"].read_text())
    assert meta["epoch_advice"]["medquad"][0]["recommended_epochs"] == 2

    rebuilt = rebuild_report(tmp_path)  # from results.csv + per_query.parquet only
    assert pd.read_csv(rebuilt.files["leaderboard_csv"]).equals(csv)
    assert rebuilt.files["leaderboard_md"].read_text() == md

    # an old run: results.csv without the sidecar still reports, with blank intervals
    (tmp_path / "report" / "per_query.parquet").unlink()
    old = rebuild_report(tmp_path)
    assert old.leaderboard["hit_at_10_lo"].isna().all()
    assert "No per-query results stored" in old.files["leaderboard_md"].read_text()


# ---------------------------------------------------------------- already seen / do no harm


def test_normalized_exact_and_embedding_near_duplicates():
    from embedtune.report.probe import near_duplicates, normalize_question

    assert normalize_question("  What is   Anemia?? ") == "what is anemia"
    train = [
        "What are the symptoms of anemia?",
        "Who wrote the play Hamlet?",
        "How is type 2 diabetes treated?",
    ]
    evals = [
        "what are the SYMPTOMS of anemia",
        "Who was the writer of the play Hamlet?",
        "When did Rome fall?",
    ]
    # hand-made unit vectors: eval 1 is 0.98 from train 1 (a paraphrase), eval 2 is unrelated
    t = np.eye(3)
    e = np.array([[0.3, 0.0, 0.954], [0.0, 0.98, 0.199], [0.0, 0.0, 0.0]])
    e[2] = [0.577, -0.577, -0.577]
    got = near_duplicates(evals, train, e, t, threshold=0.95)
    assert got["n_exact_dups"] == 1 and got["exact_dup_rate"] == pytest.approx(1 / 3)
    assert got["n_near_dups"] == 2 and got["near_dup_rate"] == pytest.approx(2 / 3)
    assert [x["eval"] for x in got["dup_examples"]] == [evals[1]]  # exact ones are not listed as examples
    assert near_duplicates(["Who is the queen of Spain?"], train)["n_near_dups"] == 0


def test_near_duplicates_with_the_base_model_finds_planted_ones():
    """all-MiniLM-L6-v2 embeddings: planted paraphrases (cosine ~0.98) and a normalised exact copy are
    found; related but different questions (same topic, other entity) are not."""
    from sentence_transformers import SentenceTransformer

    from embedtune.models import resolve_model
    from embedtune.report.probe import near_duplicates

    train = [
        "What are the symptoms of anemia?",
        "How is type 2 diabetes treated?",
        "Who wrote the play Hamlet?",
        "What is the capital city of France?",
        "How many people live in Tokyo?",
    ]
    planted = [
        "what are the SYMPTOMS of anemia",
        "Who was the writer of the play Hamlet?",
        "How is type 2 diabetes usually treated?",
    ]
    unrelated = [
        "When did the Western Roman Empire fall?",
        "What causes migraines in children?",
        "What is the capital of Germany?",
    ]
    model = SentenceTransformer(str(resolve_model("all-MiniLM-L6-v2")), device="cpu")

    def enc(x):
        return model.encode(x, normalize_embeddings=True, convert_to_numpy=True)

    got = near_duplicates(planted + unrelated, train, enc(planted + unrelated), enc(train))
    assert got["n_exact_dups"] == 1 and got["n_near_dups"] == 3
    assert {x["eval"] for x in got["dup_examples"]} == set(planted[1:])
    assert near_duplicates(unrelated, train, enc(unrelated), enc(train))["n_near_dups"] == 0


def test_model_card_parser_finds_squad_in_minilm_card():
    from embedtune.models import resolve_model
    from embedtune.report.probe import card_datasets, card_matches

    names = card_datasets(resolve_model("all-MiniLM-L6-v2"))
    assert "SQuAD2.0" in names and "gooaq" in names and "ms_marco" in names
    assert card_matches(names, ["squad", "squad-sample"]) == ["SQuAD2.0"]
    assert card_matches(names, ["x", "/data/squad_v1.1/squad_train_pairs.jsonl.gz"]) == ["SQuAD2.0"]
    assert card_matches(names, ["gooaq", "hf:sentence-transformers/gooaq"]) == ["gooaq"]
    assert card_matches(names, ["medquad", "medquad-sample"]) == []
    assert card_matches(names, ["scifact", str(SHARED_DATA / "scifact")]) == []  # a source given as a path


def test_card_datasets_without_a_card(tmp_path):
    from embedtune.report.probe import card_datasets

    assert card_datasets(tmp_path) == []
    (tmp_path / "README.md").write_text("---\nlicense: mit\ndatasets:\n  - squad\n  - 'gooaq'\n---\n# x\n")
    assert card_datasets(tmp_path) == ["squad", "gooaq"]


def test_seen_verdict_lines():
    from embedtune.report.probe import seen_verdict

    assert seen_verdict(None) is None
    seen = seen_verdict(
        {
            "card_matches": ["SQuAD2.0"],
            "card_datasets": ["SQuAD2.0"],
            "train_hit_at_10": 0.97,
            "eval_hit_at_10": 0.95,
            "near_dup_rate": 0.02,
            "exact_dup_rate": 0.0,
        }
    )
    assert seen.startswith("Already seen: likely") and "SQuAD2.0" in seen and "0.97 vs eval 0.95" in seen
    assert "2.0% of eval questions near-duplicate" in seen
    fresh = seen_verdict(
        {
            "card_datasets": ["gooaq"],
            "card_matches": [],
            "train_hit_at_10": 0.55,
            "eval_hit_at_10": 0.50,
            "near_dup_rate": 0.0,
            "exact_dup_rate": 0.0,
        }
    )
    assert fresh.startswith("Already seen: no sign of it")
    dup = seen_verdict(
        {"train_hit_at_10": 0.5, "eval_hit_at_10": 0.5, "near_dup_rate": 0.2, "exact_dup_rate": 0.1}
    )
    assert dup.startswith("Already seen: likely") and "20%" in dup and "no model card" not in dup


def test_seen_verdict_does_not_confuse_easy_with_seen():
    """An easy set the model cannot have seen scores high on train and eval questions alike (the
    held-out case of the issue: 0.97 train vs 0.99 eval): no sign. Training questions answered
    better than held-out ones beyond noise: likely seen."""
    from embedtune.report.probe import gap_interval, seen_verdict

    easy = {"card_datasets": ["gooaq"], "card_matches": [], "near_dup_rate": 0.0, "exact_dup_rate": 0.0}
    gap, lo, hi = gap_interval([1.0] * 97 + [0.0] * 3, [1.0] * 99 + [0.0] * 1)
    assert gap < 0 and lo < 0 < hi
    line = seen_verdict({**easy, "train_hit_at_10": 0.97, "eval_hit_at_10": 0.99, "gap_lo": lo, "gap_hi": hi})
    assert line.startswith("Already seen: no sign of it") and "[-" in line
    gap, lo, hi = gap_interval([1.0] * 95 + [0.0] * 5, [1.0] * 60 + [0.0] * 40)
    assert lo > 0
    line = seen_verdict({**easy, "train_hit_at_10": 0.95, "eval_hit_at_10": 0.60, "gap_lo": lo, "gap_hi": hi})
    assert line.startswith("Already seen: likely") and "beyond noise" in line


def _harm(run_dir, winner="mini-ft-e2-t1", flag="harm"):
    rows = [
        {
            "dataset": "medquad",
            "ood": "scifact",
            "ood_source": "/x/scifact",
            "base_model": "mini",
            "winner": winner,
            "base_score": 0.8,
            "winner_score": 0.6,
            "delta": -0.2,
            "ci_low": -0.3,
            "ci_high": -0.1,
            "p_value": 0.001,
            "band": 0.05,
            "n_queries": 100,
            "flag": flag,
        }
    ]
    return HarmCheck.from_dict(
        {"metric": "hit_at_10", "alpha": 0.05, "test": "exact McNemar", "rows": rows, "hits": {}}
    )


def test_do_no_harm_section_is_written_and_survives_rebuild(tmp_path):
    trials = trials_list()
    _save_trials(tmp_path, trials)
    rep = build_report(RunDir(tmp_path), trials, results_frame(), {}, harm=_harm(tmp_path))
    md = rep.files["leaderboard_md"].read_text()
    assert "### Do no harm (medquad)" in md and "**Harm:** `mini-ft-e2-t1` loses on scifact" in md
    row = "| scifact | mini | 0.8000 | mini-ft-e2-t1 | 0.6000 | -0.2000 | [-0.3000, -0.1000] | 0.001 | 100 | harm |"
    assert row in md
    assert "Do no harm (squad)" not in md  # squad's winner was not checked
    assert "Do no harm (medquad)" in rep.files["leaderboard_html"].read_text()
    assert rep.files["harm"].name == "harm.json" and rep.harm.rows[0].flag == "harm"
    for p in rep.paths:
        if p.name not in ("results.csv", "harm.json"):
            p.unlink()
    rebuilt = rebuild_report(tmp_path)
    assert rebuilt.files["leaderboard_md"].read_text() == md

    stale = _harm(tmp_path, winner="mini-ft-e1-t2")  # a check of a model that is not the winner: dropped
    again = build_report(RunDir(tmp_path), trials, results_frame(), {}, harm=stale)
    assert "Do no harm" not in again.files["leaderboard_md"].read_text()


def test_forgetting_line_from_an_older_store_without_intervals_says_cannot_tell(tmp_path):
    """harm.json written before hit@10 intervals were kept (no hit_at_10_* keys): a rebuild still
    reads it, and the summary does not claim "no loss" it cannot back: "cannot tell (no interval
    stored)"."""
    trials = trials_list()
    _save_trials(tmp_path, trials)
    build_report(RunDir(tmp_path), trials, results_frame(), {}, harm=_harm(tmp_path, flag=""))
    old = _harm(tmp_path, flag="").to_dict()
    old["metric"] = "mrr_at_10"
    old["rows"] = [{k: v for k, v in r.items() if not k.startswith("hit_at_10")} for r in old["rows"]]
    old["rows"][0].update(
        delta=-0.002, ci_low=-0.004, ci_high=0.001, p_value=0.5
    )  # tight: would pass on its own
    (RunDir(tmp_path).report_dir / "harm.json").write_text(json.dumps(old))
    md = rebuild_report(tmp_path).files["leaderboard_md"].read_text()
    line = next(x for x in md.splitlines() if "**Forgetting**" in x)
    assert (
        "scifact −0.2 [−0.4, +0.1] mrr_at_10, n/a [no interval stored] hit@10 (100 questions, p=0.500): "
        "cannot tell (no interval stored)." in line
    )
    assert "no significant loss" not in md and "no loss beyond" not in line


def test_already_seen_line_from_a_stored_probe(tmp_path):
    """The "Should you fine-tune?" section shows the already-seen verdict and its numbers from the
    probe cache alone (no model, no data: what `embedtune report` has)."""
    probe = {
        "train_hit_at_10": 0.97,
        "eval_hit_at_10": 0.95,
        "near_dup_rate": 0.04,
        "exact_dup_rate": 0.01,
        "dup_threshold": 0.95,
        "card_datasets": ["SQuAD2.0", "gooaq"],
        "card_matches": ["SQuAD2.0"],
    }
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "probe.json").write_text(json.dumps({"squad|mini||200|gap": probe}))
    rep = build_report(RunDir(tmp_path), trials_list(), results_frame(), {})
    md = rep.files["leaderboard_md"].read_text()
    assert "**Already seen: likely — its model card lists SQuAD2.0 among its training data" in md
    assert "| 4.0% | 1.0% | SQuAD2.0 |" in md  # near-dup, exact-dup, card columns of the probe table
    assert "its model card lists SQuAD2.0 in its training data" in rep.verdicts["squad"]["verdict"]
    assert rep.verdicts["medquad"]["seen"] is None  # no probe for medquad


def test_probe_counts_planted_duplicates(small_data):
    """fine_tune_probe on real data with eval questions replaced by (normalised / paraphrased)
    copies of train questions: the exact and near-duplicate counts find them."""
    from dataclasses import replace

    from embedtune.models import resolve_model
    from embedtune.report.probe import fine_tune_probe

    qids = sorted(small_data.queries)[:40]
    train_q = list(dict.fromkeys(q for q, _ in small_data.train))
    queries = {q: small_data.queries[q] for q in qids}
    queries[qids[0]] = train_q[0].upper().rstrip("?") + " ?"  # exact after normalising
    queries[qids[1]] = "  " + train_q[1].lower()  # exact after normalising
    data = replace(small_data, queries=queries, relevant={q: small_data.relevant[q] for q in qids})
    probe = fine_tune_probe(data, str(resolve_model("paraphrase-MiniLM-L3-v2")), sample=40)
    assert probe["n_exact_dups"] == 2 and probe["exact_dup_rate"] == pytest.approx(2 / 40)
    assert probe["n_near_dups"] >= 2 and probe["n_train_questions"] == len(train_q)
    clean = fine_tune_probe(small_data, str(resolve_model("paraphrase-MiniLM-L3-v2")), sample=40)
    assert clean["n_exact_dups"] == 0  # the split is leak-free


def test_verdict_does_not_call_a_gain_within_noise_a_reason_to_fine_tune() -> None:
    from embedtune.report.verdict import verdict

    noisy = verdict(0.96, 0.993, None, "hit_at_10", p_value=0.062)
    assert noisy.startswith("Promising, not proven") and "+3.3 points" in noisy and "p=0.062" in noisy
    real = verdict(0.80, 0.90, None, "hit_at_10", p_value=0.0004)
    assert real.startswith("Fine-tune:") and "real gain" in real
    assert verdict(0.80, 0.90, None, "hit_at_10").startswith(
        "Fine-tune:"
    )  # without a stored test: no words on noise


@pytest.mark.slow
@pytest.mark.parametrize(
    ("source", "expected"),
    [("squad-sample", "Already seen: likely"), ("medquad-sample", "Already seen: no sign of it")],
)
def test_seen_verdict_on_real_data_both_sides(source: str, expected: str) -> None:
    """The real probe with the real base model: SQuAD (all-MiniLM-L6-v2 was trained on it, its card
    says so) is called seen; the MedQuAD sample (not on the card, no near-duplicates, and no better
    on training questions than on held-out ones) is not, however easy it is."""
    from embedtune.data import prepare
    from embedtune.models import resolve_model
    from embedtune.report.probe import card_datasets, card_matches, fine_tune_probe, seen_verdict
    from embedtune.specs import DataSpec

    data = prepare(DataSpec(source=source, max_pairs=600, eval_size=200))
    path = resolve_model("all-MiniLM-L6-v2")
    probe = fine_tune_probe(data, str(path), sample=200)
    names = card_datasets(path)
    probe |= {"card_datasets": names, "card_matches": card_matches(names, [data.label, source])}
    line = seen_verdict(probe)
    assert line.startswith(expected), line
    assert probe["gap_lo"] <= probe["gap"] <= probe["gap_hi"]


def test_overall_winner_is_the_largest_gain_not_the_easiest_dataset():
    """The registry's winner across datasets: an easy dataset's small gain at a high raw score
    (SQuAD in the default run: +0.020 at 0.940) must not beat a hard one's large gain (MedQuAD:
    +0.081 at 0.919); within one dataset the metric decides as before."""
    from embedtune.report.build import overall_winner

    med = {"model": "med-ft", "kind": "tuned", "mrr_at_10": 0.919, "delta_mrr_at_10": 0.081}
    squad = {"model": "squad-ft", "kind": "tuned", "mrr_at_10": 0.940, "delta_mrr_at_10": 0.020}
    assert overall_winner(None, {"medquad": med, "squad": squad}, "mrr_at_10")["model"] == "med-ft"
    worse = {**med, "delta_mrr_at_10": -0.01}
    assert overall_winner(None, {"medquad": worse, "squad": squad}, "mrr_at_10")["model"] == "squad-ft"


def test_dataset_sources_from_the_stored_spec_and_a_broken_one_is_a_warning(tmp_path, caplog):
    """The sources come from the run's spec.json; one that does not validate costs the report only
    its sources (a warning naming the file and the problem), and no spec at all is no warning."""

    from specs import tiny_spec

    from embedtune.report import dataset_sources
    from embedtune.rundir import SPEC

    rundir = RunDir(tmp_path / "run")
    assert dataset_sources(rundir) == {} and not caplog.records
    rundir.write_json(SPEC, tiny_spec("s"))
    assert dataset_sources(rundir) == {"medquad": ["medquad-sample"]}
    rundir.write_json(SPEC, {**tiny_spec("s"), "models": []})
    with caplog.at_level("WARNING", logger="embedtune.report.build"):
        assert dataset_sources(rundir) == {}
    assert "spec.json: models: " in caplog.text


def test_full_grid_folds_full_text_rows_without_model_columns_and_numbers_rows_consecutively():
    """Full-text rows are the same for every model: shown once, with no model's encoder, speed, size
    or training in them, and the rows after the folded ones numbered on without a gap."""
    from embedtune.report.render import TABLE, leaderboard_table

    frame = results_frame()
    fts = [
        _row("medquad", m, base, kind, "fts", "none", 0.58, tid, ep)
        for m, base, kind, tid, ep in [
            ("mini", "mini", "base", None, None),
            ("mini-ft-e2-t1", "mini", "tuned", "t1", 2),
            ("mini-ft-e1-t2", "mini", "tuned", "t2", 1),
            ("l3", "l3", "base", None, None),
        ]
    ]
    frame = _with_costs(pd.concat([frame, pd.DataFrame(fts)], ignore_index=True))
    board = leaderboard(frame, trials_list(), metric="hit_at_10")
    rows = board[board["dataset"] == "medquad"]
    assert len(rows) == 12 and (rows["query_type"] == "fts").sum() == 4
    shown = leaderboard_table(rows, "hit_at_10").rows
    cols = [c for c, _, _ in TABLE]
    assert len(shown) == 9  # 8 model rows and one full-text row
    assert [r[cols.index("rank")] for r in shown] == [str(i) for i in range(1, 10)]
    (full_text,) = [r for r in shown if r[cols.index("query_type")] == "fts"]
    assert full_text[cols.index("model")] == "full-text (any model)"
    for col in ("encode_backend", "docs_per_s", "dim", "size_mb", "epochs", "training_s", "kind"):
        assert full_text[cols.index(col)] == "—", (col, full_text)
    assert full_text[cols.index("hit_at_10")].startswith("0.5800")
    l3 = next(r for r in shown if r[cols.index("model")] == "l3")
    assert [l3[cols.index(c)] for c in ("encode_backend", "docs_per_s", "dim", "size_mb")] == [
        "openvino", "900", "384", "66.0"
    ]  # fmt: skip
