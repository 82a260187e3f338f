"""Sweep spec validation: good specs load, each bad key / value fails before Ray, naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from servers import closed_port

from embedtune.errors import EmbedtuneError
from embedtune.specs import load_spec, parse_spec
from embedtune.sweep.identity import param_space

GOOD = {
    "name": "t",
    "datasets": [{"source": "medquad-sample", "eval_size": 20}],
    "models": ["all-MiniLM-L6-v2", "paraphrase-MiniLM-L3-v2"],
    "search": {"mode": "grid", "epochs": [1, 2, 3], "lr": [2e-5], "batch_size": [16]},
}


def test_shipped_specs_load(repo_root: Path, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:45678")  # cluster-local.yaml needs one
    monkeypatch.setenv("EMBEDTUNE_STORAGE", "s3://site-bucket/sweeps")  # gooaq/squad: the cluster's bucket
    for path in sorted((repo_root / "sweeps").glob("*.yaml")):
        spec = load_spec(path)
        assert spec.models and spec.datasets, path
    local = load_spec(repo_root / "sweeps" / "local.yaml")
    n_trials = len(local.models) * len(local.datasets) * len(local.search.epochs)
    assert len(local.models) >= 2 and len(local.search.epochs) >= 3 and n_trials >= 6


def test_grid_param_space_crosses_models_datasets_epochs() -> None:
    space = param_space(parse_spec({**GOOD, "search": {**GOOD["search"], "epochs_mode": "separate"}}))
    assert space["model"] == {"grid_search": GOOD["models"]}
    assert space["epochs"] == {"grid_search": [1, 2, 3]}
    assert space["lr"] == 2e-5  # a single value is fixed, not a grid axis
    branch = param_space(parse_spec(GOOD))  # the default: the epoch counts are checkpoints of one run
    assert branch["epochs"] == 3 and branch["branch_epochs"] == "1,2,3"


def test_a_spec_that_names_no_mode_gets_a_budgeted_auto_search() -> None:
    """auto is the default: a spec without search.mode searches its own axes as given plus the
    default ranges for the rest, within the default budget; grid stays for specs that say so."""
    from embedtune.specs.sweep import AUTO_BUDGET, AUTO_MAX_TRIALS

    search = {k: v for k, v in GOOD["search"].items() if k != "mode"}
    spec = parse_spec({**GOOD, "search": search})
    assert spec.search.mode == "auto" and spec.search.budget.minutes == AUTO_BUDGET["minutes"]
    assert spec.search.epochs == [1, 2, 3] and spec.search.lr == [2e-5]  # its axes, as given
    assert spec.search.warmup_ratio.distribution == "uniform"  # an axis it left out: searched
    assert spec.search.draws == AUTO_MAX_TRIALS
    assert parse_spec(GOOD).search.mode == "grid"


def test_sampled_space_uses_distributions() -> None:
    raw = dict(
        GOOD,
        search={
            "mode": "optuna",
            "num_samples": 4,
            "epochs": [1, 2],
            "epochs_mode": "separate",  # branch mode trains every draw to 2 epochs (test_sweep_identity)
            "lr": {"distribution": "loguniform", "low": 1e-5, "high": 1e-4},
        },
    )
    space = param_space(parse_spec(raw))
    # optuna draws lr log-uniformly within the spec's bounds and the model among the spec's models
    lr = space["lr"]
    assert (lr.lower, lr.upper) == (1e-5, 1e-4) and type(lr.get_sampler()).__name__ == "_LogUniform"
    assert space["model"].categories == GOOD["models"] and space["epochs"].categories == [1, 2]


@pytest.mark.parametrize(
    ("patch", "needle"),
    [
        ({"epochz": [1]}, "epochz: unknown key"),
        ({"search": {"epochs": [0, 1]}}, "search.epochs"),
        ({"search": {"epochs_mode": "per-epoch"}}, "search.epochs_mode"),
        (
            {"search": {"mode": "random", "epochs": {"distribution": "randint", "low": 1, "high": 3}}},
            "search.epochs_mode: branch checkpoints one run at each listed epoch count",
        ),
        ({"search": {"batch_size": [1]}}, "search.batch_size"),
        ({"search": {"lr": [0]}}, "search.lr"),
        (
            {"search": {"mode": "grid", "lr": {"distribution": "loguniform", "low": 1e-5, "high": 1e-4}}},
            "grid mode takes lists only",
        ),
        ({"resources": {"gpu": 1.5}}, "resources.gpu"),
        ({"resources": {"cpu": 0}}, "resources.cpu"),
        ({"scheduler": {"type": "hyperband"}}, "scheduler.type"),
        ({"scheduler": {"grace_period": 0}}, "scheduler.grace_period"),
        ({"checkpoints": {"keep": 0}}, "checkpoints.keep"),
        ({"models": []}, "models"),
        ({"models": ["a", "a"]}, "models must not repeat"),
        (
            {"datasets": [{"source": "medquad-sample", "question_col": "q"}]},
            "datasets.0.question_col: unknown key",
        ),
        (
            {"datasets": [{"source": "medquad-sample"}, {"source": "medquad-sample"}]},
            "dataset labels must be unique",
        ),
        ({"mining": {"range_min": 10, "range_max": 5}}, "range_max"),
        ({"name": "bad name!"}, "name"),
        ({"max_concurrent_trials": 0}, "max_concurrent_trials"),
    ],
)
def test_bad_spec_names_the_key(patch: dict, needle: str) -> None:
    raw = {**GOOD, **patch}
    if "search" in patch:
        raw["search"] = {**GOOD["search"], **patch["search"]}
    with pytest.raises(EmbedtuneError) as err:
        parse_spec(raw, "spec.yaml")
    message = str(err.value)
    assert needle in message, message
    assert "\n" not in message and message.startswith("spec.yaml: ")


def test_missing_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(EmbedtuneError, match="sweep spec not found"):
        load_spec(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(EmbedtuneError, match="not valid YAML"):
        load_spec(bad)
    top = tmp_path / "list.yaml"
    top.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(EmbedtuneError, match="mapping"):
        load_spec(top)


def test_relative_data_path_is_relative_to_spec(tmp_path: Path) -> None:
    (tmp_path / "pairs.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    spec_file = tmp_path / "s.yaml"
    spec_file.write_text(yaml.safe_dump({**GOOD, "datasets": [{"source": "pairs.jsonl"}]}))
    spec = load_spec(spec_file)
    assert spec.datasets[0].source == str(tmp_path / "pairs.jsonl")


def test_cli_rejects_bad_spec_before_ray(tmp_path: Path, capsys) -> None:
    from embedtune.cli import main

    spec_file = tmp_path / "s.yaml"
    spec_file.write_text(yaml.safe_dump({**GOOD, "resources": {"gpu": -1}}))
    assert main(["sweep", str(spec_file), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("embedtune: error:") and "resources.gpu" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_scheduler_ranks_gain_over_base_unless_told_absolute() -> None:
    spec = parse_spec(GOOD)
    assert spec.scheduler.compare == "gain" and spec.scheduler.tune_metric == "ir_mrr_at_10_gain"
    raw = dict(GOOD, scheduler={"metric": "ir_mrr_at_10", "compare": "absolute"})
    assert parse_spec(raw).scheduler.tune_metric == "ir_mrr_at_10"


def test_one_headline_metric_reaches_every_stage(repo_root: Path) -> None:
    """The spec's `metric` drives the scheduler, the best epoch (final.metric), the leaderboard,
    winner and verdicts (final.leaderboard_metric); a stage metric naming another quantity is an
    error naming both keys; an older spec with only scheduler.metric still means one metric."""
    local = load_spec(repo_root / "sweeps" / "local.yaml")
    assert local.metric == "mrr_at_10"
    assert (local.scheduler.metric, local.final.metric, local.final.leaderboard_metric) == (
        "ir_mrr_at_10",
        "ir_mrr_at_10",
        "mrr_at_10",
    )
    hit1 = parse_spec(dict(GOOD, metric="hit_at_1"))
    assert (hit1.scheduler.metric, hit1.final.metric, hit1.final.leaderboard_metric) == (
        "ir_accuracy_at_1",
        "ir_accuracy_at_1",
        "hit_at_1",
    )
    older = parse_spec(dict(GOOD, scheduler={"metric": "ir_recall_at_10"}))
    assert older.metric == "hit_at_10" and older.final.leaderboard_metric == "hit_at_10"
    with pytest.raises(EmbedtuneError, match="final.leaderboard_metric"):
        parse_spec(dict(GOOD, metric="hit_at_1", final={"leaderboard_metric": "hit_at_10"}))
    with pytest.raises(EmbedtuneError, match="metric"):
        parse_spec(dict(GOOD, metric="recall"))
    with pytest.raises(EmbedtuneError, match="scheduler.compare"):
        parse_spec(dict(GOOD, scheduler={"compare": "relative"}))


def test_unreachable_tracking_server_fails_before_any_work(tmp_path: Path, capsys) -> None:
    from embedtune.cli import main

    spec_file = tmp_path / "s.yaml"
    with closed_port() as port:  # nothing listens there
        uri = f"http://ci:PLANTED-pw-77@127.0.0.1:{port}"
        spec_file.write_text(yaml.safe_dump({**GOOD, "mlflow": {"tracking_uri": uri}}))
        assert main(["sweep", str(spec_file), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "MLflow tracking server" in err and "unreachable" in err
    assert "PLANTED-pw-77" not in err and "ci:***@127.0.0.1" in err  # named, without its password
    assert not (tmp_path / "run").exists()


def test_unwritable_storage_path_is_refused_before_any_work(tmp_path: Path, capsys) -> None:
    from embedtune.cli import main

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    spec_file = tmp_path / "s.yaml"
    spec_file.write_text(yaml.safe_dump({**GOOD, "storage_path": str(blocker / "ckpts")}))
    assert main(["sweep", str(spec_file), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not writable" in err and str(blocker) in err
    assert not (tmp_path / "run").exists() and blocker.read_text() == "not a folder"


def test_gpu_trials_on_a_cpu_only_local_ray_are_refused_not_left_pending(tmp_path: Path, capsys) -> None:
    from embedtune.cli import main

    spec_file = tmp_path / "s.yaml"
    spec_file.write_text(yaml.safe_dump({**GOOD, "resources": {"gpu": 1}, "ray": {"num_gpus": 0}}))
    assert main(["sweep", str(spec_file), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "resources.gpu: 1 per trial" in err and "0 GPU(s)" in err
    assert not (tmp_path / "run").exists()
    spec_file.write_text(yaml.safe_dump({**GOOD, "resources": {"cpu": 64}}))
    assert main(["sweep", str(spec_file), "--run-dir", str(tmp_path / "run")]) == 2
    assert "resources.cpu: 64 per trial" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["../../x", "..", ".hidden", "a/b", "/etc/x", "a\\b", ""])
def test_dataset_names_that_would_leave_the_run_dir_fail_at_load(name: str) -> None:
    """A dataset's label names files (`data/<label>.json` in the run dir, the negatives cache):
    `name: ../../x` would write outside them, so the spec is refused, naming the key."""
    raw = dict(GOOD, datasets=[{"source": "medquad-sample", "name": name}])
    with pytest.raises(EmbedtuneError, match=r"datasets\.0: .*not a safe file name"):
        parse_spec(raw)


@pytest.mark.parametrize(
    ("source", "label"),
    [
        ("hf:..", "data"),
        ("/data/my file.jsonl", "my_file"),
        ("../..", "data"),
        ("hf:BeIR/scifact", "scifact"),
    ],
)
def test_labels_derived_from_sources_are_one_safe_path_component(source: str, label: str, tmp_path) -> None:
    from embedtune.rundir import RunDir
    from embedtune.specs import DataSpec

    spec = DataSpec(source=source)
    assert spec.label == label
    rd = RunDir(tmp_path / "run")
    assert Path(rd.data_file(spec.label)).parent == rd.path / "data"


@pytest.mark.parametrize(
    "models",
    [
        ["all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"],  # one model, two spellings
        ["runs/a/model", "runs/b/model/"],  # two checkpoints, both folders named `model`
    ],
)
def test_two_models_with_one_label_fail_at_load_naming_both(models: list[str]) -> None:
    """Results, MLflow runs and report rows are keyed by a model's label: two entries sharing one
    would be merged into one row, so the spec is refused, naming both entries."""
    raw = dict(GOOD, models=["paraphrase-MiniLM-L3-v2", *models])
    with pytest.raises(EmbedtuneError) as err:
        parse_spec(raw, "spec.yaml")
    message = str(err.value)
    assert f"models.1 {models[0]!r} and models.2 {models[1]!r} both get the label" in message, message
    assert "\n" not in message and message.startswith("spec.yaml: models: ")


def test_models_with_distinct_labels_load() -> None:
    spec = parse_spec(
        dict(GOOD, models=["sentence-transformers/all-MiniLM-L6-v2", "runs/a/model", "runs/b/ckpt"])
    )
    assert len(spec.models) == 3
