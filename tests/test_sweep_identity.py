"""A trial's identity (config hash), the explicit grid Tune runs, merging trial records across
experiments, and which spec changes may extend a run dir."""

from __future__ import annotations

import json
import subprocess
import sys

from specs import TINY_DATA, tiny_spec

from embedtune.records import TrialRecord
from embedtune.specs import parse_spec
from embedtune.sweep.identity import ConfigHasher, config_hash, explicit_space, grid_configs
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
        return TrialRecord(
            trial_id=tid,
            config_hash=h,
            model="m",
            model_label="m",
            dataset="d",
            epochs=1,
            lr=1e-5,
            batch_size=16,
            warmup_ratio=0.1,
            seed=42,
            status=status,
        )

    old = [rec("a", "t1", "FINISHED"), rec("b", "t2", "FAILED"), rec("c", "t3", "KILLED")]
    new = [rec("b", "t4", "FINISHED"), rec("c", "t5", "FAILED"), rec("d", "t6", "FINISHED")]
    merged = {r.config_hash: r.trial_id for r in merge_records(old, new)}
    # a rerun replaces a failed record; a done one (KILLED by the scheduler too) stays
    assert merged == {"a": "t1", "b": "t4", "c": "t3", "d": "t6"}


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
