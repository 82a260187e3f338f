"""Advice at the edge of the search (embedtune.report.edges) on real TrialRecord objects and real
specs: which axis is named, which change is proposed (and that it is a valid spec), and that the
report's summary and the sweep's printed output show it."""

from __future__ import annotations

import yaml
from paths import REPO
from specs import tiny_spec

from embedtune.records import TrialRecord
from embedtune.report.edges import best_records, edge_advice, edge_lines, yaml_number
from embedtune.specs import SearchSpace, load_spec
from embedtune.specs.load import parse_spec

METRIC = "ir_mrr_at_10"


def record(
    tid, curve, epochs=None, dataset="medquad", model="mini", base=0.5, status="FINISHED", at_end=False, **hp
):
    """A trial record the way the sweep writes one: history = base (epoch 0) + the curve up to
    `epochs` (default: all of it); best epoch = the best point of that history (separate mode), or
    its last (`at_end`: a branch member is the checkpoint at exactly its epoch count)."""
    epochs = epochs or len(curve)
    history = [{"epoch": 0, "metrics": {METRIC: base}}]
    history += [{"epoch": e, "metrics": {METRIC: s}} for e, s in enumerate(curve[:epochs], start=1)]
    best = history[-1] if at_end else max(history[1:], key=lambda p: (p["metrics"][METRIC], -p["epoch"]))
    return TrialRecord.from_dict(
        {
            "trial_id": tid,
            "config_hash": f"h-{tid}",
            "model": model,
            "model_label": model,
            "dataset": dataset,
            "epochs": epochs,
            "lr": hp.get("lr", 5e-5),
            "batch_size": hp.get("batch_size", 32),
            "warmup_ratio": hp.get("warmup_ratio", 0.1),
            "seed": 42,
            "status": status,
            "history": history,
            "best_epoch": best["epoch"],
            "best_metrics": best["metrics"],
            "best_checkpoint": f"/ckpt/{tid}",
        }
    )


def branch(tid, curve, listed=(1, 2, 3), **kw) -> list[TrialRecord]:
    """One branch trial's records: one per listed epoch count, each with the curve up to it."""
    return [record(f"{tid}-e{e}", curve, epochs=e, at_end=True, **kw) for e in listed]


def spec_with(search: dict, **over):
    return parse_spec(tiny_spec("edges", search=search, **over))


def only(advice, dataset="medquad"):
    assert list(advice) == [dataset], advice
    return advice[dataset]


def test_default_spec_best_at_three_epochs_names_the_epochs_change():
    """sweeps/local.yaml's shape: epochs [1, 2, 3] (branch mode), every other axis one value; the
    curves still rise at epoch 3 on both datasets."""
    spec = load_spec(REPO / "sweeps" / "local.yaml")
    trials = [
        *branch("a", [0.80, 0.82, 0.84], model="all-MiniLM-L6-v2", base=0.78),
        *branch("b", [0.70, 0.74, 0.75], model="paraphrase-MiniLM-L3-v2", base=0.72),
        *branch("c", [0.90, 0.91, 0.93], dataset="squad", model="all-MiniLM-L6-v2", base=0.89),
        *branch("d", [0.86, 0.85, 0.87], dataset="squad", model="paraphrase-MiniLM-L3-v2", base=0.86),
    ]
    advice = edge_advice(trials, spec)
    assert sorted(advice) == ["medquad", "squad"]
    for items in advice.values():
        assert [a.axis for a in items] == ["epochs"], items  # lr, batch, warmup, seed: one value each
        a = items[0]
        assert (a.value, a.edge, a.rising, a.suggestion) == (3, "upper", True, "[2, 3, 4, 5]")
        assert "best epochs = 3, the largest searched: the metric was still rising" in a.text
        assert a.text.endswith("try `search.epochs: [2, 3, 4, 5]`")
    # ranked by gain over the own base (the spec's compare: gain): L3's 0.75 (+0.03) loses to L6's +0.06
    assert advice["medquad"][0].model == "all-MiniLM-L6-v2" and advice["medquad"][0].trial_id == "a-e3"
    assert "ir_mrr_at_10 0.820 → 0.840 from epoch 2 to 3" in advice["medquad"][0].text
    # the proposed list is a valid `search.epochs` of the same spec
    new = spec.search.model_copy(update={"epochs": yaml.safe_load(advice["medquad"][0].suggestion)})
    assert SearchSpace.model_validate(new.model_dump()).epochs == [2, 3, 4, 5]
    assert edge_lines(advice)[0].startswith("medquad: best epochs = 3, the largest searched")
    assert "`" not in "".join(edge_lines(advice))


def test_interior_best_and_single_value_axes_give_no_advice():
    spec = spec_with({"epochs": [1, 2, 3], "lr": [2e-5, 5e-5, 1e-4], "batch_size": [16]})
    peaked = branch("a", [0.80, 0.86, 0.83], lr=5e-5)  # best at epoch 2, lr in the middle
    assert best_records(peaked, spec)["medquad"].trial_id == "a-e2"
    assert edge_advice(peaked, spec) == {}
    # batch_size 16 is the only (and so the largest) value: not searched, nothing to say
    assert all(a.axis != "batch_size" for items in edge_advice(peaked, spec).values() for a in items)


def test_upper_edge_without_the_curve_to_show_it_does_not_claim_rising():
    spec = spec_with({"epochs": [1, 2, 3], "epochs_mode": "separate"})
    t = record("t", [0.8, 0.8, 0.9])
    t.history = [p for p in t.history if p.epoch in (0, 3)]  # only the base and the last epoch
    (a,) = only(edge_advice([t], spec))
    assert (a.axis, a.edge, a.rising) == ("epochs", "upper", None)
    assert "rising" not in a.text and a.suggestion == "[2, 3, 4, 5]"


def test_separate_mode_epoch_is_the_best_checkpoint_not_the_run_length():
    """A 3-epoch run whose best checkpoint is epoch 2 stands for 2 epochs: interior, no advice."""
    spec = spec_with({"epochs": [1, 2, 3], "epochs_mode": "separate"})
    trials = [record("t3", [0.80, 0.86, 0.84]), record("t1", [0.79])]
    assert edge_advice(trials, spec) == {}


def test_lower_and_upper_edges_of_lr_batch_and_warmup_lists():
    spec = spec_with(
        {"epochs": [1, 2], "lr": [1e-5, 2e-5, 5e-5], "batch_size": [16, 32], "warmup_ratio": [0.0, 0.1]}
    )
    low = [
        record("lo", [0.80, 0.85], lr=1e-5, batch_size=16, warmup_ratio=0.0),  # every axis at its low end
        record("hi", [0.70, 0.71], lr=5e-5, batch_size=32, warmup_ratio=0.1),
        record("bad", [0.99, 0.99], lr=2e-5, status="FAILED"),  # failed: never the best
    ]
    by_axis = {a.axis: a for a in only(edge_advice(low, spec))}
    # epochs 2 is the largest listed (upper edge, rising); lr and batch size at their lowest
    assert by_axis["epochs"].suggestion == "[1, 2, 3, 4]" and by_axis["epochs"].rising is True
    assert by_axis["lr"].edge == "lower" and "the lowest searched" in by_axis["lr"].text
    assert by_axis["lr"].suggestion == "[2.5e-06, 5.0e-06, 1.0e-05, 2.0e-05]"
    assert by_axis["batch_size"].edge == "lower" and by_axis["batch_size"].suggestion == "[4, 8, 16, 32]"
    assert "warmup_ratio" not in by_axis  # 0 is the lowest warmup there is: nothing below to try

    high = [record("hi", [0.80, 0.85], lr=5e-5, batch_size=32, warmup_ratio=0.1)]
    by_axis = {a.axis: a for a in only(edge_advice(high, spec))}
    assert by_axis["lr"].edge == "upper" and "the highest searched" in by_axis["lr"].text
    assert by_axis["lr"].suggestion == "[2.0e-05, 5.0e-05, 0.000125, 0.000313]"
    assert (
        by_axis["batch_size"].suggestion == "[16, 32, 64, 128]"
        and "largest searched" in by_axis["batch_size"].text
    )
    assert by_axis["warmup_ratio"].suggestion == "[0.0, 0.1, 0.2, 0.3]"
    for a in by_axis.values():  # every proposal is a valid value of its axis
        SearchSpace.model_validate({a.axis: yaml.safe_load(a.suggestion)})

    at_one = [record("one", [0.85], epochs=1), record("two", [0.80, 0.82])]
    assert all(
        a.axis != "epochs" for a in edge_advice(at_one, spec).get("medquad", [])
    )  # 1 epoch: a hard bound


def test_sampled_ranges_and_choices():
    spec = spec_with(
        {
            "mode": "random",
            "num_samples": 4,
            "epochs_mode": "separate",
            "epochs": {"distribution": "randint", "low": 1, "high": 4},
            "lr": {"distribution": "loguniform", "low": 1e-5, "high": 1e-4},
            "batch_size": {"distribution": "choice", "values": [16, 32, 64]},
            "warmup_ratio": {"distribution": "uniform", "low": 0.0, "high": 0.2},
        }
    )
    top = [
        record("t", [0.80, 0.81, 0.82, 0.84], lr=9e-5, batch_size=64, warmup_ratio=0.1),
        record("u", [0.70], lr=1.1e-5, batch_size=16, warmup_ratio=0.19),
    ]
    by_axis = {a.axis: a for a in only(edge_advice(top, spec))}
    assert sorted(by_axis) == ["batch_size", "epochs", "lr"]  # warmup 0.1: the middle of [0, 0.2]
    lr = by_axis["lr"]
    assert lr.edge == "upper" and "top tenth of the searched range loguniform [1.0e-05, 0.0001]" in lr.text
    new = yaml.safe_load(lr.suggestion)
    assert new["distribution"] == "loguniform" and new["low"] < 9e-5 < 1e-4 < new["high"]
    assert abs(new["high"] / new["low"] - 10) < 0.1  # the same width (a factor of 10), centred on the best
    epochs = by_axis["epochs"]
    assert epochs.rising is True and yaml.safe_load(epochs.suggestion) == {
        "distribution": "randint",
        "low": 2,
        "high": 6,
    }
    assert by_axis["batch_size"].suggestion == "[32, 64, 128, 256]"
    for a in by_axis.values():
        SearchSpace.model_validate(
            {"mode": "random", "epochs_mode": "separate", a.axis: yaml.safe_load(a.suggestion)}
        )

    middle = [record("m", [0.80, 0.85], lr=3e-5, batch_size=32, warmup_ratio=0.1)]
    assert edge_advice(middle, spec) == {}


def test_yaml_numbers_read_back_as_numbers():
    for x in (5e-5, 1e-4, 2.5e-6, 0.1, 0.0, 3e-1):
        assert isinstance(yaml.safe_load(yaml_number(x, "lr")), float)
    assert yaml_number(32.0, "batch_size") == "32"


def test_report_summary_and_sweep_output_show_the_edge(tmp_path, capsys):
    """The report's summary (md and html, meta.json; kept by a rebuild) and the sweep's printed
    output after its results table carry the advice."""
    from test_report import results_frame

    from embedtune.cli import _show_trials
    from embedtune.report import build_report, rebuild_report
    from embedtune.rundir import RunDir
    from embedtune.sweep.results import results_table

    spec = load_spec(REPO / "sweeps" / "local.yaml")
    trials = [
        *branch("t", [0.70, 0.72, 0.75], model="mini"),
        *branch("s", [0.93, 0.95, 0.94], dataset="squad"),
    ]
    rundir = RunDir(tmp_path)
    rundir.save_spec(spec)
    rundir.save_trials(trials)
    rep = build_report(rundir, trials, results_frame(), {}, metric="hit_at_10")
    expected = "best epochs = 3, the largest searched: the metric was still rising"
    md = rep.files["leaderboard_md"].read_text()
    summary = md.split("## ")[1]  # the Summary section, before the first dataset's grid
    assert summary.startswith("Summary") and f"**Edge of the search:** {expected}" in summary
    assert "`search.epochs: [2, 3, 4, 5]`" in summary
    assert summary.count("Edge of the search") == 1  # squad peaked at epoch 2: no advice there
    assert "<b>Edge of the search:</b>" in rep.files["leaderboard_html"].read_text()
    meta = rep.files["meta"].read_text()
    assert '"search_edges"' in meta and '"suggestion": "[2, 3, 4, 5]"' in meta
    assert expected in rebuild_report(tmp_path).files["leaderboard_md"].read_text()

    _show_trials(trials, spec, results_table(trials, spec.scheduler.metric))
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("[embedtune] edge of the search"))
    assert line.startswith(f"[embedtune] edge of the search, medquad: {expected}")
    assert line.endswith("try search.epochs: [2, 3, 4, 5]") and out.index(
        "embedtune sweep results"
    ) < out.index(line)
