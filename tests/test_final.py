"""Final stage: picking checkpoints (pure), MLflow logging and registry, `embedtune evaluate` end to end."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from embedtune.final.pick import epoch_entries, pick_models
from embedtune.records import ModelEntry, TrialRecord
from embedtune.rundir import RunDir
from embedtune.specs import DataSpec, EvalSpec, FinalSpec


def _trial(tid, model, dataset, history, status="FINISHED", ckpt=True, epochs=None):
    m = "ir_mrr_at_10"  # the headline metric's trial name (pick_models' default)
    hist = [{"epoch": 0, "metrics": {m: 0.5}}]
    hist += [{"epoch": i + 1, "metrics": {m: s}} for i, s in enumerate(history)]
    trained = hist[1:]
    best = max(trained, key=lambda h: (h["metrics"][m], -h["epoch"])) if trained else None
    return TrialRecord.from_dict(
        {
            "trial_id": tid,
            "config_hash": f"h-{tid}",
            "model": model,
            "model_label": model.split("/")[-1],
            "dataset": dataset,
            "epochs": epochs or len(history),
            "lr": 2e-5,
            "batch_size": 32,
            "warmup_ratio": 0.1,
            "seed": 42,
            "status": status,
            "duration_s": 10.0,
            "gpu_seconds": None,
            "epochs_done": len(history),
            "history": hist,
            "best_epoch": best["epoch"] if best else None,
            "best_metrics": best["metrics"] if best else {},
            "best_checkpoint": f"/ckpt/{tid}/model" if ckpt else None,
            "mlflow_run_id": None,
        }
    )


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

    from embedtune.final.registry import log_report
    from embedtune.report import build_report

    uri, client, parent = _store(tmp_path)
    rep = build_report(RunDir(tmp_path / "run"), trials_list(), results_frame(), {}, metric="hit_at_10")
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
    from embedtune.data import prepare

    return prepare(DataSpec(source="medquad-sample", eval_size=60, max_pairs=300))


@pytest.mark.slow
def test_final_stage_registers_the_winner(tmp_path, small_data):
    """run_final_stage without Ray: a fake trial whose 'checkpoint' is a copy of the L3 base model."""
    from embedtune.final import run_final_stage
    from embedtune.models import resolve_model

    uri, client, parent = _store(tmp_path)
    run_dir = tmp_path / "run"
    ckpt = tmp_path / "ckpt" / "model"
    shutil.copytree(resolve_model("paraphrase-MiniLM-L3-v2"), ckpt)
    trial = _trial("t1", "paraphrase-MiniLM-L3-v2", small_data.label, [0.6, 0.7])
    trial.best_checkpoint = str(ckpt)
    run_dir.mkdir()
    (run_dir / "trials.json").write_text(json.dumps([trial.to_dict()]))
    spec = FinalSpec(
        eval=EvalSpec(query_types=["vector", "hybrid"], rerankers=["none", "rrf"]),
        cross_encoder=None,
        register_name="embedtune-test",
        probe_size=40,
    )
    result = run_final_stage(
        RunDir(run_dir),
        [trial],
        {small_data.label: small_data},
        {},
        ["paraphrase-MiniLM-L3-v2"],
        spec,
        parent,
        uri,
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
    # one probe, of the base model (not the tuned checkpoint) on this data, at probe_size questions
    assert list(probe) == [f"{small_data.label}|paraphrase-MiniLM-L3-v2|{small_data.fingerprint}|40|gap"]
    (entry,) = probe.values()
    assert entry["model_path"] == str(resolve_model("paraphrase-MiniLM-L3-v2"))
    assert entry["n_eval"] == 40 and entry["n_train"] == 40
    # hit@10 is a share of those questions, and the gap is train minus eval
    for side in ("train", "eval"):
        hits = entry[f"{side}_hit_at_10"] * entry[f"n_{side}"]
        assert hits == pytest.approx(round(hits)), (side, entry)
    assert entry["gap"] == pytest.approx(entry["train_hit_at_10"] - entry["eval_hit_at_10"])
    assert entry["gap_lo"] <= entry["gap"] <= entry["gap_hi"]
    # every pass after training ran on final.encode_backend (auto: openvino on this CPU), with its cost
    import pandas as pd

    results = pd.read_csv(run_dir / "report" / "results.csv")
    assert set(results["encode_backend"]) == {"openvino"} and entry["encode_backend"] == "openvino"
    assert (results["docs_per_s"] > 1).all() and (results["dim"] == 384).all()
    assert results["size_mb"].between(10, 200).all()
    assert (run_dir / "report" / "plots" / "quality_vs_throughput.png").exists() and "| docs/s |" in md

    # the registered model loads back and embeds
    import mlflow

    from embedtune.tracking.client import fluent_uri

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
    # Vector search with and without the cross-encoder trained here (hybrid fusion: test_evaluate).
    argv = [
        "evaluate",
        "--models",
        "all-MiniLM-L6-v2",
        "paraphrase-MiniLM-L3-v2",
        "--data",
        "medquad-sample",
        "--eval-size",
        "40",
        "--max-pairs",
        "200",
        "--out",
        str(out),
        "--probe-size",
        "20",
        "--overfetch",
        "1",
        "--query-types",
        "vector",
        # PyTorch on short inputs: the CLI's path is the point here (the backends: test_encode)
        "--encode-backend",
        "torch",
        "--max-seq-length",
        "96",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "leaderboard" in printed and "best:" in printed
    import pandas as pd

    board = pd.read_csv(out / "report" / "leaderboard.csv")
    assert set(board["model"]) == {"all-MiniLM-L6-v2", "paraphrase-MiniLM-L3-v2"}
    assert set(board["kind"]) == {"base"}
    combos = set(zip(board["query_type"], board["reranker"], strict=True))
    # the cross-encoder trained here is checked on held-back training questions first: scored only
    # where it improves the bi-encoder's ordering, and the page says which way it went, with numbers
    (gate,) = json.loads((out / "report" / "meta.json").read_text())["reranker_gates"]
    assert gate["dataset"] == "medquad-sample" and gate["n_questions"] >= 10
    assert gate["used"] == (gate["reranked"] > gate["retrieved"])
    ce = {("vector", "cross-encoder")} if gate["used"] else set()
    assert combos == {("vector", "none")} | ce
    assert gate["line"] in (out / "report" / "leaderboard.md").read_text()
    assert (board["n_queries"] == 40).all()
    assert (board["delta_mrr_at_10"] == 0).all()
    assert (out / "report" / "plots" / "best_combinations.png").exists()
    assert (out / "data" / "medquad-sample.json").exists()
    md = (out / "report" / "leaderboard.md").read_text()
    assert "Should you fine-tune? (medquad-sample)" in md
    # the stored results rebuild the same leaderboard
    assert main(["report", str(out)]) == 0
    assert pd.read_csv(out / "report" / "leaderboard.csv").equals(board)


# ---------------------------------------------------------------- do no harm

SCIFACT = "scifact-sample"  # shipped: 300 claims, 1,000 abstracts


def test_harm_flag_logic_on_synthetic_hits():
    import numpy as np

    from embedtune.final.harm import harm_check

    rng = np.random.default_rng(0)
    base = (rng.random(300) < 0.8).astype(float)
    same = harm_check(base, base, metric="hit_at_10")
    assert same["flag"] == "" and same["delta"] == 0 and same["p_value"] == 1.0
    harmed = base.copy()
    harmed[np.flatnonzero(base)[:60]] = 0  # loses 60 of ~240 hits
    got = harm_check(base, harmed, metric="hit_at_10")
    assert got["flag"] == "harm" and got["delta"] == pytest.approx(-0.2) and got["p_value"] < 0.001
    assert got["ci_low"] < got["delta"] < got["ci_high"] < 0
    one = base.copy()
    one[np.flatnonzero(base)[0]] = 0  # one query lost, one gained elsewhere: noise
    one[np.flatnonzero(base == 0)[:2]] = 1
    assert harm_check(base, one, metric="hit_at_10")["flag"] == ""
    better = np.ones_like(base)
    assert harm_check(base, better, metric="hit_at_10")["flag"] == ""  # a significant gain is no harm
    with pytest.raises(Exception, match="same queries"):
        harm_check(base, base[:10], metric="hit_at_10")


def _forgetting_row(ood, base, winner, base_hit, winner_hit):
    """A HarmRow from the real paired check (headline mrr_at_10 and hit@10 over the same queries)."""
    from embedtune.final.harm import harm_check
    from embedtune.records import HarmRow

    check = harm_check(base, winner, metric="mrr_at_10", base_hit_at_10=base_hit, winner_hit_at_10=winner_hit)
    return HarmRow(dataset="medquad", ood=ood, ood_source=ood, base_model="b", winner="w", **check)


def test_forgetting_line_gives_points_intervals_and_a_verdict_that_can_say_cannot_tell():
    """Each OOD set: change in points with its 95% paired interval on MRR@10 and hit@10, the number
    of questions, and "harm" (significant drop), "cannot tell" (interval reaches below −1 point) or
    "no loss beyond 1 point" (whole interval above −1 point)."""
    import numpy as np

    from embedtune.report.render import forgetting_line, points

    rng = np.random.default_rng(0)
    ranks = np.array([1.0, 0.5, 1 / 3, 0.25, 0.0])  # reciprocal ranks (0: not in the top 10)
    # Clearly harmful: 1,000 questions, a fifth of them lose their answer entirely.
    base = rng.choice(ranks, 1000)
    worse = base.copy()
    worse[:200] = 0.0
    harmed = _forgetting_row("scifact", base, worse, (base > 0) * 1.0, (worse > 0) * 1.0)
    assert harmed.flag == "harm" and harmed.ci_high < -0.01 and harmed.hit_at_10_ci_high < -0.01
    assert harmed.forgetting("mrr_at_10") == "harm"
    # Tiny set, small non-significant drop: 20 questions, one answer falls from rank 1 to rank 2.
    tiny_base = np.array([1.0, 0.5, 1 / 3, 0.25, 0.0] * 4)
    tiny_win = tiny_base.copy()
    tiny_win[0] = 0.5
    tiny = _forgetting_row("tiny-ood", tiny_base, tiny_win, (tiny_base > 0) * 1.0, (tiny_win > 0) * 1.0)
    assert tiny.flag == "" and tiny.p_value > 0.05 and tiny.delta == pytest.approx(-0.025)
    assert tiny.ci_low < -0.01  # the interval cannot rule out a 1-point loss
    assert tiny.forgetting("mrr_at_10") == "cannot tell"
    # Large set, tight interval around 0: 5,000 questions, 25 move up a rank and 25 down.
    big_base = rng.choice(ranks[:4], 5000)
    big_win = big_base.copy()
    up, down = np.flatnonzero(big_base == 0.5)[:25], np.flatnonzero(big_base == 1.0)[:25]
    big_win[up], big_win[down] = 1.0, 0.5
    big = _forgetting_row("big-ood", big_base, big_win, (big_base > 0) * 1.0, (big_win > 0) * 1.0)
    assert big.delta == pytest.approx(0) and -0.01 < big.ci_low < 0 < big.ci_high < 0.01
    assert big.forgetting("mrr_at_10") == "no loss beyond 1 point"
    # A loss of 1 point on hit@10 alone that the interval cannot rule out: not "no loss".
    lost = big_base > -1  # all 5,000 found: drop 40 of them on hit@10 only (ranks unchanged)
    some = lost * 1.0
    some[:40] = 0.0
    mixed = _forgetting_row("mixed-ood", big_base, big_base, lost * 1.0, some)
    assert mixed.hit_at_10_ci_low < -0.01 < mixed.ci_low and mixed.forgetting("mrr_at_10") == "cannot tell"

    line = forgetting_line([harmed, tiny, big], "mrr_at_10")
    assert line.startswith(
        "**Forgetting** (winner − base out of domain, in points ×100 [95% paired-bootstrap"
    )
    d, lo, hi = (points(harmed.delta), points(harmed.ci_low), points(harmed.ci_high))
    h10 = f"{points(harmed.hit_at_10_delta)} [{points(harmed.hit_at_10_ci_low)}, {points(harmed.hit_at_10_ci_high)}]"
    assert f"scifact {d} [{lo}, {hi}] mrr_at_10, {h10} hit@10 (1,000 questions, p<0.001): **harm**" in line
    assert d.startswith("−") and float(d[1:]) == pytest.approx(-harmed.delta * 100, abs=0.05)  # points
    assert "tiny-ood −2.5 [" in line and "(20 questions, p=" in line and "): cannot tell;" in line
    assert (
        "big-ood +0.0 [" in line
        and "(5,000 questions, p=" in line
        and line.endswith("no loss beyond 1 point.")
    )
    assert "no significant loss" not in line
    assert points(-0.013) == "−1.3" and points(0.005) == "+0.5" and points(-0.0001) == "+0.0"
    with pytest.raises(Exception, match="hit@10 over the same 20 queries"):
        _forgetting_row("bad", tiny_base, tiny_win, tiny_base[:5], tiny_win[:5])


def test_final_spec_takes_ood_data_specs():
    spec = FinalSpec.model_validate({"ood": [{"source": SCIFACT, "name": "scifact", "max_pairs": 50}]})
    assert spec.ood[0].label == "scifact" and spec.ood_max_corpus == 2000 and spec.harm_alpha == 0.05
    with pytest.raises(ValueError):
        FinalSpec.model_validate({"ood": [{"source": SCIFACT, "nope": 1}]})
    assert FinalSpec().ood == []


def test_the_default_runs_winners_are_each_checked_on_an_ood_set_of_1000_questions_and_documents():
    """sweeps/local.yaml: every dataset's winner meets at least one out-of-domain set with >= 1,000
    questions and >= 1,000 documents (power to see a 1-point loss), never its own domain's; a set
    declared in a dataset's domain (`in_domain_for`) is skipped for it, and naming a dataset the
    sweep does not have is a clear error."""
    from paths import REPO

    from embedtune.data import prepare_ood
    from embedtune.errors import EmbedtuneError
    from embedtune.final.harm import own_data
    from embedtune.specs import load_spec, parse_spec

    spec = load_spec(REPO / "sweeps" / "local.yaml")
    sources = {d.label: [d.source] for d in spec.datasets}
    sets = {o.label: prepare_ood(o, spec.final.ood_max_corpus) for o in spec.final.ood}
    wiki = sets["squad-wiki"]
    assert len(wiki.queries) == len(wiki.corpus) == 1000  # one question per paragraph
    for ds in sources:
        checked = [o for o in spec.final.ood if not own_data(o, ds, sources)]
        big = [o.label for o in checked if min(len(sets[o.label].queries), len(sets[o.label].corpus)) >= 1000]
        assert big, (ds, [o.label for o in checked])
    assert {o.label for o in spec.final.ood if own_data(o, "squad", sources)} == {"squad-wiki"}
    assert {o.label for o in spec.final.ood if own_data(o, "medquad", sources)} == {"medquad-ood"}
    raw = spec.model_dump(exclude_unset=True)
    raw["final"]["ood"][1]["in_domain_for"] = ["wikipedia"]
    with pytest.raises(EmbedtuneError, match=r"final.ood.1.in_domain_for names 'wikipedia', not a dataset"):
        parse_spec(raw)


def test_ood_data_from_beir_caps_the_corpus_and_keeps_relevant_docs():
    from embedtune.data import prepare_ood as ood_data

    d = ood_data(DataSpec(source=SCIFACT, max_pairs=40), max_corpus=150)
    assert d.label == "scifact-sample" and d.train == [] and len(d.corpus) == 150
    assert 30 <= len(d.queries) <= 40 and set(d.queries) == set(d.relevant)
    assert all(c in d.corpus for cs in d.relevant.values() for c in cs)
    again = ood_data(DataSpec(source=SCIFACT, max_pairs=40), max_corpus=150)
    assert again.fingerprint == d.fingerprint and again.corpus == d.corpus  # seeded
    assert len(ood_data(DataSpec(source=SCIFACT, max_pairs=40), max_corpus=None).corpus) == 1000


def _harm_results(base_path: str, tuned_path: str):
    import pandas as pd

    rows = [
        {
            "dataset": "medquad",
            "model": "L3",
            "model_path": base_path,
            "base_model": "L3",
            "kind": "base",
            "trial_id": None,
            "epochs": None,
            "query_type": "vector",
            "reranker": "none",
            "hit_at_1": 0.3,
            "hit_at_5": 0.5,
            "hit_at_10": 0.6,
            "mrr_at_10": 0.4,
            "ndcg_at_10": 0.45,
            "n_queries": 50,
            "seconds": 1.0,
        },
        {
            "dataset": "medquad",
            "model": "L3-ft",
            "model_path": tuned_path,
            "base_model": "L3",
            "kind": "tuned",
            "trial_id": "t1",
            "epochs": 2,
            "query_type": "vector",
            "reranker": "none",
            "hit_at_1": 0.4,
            "hit_at_5": 0.6,
            "hit_at_10": 0.7,
            "mrr_at_10": 0.5,
            "ndcg_at_10": 0.55,
            "n_queries": 50,
            "seconds": 1.0,
        },
    ]
    entries = {
        "medquad": [
            ModelEntry("L3", base_path, "L3", "base"),
            ModelEntry("L3-ft", tuned_path, "L3", "tuned", "t1", 2),
        ]
    }
    return pd.DataFrame(rows), entries


def test_do_no_harm_on_a_real_model_against_itself_flags_nothing(tmp_path):
    from embedtune.final.harm import do_no_harm
    from embedtune.models import resolve_model

    path = str(resolve_model("paraphrase-MiniLM-L3-v2"))
    results, entries = _harm_results(path, path)  # the "winner" is the base model itself
    spec = FinalSpec(ood=[DataSpec(source=SCIFACT, max_pairs=30)], ood_max_corpus=100)
    harm = do_no_harm(results, [], entries, spec, str(tmp_path / "db"))
    (row,) = harm.rows
    assert row.dataset == "medquad" and row.ood == "scifact-sample" and row.winner == "L3-ft"
    assert row.delta == 0 and row.p_value == 1.0 and row.flag == ""
    assert 0 < row.base_score <= 1 and row.n_queries == len(harm.hits["scifact-sample"]["L3"])
    # hit@10's paired interval is kept too: a model against itself changes nothing
    assert (row.hit_at_10_delta, row.hit_at_10_ci_low, row.hit_at_10_ci_high) == (0, 0, 0)
    assert row.forgetting(harm.metric) == "no loss beyond 1 point"


def _harmed_copy(src, dest, scale: float = 2.0):
    """A deliberately harmed model: the base model with seeded noise on its word embeddings."""
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(src), device="cpu")
    emb = model[0].auto_model.embeddings.word_embeddings.weight
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        emb += torch.randn(emb.shape, generator=gen) * emb.std() * scale
    model.save(str(dest))
    return dest


@pytest.mark.slow
def test_do_no_harm_flags_a_harmed_winner_end_to_end(tmp_path, small_data):
    """evaluate_and_report with an OOD set: a noised copy of the base model is the only tuned model
    (so the winner); the do-no-harm check flags it on SciFact, writes harm.json and the report
    section, logs them to MLflow, and `embedtune report` rebuilds the section from stored files."""
    from embedtune.final import evaluate_and_report
    from embedtune.models import resolve_model

    uri, client, parent = _store(tmp_path)
    base = resolve_model("paraphrase-MiniLM-L3-v2")
    harmed = _harmed_copy(base, tmp_path / "harmed", scale=4.0)
    entries = {
        small_data.label: [
            ModelEntry("paraphrase-MiniLM-L3-v2", "paraphrase-MiniLM-L3-v2", "paraphrase-MiniLM-L3-v2"),
            ModelEntry("L3-harmed", str(harmed), "paraphrase-MiniLM-L3-v2", "tuned", "t9", 1),
        ]
    }
    spec = FinalSpec(
        eval=EvalSpec(query_types=["vector"], rerankers=["none"]),
        cross_encoder=None,
        registry=False,
        probe_size=20,
        ood=[DataSpec(source=SCIFACT, max_pairs=40)],
        ood_max_corpus=150,
    )
    run_dir = tmp_path / "run"
    result = evaluate_and_report(
        RunDir(run_dir), entries, {small_data.label: small_data}, {}, [], spec, parent, uri
    )
    assert result.winner["model"] == "L3-harmed"
    (row,) = json.loads((run_dir / "report" / "harm.json").read_text())["rows"]
    assert row["flag"] == "harm" and row["delta"] < -0.1 and (row["p_value"] < 0.05 or row["ci_high"] < 0), (
        row
    )
    md = (run_dir / "report" / "leaderboard.md").read_text()
    assert (
        f"### Do no harm ({small_data.label})" in md and "**Harm:** `L3-harmed` loses on scifact-sample" in md
    )
    assert "**Already seen:" in md and "near-dup eval q" in md
    assert "report/harm.json" in _artifact_paths(client, parent)
    run = client.get_run(parent)
    assert run.data.tags["embedtune.harm"] == "L3-harmed@scifact-sample"
    assert run.data.metrics[f"final.{small_data.label}.ood.scifact-sample.delta_mrr_at_10"] == pytest.approx(
        row["delta"]
    )
    from embedtune.cli import main

    (run_dir / "report" / "leaderboard.md").unlink()
    assert main(["report", str(run_dir)]) == 0
    assert (run_dir / "report" / "leaderboard.md").read_text() == md


def test_only_winners_that_are_served_or_registered_are_checked_for_harm():
    """A dataset winner whose gain is not worth fine-tuning (its base model is served) and that is
    not the run's registered winner gets no do-no-harm check: its forgetting line says why."""
    import pandas as pd

    from embedtune.final.harm import NOT_RECOMMENDED, harm_pairs
    from embedtune.records import HarmCheck
    from embedtune.report.render import forgetting_line

    big, entries = _harm_results("/m/base", "/m/tuned")  # medquad: +0.10 MRR@10
    small = big.assign(dataset="squad")
    small.loc[small["kind"] == "tuned", "mrr_at_10"] = 0.41  # +1 point: "Not worth it"
    results = pd.concat([big, small], ignore_index=True)
    entries["squad"] = entries["medquad"]
    skipped: dict[str, str] = {}
    pairs = harm_pairs(results, [], entries, "mrr_at_10", skipped)
    assert [ds for ds, _, _ in pairs] == ["medquad"] and skipped == {"squad": NOT_RECOMMENDED}
    line = forgetting_line(
        HarmCheck(not_checked=skipped).for_dataset("squad"), "mrr_at_10", why=skipped["squad"]
    )
    assert line == f"**Forgetting:** not checked ({NOT_RECOMMENDED})."
    alone = harm_pairs(small, [], {"squad": entries["squad"]}, "mrr_at_10")  # the registered winner
    assert [ds for ds, _, _ in alone] == ["squad"]


def test_a_missing_ood_set_fails_before_any_evaluation(tmp_path):
    from embedtune.errors import EmbedtuneError
    from embedtune.final import evaluate_and_report

    spec = FinalSpec(ood=[DataSpec(source=str(tmp_path / "no-such-beir"))], cross_encoder=None)
    with pytest.raises(EmbedtuneError, match="not found"):
        evaluate_and_report(RunDir(tmp_path / "run"), {}, {}, {}, [], spec)


def test_epoch_entries_add_the_best_checkpoint_of_every_other_epoch_count():
    trials = [
        _trial("a", "mini", "med", [0.80, 0.90, 0.85]),  # best epoch 2: the pick
        _trial("b", "mini", "med", [0.82]),  # best epoch 1
        _trial("c", "mini", "med", [0.84, 0.70]),  # best epoch 1, better than b
        _trial("d", "mini", "med", [0.60, 0.65, 0.88]),  # best epoch 3
        _trial("e", "mini", "med", [0.99], status="FAILED"),  # never
        _trial("f", "other", "med", [0.70]),  # the pick of its own model: nothing extra
    ]
    picks = pick_models(trials, ["mini", "other"], top_k=0)
    extra = epoch_entries(trials, picks)
    assert [(e.trial_id, e.epochs, e.base_model) for e in extra["med"]] == [
        ("c", 1, "mini"),
        ("d", 3, "mini"),
    ]
    assert epoch_entries(trials, {}) == {}  # only datasets being evaluated


def test_local_checkpoint_copies_follow_the_kept_checkpoints(tmp_path, monkeypatch):
    """Remote checkpoints are copied locally for the final stage: one copy per checkpoint, so a
    resumed trial's new best checkpoint is never served from the copy of an older one, and the copy
    of a checkpoint Tune deleted (beyond checkpoints.keep) goes too. (pyarrow's in-memory
    filesystem stands in for S3 behind embedtune.storage.)"""
    from dataclasses import replace
    from pathlib import Path

    from pyarrow import fs as pafs

    from embedtune import storage
    from embedtune.final.stage import local_models
    from embedtune.records import ModelEntry

    mem = pafs._MockFileSystem()
    monkeypatch.setattr(storage, "_fs", lambda location: (mem, location.split("://", 1)[1]))

    def checkpoint(n: int) -> str:
        mem.create_dir(f"b/trial_1/checkpoint_00000{n}/model")
        with mem.open_output_stream(f"b/trial_1/checkpoint_00000{n}/model/weights.bin") as out:
            out.write(f"epoch {n}".encode())
        return f"mock://b/trial_1/checkpoint_00000{n}/model"

    copies = tmp_path / "checkpoints"
    entry = ModelEntry("m-ft", checkpoint(1), "m", "tuned", "trial_1", 3)
    (got,) = local_models([entry], copies)
    assert (Path(got.path) / "weights.bin").read_text() == "epoch 1"
    # The trial resumed: its best checkpoint is now the third; Tune kept 1 and deleted the first.
    newer = checkpoint(3)
    mem.delete_dir("b/trial_1/checkpoint_000001")
    (got,) = local_models([replace(entry, path=newer)], copies)
    assert (Path(got.path) / "weights.bin").read_text() == "epoch 3"
    assert [p.name for p in (copies / "trial_1").iterdir()] == ["checkpoint_000003"]
