"""A trial's identity (config hash), the explicit grid Tune runs, merging trial records across
experiments, and which spec changes may extend a run dir."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
from specs import TINY_DATA, tiny_spec, trial_record

from embedtune.records import TrialRecord
from embedtune.specs import parse_spec
from embedtune.sweep.identity import ConfigHasher, config_hash, explicit_space, grid_configs, param_space
from embedtune.sweep.preflight import extension_problem
from embedtune.sweep.results import merge_records


def _hash_args(**changes):
    cfg = {
        "model": "m",
        "dataset": "d",
        "epochs": 2,
        "lr": 5e-5,
        "batch_size": 16,
        "warmup_ratio": 0.1,
        "seed": 42,
    }
    args = {
        "fingerprint": "fp1",
        "train_settings": {"max_seq_length": 48, "hard_negatives": True},
        "negatives_key": "n1",
    }
    for k, v in changes.items():
        (args if k in args else cfg)[k] = v
    return cfg, args


def test_config_hash_is_stable_and_changes_with_what_shapes_the_result() -> None:
    cfg, args = _hash_args()
    h = config_hash(cfg, **args)
    # stable: dict order, int vs float spellings, Tune-only keys, and across processes
    shuffled = dict(reversed(list(cfg.items())))
    assert config_hash({**shuffled, "epochs": 2.0, "config_hash": "x"}, **args) == h
    assert (
        config_hash(cfg, args["fingerprint"], dict(reversed(list(args["train_settings"].items()))), "n1") == h
    )
    code = (
        "from embedtune.sweep.identity import config_hash; import json, sys; a = json.loads(sys.argv[1]);"
        "print(config_hash(a[0], **a[1]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps([cfg, args])], capture_output=True, text=True
    )
    assert out.stdout.strip() == h, out.stderr[-2000:]
    # changes: each hyperparameter, the model, the data, the train settings, the negatives
    variants = [
        {"lr": 1e-4},
        {"epochs": 3},
        {"batch_size": 32},
        {"warmup_ratio": 0.0},
        {"seed": 1},
        {"model": "m2"},
        {"dataset": "d2"},
        {"fingerprint": "fp2"},
        {"train_settings": {"max_seq_length": 64, "hard_negatives": True}},
        {"negatives_key": "n2"},
        {"repeat": 1},
    ]
    hashes = {h}
    for change in variants:
        c, a = _hash_args(**change)
        hashes.add(config_hash(c, **a))
    assert len(hashes) == len(variants) + 1
    # without hard negatives the mining key is not part of the identity
    c, a = _hash_args(train_settings={"hard_negatives": False})
    assert config_hash(c, **{**a, "negatives_key": "other"}) == config_hash(c, **a)


def test_grid_configs_run_as_an_explicit_tune_space() -> None:
    """A grid becomes a list of configs with their hashes; the Tune space built from a subset
    produces exactly those trials, with the usual flat config keys."""
    from ray.tune.experiment import Experiment

    spec = parse_spec(tiny_spec("grid", search={"epochs": [1, 2], "lr": [5e-5, 1e-4], "num_samples": 2}))
    hasher = ConfigHasher({"medquad": "fp"}, spec.train.model_dump(), {"medquad": "neg"})
    configs = grid_configs(spec, hasher)
    assert (
        len(configs) == 2 * 2 * 2 * 2 == len({c["config_hash"] for c in configs})
    )  # models×epochs×lr×repeats
    assert all(
        hasher({k: v for k, v in c.items() if k != "config_hash"}) == c["config_hash"] for c in configs
    )
    subset = configs[1:4]
    space, gen = explicit_space(subset)
    gen.add_configurations([Experiment("x", run=lambda c: None, config=space, num_samples=len(subset))])
    made = []
    while (trial := gen.next_trial()) is not None:
        made.append(trial.config)
    assert made == subset  # in order, each once, nothing drawn beyond them


def test_merge_records_keeps_one_record_per_config() -> None:
    def rec(h, tid, status):
        return trial_record(tid, config_hash=h, status=status)

    old = [rec("a", "t1", "FINISHED"), rec("b", "t2", "FAILED"), rec("c", "t3", "KILLED")]
    new = [rec("b", "t4", "FINISHED"), rec("c", "t5", "FAILED"), rec("d", "t6", "FINISHED")]
    merged = {r.config_hash: r.trial_id for r in merge_records(old, new)}
    # a rerun replaces a failed record; a done one (KILLED by the scheduler too) stays
    assert merged == {"a": "t1", "b": "t4", "c": "t3", "d": "t6"}


def test_results_table_is_returned_not_printed(capsys) -> None:
    """Library code builds the table; printing it is the CLI's job."""
    from rich.console import Console

    from embedtune.records import EpochPoint
    from embedtune.sweep.results import results_table

    record = TrialRecord(
        trial_id="t1", config_hash="a", model="m", model_label="mini", dataset="medquad", epochs=2,
        lr=5e-5, batch_size=16, warmup_ratio=0.1, seed=42, status="FINISHED", best_epoch=2,
        history=[EpochPoint(0, {"ir_mrr_at_10": 0.5}), EpochPoint(2, {"ir_mrr_at_10": 0.625})],
        best_metrics={"ir_mrr_at_10": 0.625},
    )  # fmt: skip
    table = results_table([record], "ir_mrr_at_10")
    assert capsys.readouterr().out == ""
    assert table.row_count == 1 and [c.header for c in table.columns][-2:] == ["ir_mrr_at_10", "time s"]
    out = io.StringIO()
    Console(width=160, file=out).print(table)
    text = out.getvalue()
    assert "medquad" in text and "mini" in text and "0.5000" in text and "0.6250" in text


def test_extension_problem_allows_only_growth() -> None:
    old = parse_spec(tiny_spec("ext", models=["paraphrase-MiniLM-L3-v2"]))
    grown = parse_spec(tiny_spec("ext", search={"epochs": [1, 2, 3], "lr": [1e-4]}, max_concurrent_trials=1))
    assert extension_problem(old, grown) is None
    assert "dropped" in extension_problem(grown, old)
    assert "train" in extension_problem(old, parse_spec(tiny_spec("ext", train={"max_seq_length": 64})))
    other_data = tiny_spec(
        "ext", models=["paraphrase-MiniLM-L3-v2"], datasets=[{**TINY_DATA, "max_pairs": 150}]
    )
    assert "dataset 'medquad' changed" in extension_problem(old, parse_spec(other_data))
    separate = tiny_spec("ext", search={"epochs": [1, 2, 3], "lr": [1e-4], "epochs_mode": "separate"})
    assert extension_problem(grown, parse_spec(separate)) == "search.epochs_mode changed"


def test_memory_settings_enter_the_identity_only_when_set() -> None:
    """`train.loss`, `mini_batch_size` and `gradient_checkpointing` came after run dirs existed: at
    their defaults a trial keeps the hash it had without them (its run dir is not rerun); set, they
    make a config of its own."""
    from embedtune.specs import TrainSettings

    config = {"model": "m", "dataset": "d", "epochs": 1, "lr": 2e-5, "batch_size": 16, "warmup_ratio": 0.1,
              "seed": 42}  # fmt: skip
    before = {k: v for k, v in TrainSettings().model_dump().items()
              if k not in ("loss", "mini_batch_size", "gradient_checkpointing")}  # fmt: skip
    now = TrainSettings().model_dump()
    assert config_hash(config, "fp", now, "neg") == config_hash(config, "fp", before, "neg")
    for changed in ({"loss": "cached_mnrl"}, {"gradient_checkpointing": True}, {"mini_batch_size": 8}):
        assert config_hash(config, "fp", {**now, **changed}, "neg") != config_hash(config, "fp", now, "neg")


# ---------------------------------------------------------------- the epoch axis (search.epochs_mode)


def test_separate_mode_hashes_are_unchanged_and_branch_members_are_their_own() -> None:
    """Separate mode keeps the identities run dirs already hold (pinned: the hash before epochs_mode
    existed); branch members differ (another schedule), and a branch trial's own hash equals its only
    member's when one epoch count is listed."""
    from embedtune.sweep.identity import BRANCH_SCHEDULE, member_hashes

    cfg, args = _hash_args()
    assert config_hash(cfg, **args) == "b4f573a839bf5320"
    assert config_hash({**cfg, "lr_schedule": "linear"}, **args) == "b4f573a839bf5320"
    branch = {**cfg, "lr_schedule": BRANCH_SCHEDULE}
    assert config_hash(branch, **args) != config_hash(cfg, **args)
    assert config_hash({**branch, "branch_epochs": "2"}, **args) == config_hash(branch, **args)
    assert config_hash({**branch, "branch_epochs": "1,2"}, **args) != config_hash(branch, **args)

    def hasher(c):
        return config_hash(c, **args)

    members = member_hashes({**branch, "branch_epochs": "1,2", "config_hash": "x"}, hasher)
    assert members == {1: hasher({**branch, "epochs": 1}), 2: hasher(branch)}
    assert member_hashes(cfg, hasher) == {2: hasher(cfg)}


def test_branch_mode_runs_one_trial_per_config_and_resume_skips_done_members() -> None:
    """Grid configs that differ only in epochs are one Tune trial trained to the largest count; its
    members are exactly the (config, epochs) of the grid; the driver's to-do list skips a branch
    whose members are all done, runs one with a member missing, and separate mode still runs one
    trial per (config, epochs)."""
    from embedtune.sweep.identity import member_hashes, trial_configs
    from embedtune.sweep.trials import _todo

    raw = tiny_spec("branch", search={"epochs": [1, 3, 2], "lr": [5e-5, 1e-4], "batch_size": [16]})
    spec = parse_spec(raw)
    assert spec.search.epochs_mode == "branch"  # the default
    hasher = ConfigHasher({"medquad": "fp"}, spec.train.model_dump(), {"medquad": "neg"})
    members = grid_configs(spec, hasher)
    trials = trial_configs(spec, hasher)
    assert len(members) == 2 * 3 * 2 and len(trials) == 2 * 2  # models x lr (x epochs for members)
    assert {t["epochs"] for t in trials} == {3} and {t["branch_epochs"] for t in trials} == {"1,2,3"}
    by_member = {h: e for t in trials for e, h in member_hashes(t, hasher).items()}
    assert by_member == {m["config_hash"]: m["epochs"] for m in members}
    assert len({t["config_hash"] for t in trials} | set(by_member)) == len(trials) + len(members)

    def rec(h, status="FINISHED"):
        return TrialRecord("t", h, "m", "m", "medquad", 1, 5e-5, 16, 0.1, 42, status)

    done = [rec(m["config_hash"]) for m in members]
    assert _todo(spec, hasher, done, []) == ([], 0, None)
    first = trials[0]
    missing = member_hashes(first, hasher)[2]
    todo, n, _ = _todo(spec, hasher, [r for r in done if r.config_hash != missing], [])
    assert n == 1 and todo == [first]
    failed = [rec(r.config_hash, "FAILED" if r.config_hash == missing else "FINISHED") for r in done]
    assert _todo(spec, hasher, failed, [])[0] == [first]  # a failed member reruns its branch
    assert _todo(spec, hasher, failed, [rec(missing, "FAILED")])[0] == []  # ... once per call

    separate = parse_spec({**raw, "search": {**raw["search"], "epochs_mode": "separate"}})
    sep = trial_configs(separate, hasher)
    assert len(sep) == len(members) and not any("branch_epochs" in c for c in sep)
    assert not {c["config_hash"] for c in sep} & set(by_member)  # another schedule: other trials


def test_branch_and_separate_sampled_spaces() -> None:
    """Sampled branch mode draws everything but epochs: each draw is one run checkpointed at every
    listed count; a distribution over epochs needs separate mode."""
    from embedtune.errors import EmbedtuneError

    raw = tiny_spec("sampled", search={"mode": "random", "num_samples": 2, "epochs": [1, 2], "lr": [5e-5]})
    space = param_space(parse_spec(raw))
    assert space["epochs"] == 2 and space["branch_epochs"] == "1,2"
    sep = param_space(parse_spec({**raw, "search": {**raw["search"], "epochs_mode": "separate"}}))
    assert "branch_epochs" not in sep and type(sep["epochs"]).__name__ == "Categorical"
    dist = {**raw["search"], "epochs": {"distribution": "randint", "low": 1, "high": 3}}
    with pytest.raises(EmbedtuneError, match="search.epochs_mode"):
        parse_spec({**raw, "search": dist})
    parse_spec({**raw, "search": {**dist, "epochs_mode": "separate"}})
    with pytest.raises(EmbedtuneError, match="search.epochs_mode"):
        parse_spec({**raw, "search": {**raw["search"], "epochs_mode": "both"}})


class _Grid(list):
    """The two things `collect_trials` reads of a Tune ResultGrid: its trials and their results."""

    def __init__(self, pairs) -> None:
        super().__init__(r for _, r in pairs)
        self._experiment_analysis = SimpleNamespace(trials=[SimpleNamespace(trial_id=t) for t, _ in pairs])


def _branch_result(tmp_path, name: str, scores: list[float], error: str | None = None):
    """A branch trial's Tune result (listed counts 1,2,3) that reported `scores` for epochs 1..n,
    each with a real Tune checkpoint."""
    import pandas as pd
    from ray.tune import Checkpoint

    config = {
        "model": "m",
        "dataset": "medquad",
        "epochs": 3,
        "lr": 5e-5,
        "batch_size": 16,
        "warmup_ratio": 0.1,
        "seed": 42,
        "lr_schedule": "constant_with_warmup",
        "branch_epochs": "1,2,3",
    }
    rows, ckpts = [], []
    for epoch, score in enumerate(scores, start=1):
        row = {"epoch": epoch, "ir_recall_at_10": score, "time_total_s": 10.0 * epoch}
        rows.append(row)
        folder = tmp_path / name / f"checkpoint_{epoch:06d}"
        (folder / "model").mkdir(parents=True)
        ckpts.append((Checkpoint.from_directory(str(folder)), row))
    return SimpleNamespace(
        config=config,
        metrics_dataframe=pd.DataFrame(rows),
        error=RuntimeError(error) if error else None,
        best_checkpoints=ckpts,
        metrics=rows[-1],
    )


def test_branch_trial_records_one_entry_per_epoch_count(tmp_path) -> None:
    """A branch trial becomes one record per listed count: its own checkpoint and metrics at exactly
    that count, the history up to it, the training time up to it; counts never reached are done
    (KILLED: not rerun) but unusable, or FAILED after a crash (the shorter counts stay usable). The
    final stage's picks and the epoch advice's entries then see one model per epoch count."""
    from embedtune.final.pick import epoch_entries, pick_models
    from embedtune.specs import parse_spec
    from embedtune.sweep.identity import member_hashes
    from embedtune.sweep.results import collect_trials, done_configs

    spec = parse_spec(tiny_spec("records", models=["m"]))
    hasher = ConfigHasher({"medquad": "fp"}, spec.train.model_dump(), {"medquad": "neg"})
    base = {("m", "medquad"): {"ir_recall_at_10": 0.5}}
    full = _branch_result(tmp_path, "full", [0.6, 0.7, 0.65])
    killed = _branch_result(tmp_path, "killed", [0.55])
    crashed = _branch_result(tmp_path, "crashed", [0.58, 0.62], error="CUDA out of memory")
    for r, lr in ((killed, 1e-4), (crashed, 2e-4)):
        r.config["lr"] = lr
    grid = _Grid([("full", full), ("killed", killed), ("crashed", crashed)])
    records = collect_trials(grid, spec, base, {"full": "run-1"}, hasher)
    by = {(r.tune_trial_id, r.epochs): r for r in records}
    assert len(records) == 9 and len(by) == 9

    members = member_hashes(full.config, hasher)
    checkpoints = set()
    for e, score in ((1, 0.6), (2, 0.7), (3, 0.65)):
        r = by["full", e]
        assert r.trial_id == ("full" if e == 3 else f"full-e{e}") and r.run_trial_id == "full"
        assert r.config_hash == members[e] and r.status == "FINISHED" and r.usable("ir_recall_at_10")
        assert r.best_epoch == e and r.score("ir_recall_at_10") == score  # not the best epoch of the run
        assert [p.epoch for p in r.history] == list(range(e + 1)) and r.base_score("ir_recall_at_10") == 0.5
        assert r.best_checkpoint.endswith(f"checkpoint_{e:06d}/model") and r.duration_s == 10.0 * e
        assert r.mlflow_run_id == "run-1" and r.lr_schedule == "constant_with_warmup"
        checkpoints.add(r.best_checkpoint)
    assert len(checkpoints) == 3

    assert by["killed", 1].status == "FINISHED" and by["killed", 1].usable("ir_recall_at_10")
    for e in (2, 3):
        r = by["killed", e]
        assert r.status == "KILLED" and r.epochs_done == 1 and not r.usable("ir_recall_at_10")
        assert r.best_checkpoint is None and r.error is None
    assert {by["crashed", e].status for e in (1, 2)} == {"FINISHED"} and by["crashed", 2].error is None
    assert by["crashed", 3].status == "FAILED" and "out of memory" in by["crashed", 3].error
    done = done_configs(records)
    assert by["killed", 3].config_hash in done and by["crashed", 3].config_hash not in done

    # the final stage: the best (config, epochs) per base model, and one entry per other epoch count
    only_full = [by["full", e] for e in (1, 2, 3)]
    picked = pick_models(only_full, ["m"], top_k=0, metric="ir_recall_at_10", datasets=["medquad"])
    tuned = [e for e in picked["medquad"] if e.kind == "tuned"]
    assert [(e.epochs, e.trial_id) for e in tuned] == [(2, "full-e2")]
    extra = epoch_entries(only_full, picked, "ir_recall_at_10")["medquad"]
    assert sorted((e.epochs, e.path) for e in extra) == [
        (1, by["full", 1].best_checkpoint),
        (3, by["full", 3].best_checkpoint),
    ]
