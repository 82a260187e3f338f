"""A trial's identity and the space Tune draws trials from.

A trial is the hash of its resolved config (`config_hash`: model, data label and fingerprint,
hyperparameters, the train settings and hard-negative key). A grid sweep runs an explicit list of
configs (`grid_configs`), handed to Tune as points to evaluate, so a rerun or a grown grid can run
exactly the configs not done yet. Sampled modes (random/optuna) draw from `param_space`.

Epoch axis (`search.epochs_mode`). separate: one Tune trial per (config, epochs), as the study ran.
branch: the configs that differ only in `epochs` are one Tune trial (`branch_configs`) that trains
to the largest count with a schedule that does not depend on the total (`BRANCH_SCHEDULE`) and is
checkpointed at each listed count (`branch_epochs`). Each listed count keeps the identity of its
own (config, epochs) — a *member* (`member_hashes`) — so trial records, resume and the report see
one entry per (config, epochs) in both modes; the Tune trial's own hash adds the other listed
counts, and equals its only member's when one count is listed.
"""

from __future__ import annotations

import itertools
import re
from typing import Any

from embedtune.cache import stable_hash
from embedtune.models import model_label
from embedtune.specs import Distribution, SweepSpec
from embedtune.specs.metrics import HP_TYPES, HYPERPARAMS

_UNSET = object()
LATER_DEFAULTS = {
    "loss": "mnrl",
    "mini_batch_size": 32,
    "gradient_checkpointing": False,
    "gist_temperature": 0.01,
    "gist_margin_strategy": "relative",
    "gist_margin": 0.05,
    "matryoshka_dims": None,
}
# Branch mode's learning-rate schedule: warmup, then constant. The model after e epochs is then the
# same whatever the run's total, so one run's checkpoint at e stands for an e-epoch run.
# (Warmup-stable-decay, a short decay branched off at each count, scored slightly higher in a trial
# on this machine, at the cost of one extra partial run per count and copies of the optimizer.)
BRANCH_SCHEDULE = "constant_with_warmup"
LINEAR_SCHEDULE = "linear"
BRANCH_KEYS = ("branch_epochs", "config_hash")  # a branch trial's keys no member has


def config_hash(
    config: dict[str, Any],
    fingerprint: str | None,
    train_settings: dict[str, Any],
    negatives_key: str | None = None,
) -> str:
    """A trial's identity: model, data (label and fingerprint), hyperparameters (typed, so 1 and
    1.0 agree), the train settings that shape the result and, with hard negatives, their key. Key
    order and the Tune-only keys (`config_hash` itself) do not matter."""
    # A loss searched (search.loss) is the trial's train.loss: the same config hashes alike either way.
    settings = {**train_settings, **({"loss": str(config["loss"])} if config.get("loss") else {})}
    # Settings added later count only when set, so trials of older run dirs keep their identity.
    train = {k: v for k, v in sorted(settings.items()) if LATER_DEFAULTS.get(k, _UNSET) != v}
    material = {
        "model": str(config["model"]),
        "dataset": str(config["dataset"]),
        "data": fingerprint,
        **{k: cast(config[k]) for k, cast in HP_TYPES.items()},
        "train": train,
        "negatives": negatives_key if train.get("hard_negatives") else None,
    }
    if int(config.get("repeat") or 0):  # grid repeats (search.num_samples > 1) are distinct trials
        material["repeat"] = int(config["repeat"])
    # Only a non-default schedule enters the material: separate mode's hashes stay what they were.
    schedule = str(config.get("lr_schedule") or LINEAR_SCHEDULE)
    if schedule != LINEAR_SCHEDULE:
        material["lr_schedule"] = schedule
    also = sorted(set(branch_epochs(config) or []) - {int(config["epochs"])})
    if also:  # a branch trial: also checkpointed (and recorded) at these epoch counts
        material["branch_epochs"] = also
    return stable_hash("trial-config-v1", material)


def epochs_text(epochs) -> str:
    """A branch trial's `branch_epochs` value: "1,2,3" (a string: Tune would walk into a list in a
    config as a nested search space)."""
    return ",".join(str(e) for e in sorted({int(e) for e in epochs}))


def branch_epochs(config: dict[str, Any]) -> list[int] | None:
    """The epoch counts a branch trial is checkpointed and recorded at (sorted); None for a trial
    of separate mode."""
    listed = config.get("branch_epochs")
    if not listed:
        return None
    parts = listed.split(",") if isinstance(listed, str) else listed
    return sorted({int(e) for e in parts})


def member_config(config: dict[str, Any], epochs: int) -> dict[str, Any]:
    """The (config, epochs) a branch trial stands for at `epochs`."""
    return {**{k: v for k, v in config.items() if k not in BRANCH_KEYS}, "epochs": int(epochs)}


def member_hashes(config: dict[str, Any], hasher) -> dict[int, str]:
    """{epoch count: config hash} of what a trial records: each listed count of a branch trial, or
    a separate trial's own epochs."""
    listed = branch_epochs(config)
    if listed is None:
        return {int(config["epochs"]): hasher(config)}
    return {e: hasher(member_config(config, e)) for e in listed}


def is_done(config: dict[str, Any], hasher, done: set[str] | dict[str, Any]) -> bool:
    """Whether every (config, epochs) a trial would record is in `done`."""
    return all(h in done for h in member_hashes(config, hasher).values())


class ConfigHasher:
    """`config_hash` for the configs of one sweep (picklable: Tune stores callbacks holding it)."""

    def __init__(
        self, fingerprints: dict[str, str], train_settings: dict[str, Any], negatives: dict[str, str]
    ) -> None:
        self.fingerprints = dict(fingerprints)
        self.train_settings = dict(train_settings)
        self.negatives = dict(negatives)

    def __call__(self, config: dict[str, Any]) -> str:
        if config.get("config_hash"):
            return str(config["config_hash"])
        label = str(config["dataset"])
        return config_hash(
            config, self.fingerprints.get(label), self.train_settings, self.negatives.get(label)
        )

    def members(self, config: dict[str, Any]) -> list[str]:
        """The hashes of the (config, epochs) a trial of `config` records (see `member_hashes`)."""
        return list(member_hashes(config, self).values())


def grid_configs(spec: SweepSpec, hasher: ConfigHasher) -> list[dict[str, Any]]:
    """Every (config, epochs) of a grid sweep: models × datasets × the search lists (× repeats).
    In branch mode these are the members; `trial_configs` gives what Tune runs."""
    out = []
    losses = spec.search.loss or [None]  # None: train.loss, not a key of the config
    axes = [
        spec.models,
        [d.label for d in spec.datasets],
        losses,
        *(getattr(spec.search, k) for k in HYPERPARAMS),
    ]
    for repeat in range(spec.search.num_samples):
        for model, label, loss, *values in itertools.product(*axes):
            cfg: dict[str, Any] = {
                "model": model,
                "dataset": label,
                **dict(zip(HYPERPARAMS, values, strict=True)),
            }
            if loss is not None:
                cfg["loss"] = loss
            if repeat:
                cfg["repeat"] = repeat
            if spec.search.branch:
                cfg["lr_schedule"] = BRANCH_SCHEDULE
            cfg["config_hash"] = hasher(cfg)
            out.append(cfg)
    return list({c["config_hash"]: c for c in out}.values())


def branch_configs(configs: list[dict[str, Any]], hasher: ConfigHasher) -> list[dict[str, Any]]:
    """One branch trial per group of `configs` that differ only in `epochs` (first-seen order):
    trained to the group's largest count, checkpointed at each of its counts."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for c in configs:
        rest = {k: v for k, v in c.items() if k not in ("epochs", *BRANCH_KEYS)}
        groups.setdefault(repr(sorted(rest.items())), []).append(c)
    out = []
    for members in groups.values():
        listed = sorted({int(c["epochs"]) for c in members})
        cfg = {**member_config(members[0], max(listed)), "branch_epochs": epochs_text(listed)}
        cfg.pop("config_hash", None)
        cfg["config_hash"] = hasher(cfg)
        out.append(cfg)
    return out


def trial_configs(spec: SweepSpec, hasher: ConfigHasher) -> list[dict[str, Any]]:
    """The configs Tune runs for a grid sweep: one per (config, epochs) in separate mode, one per
    branch (see `branch_configs`) in branch mode."""
    configs = grid_configs(spec, hasher)
    return branch_configs(configs, hasher) if spec.search.branch else configs


def explicit_space(
    configs: list[dict[str, Any]], max_concurrent: int | None = None
) -> tuple[dict[str, Any], Any]:
    """(param space, search algorithm) that run exactly `configs`, once each, in order: Tune's
    BasicVariantGenerator evaluates its `points_to_evaluate` first, and `num_samples` = their count
    leaves no draws beyond them. It limits concurrency itself (Tune's `max_concurrent_trials`
    applies to Searchers only)."""
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    keys = sorted({k for c in configs for k in c})
    space = {k: tune.choice(list({repr(c.get(k)): c.get(k) for c in configs}.values())) for k in keys}
    gen = BasicVariantGenerator(
        points_to_evaluate=[dict(c) for c in configs], max_concurrent=max_concurrent or 0
    )
    return space, gen


def _axis(value: list | Distribution, mode: str):
    from ray import tune

    if isinstance(value, Distribution):
        if value.distribution == "choice":
            return tune.choice(value.values)
        if value.distribution == "randint":
            return tune.randint(int(value.low), int(value.high) + 1)
        return getattr(tune, value.distribution)(value.low, value.high)
    if mode == "grid":
        return tune.grid_search(list(value)) if len(value) > 1 else value[0]
    return tune.choice(list(value)) if len(value) > 1 else value[0]


def param_space(spec: SweepSpec) -> dict[str, Any]:
    """Models × datasets × the search space. Grid mode crosses everything; sampled modes draw."""
    from ray import tune

    mode = spec.search.mode
    cross = tune.grid_search if mode == "grid" else tune.choice
    labels = [d.label for d in spec.datasets]
    space: dict[str, Any] = {
        "model": cross(spec.models) if len(spec.models) > 1 else spec.models[0],
        "dataset": cross(labels) if len(labels) > 1 else labels[0],
    }
    for name in HYPERPARAMS:
        space[name] = _axis(getattr(spec.search, name), mode)
    if spec.search.loss:
        space["loss"] = _axis(spec.search.loss, mode)
    if spec.search.branch:  # the epoch counts are checkpoints of one run, not a sampled axis
        space["epochs"] = spec.search.max_epochs
        space["branch_epochs"] = epochs_text(spec.search.epochs)
        space["lr_schedule"] = BRANCH_SCHEDULE
    return space


def trial_dirname(trial) -> str:
    """Tune's `trial_dirname_creator`: the trial's id, config hash and values (filesystem-safe)."""
    cfg = trial.config
    values = ",".join(f"{k}={cfg.get(k)}" for k in (*HYPERPARAMS, "loss") if k in cfg)
    digest = cfg.get("config_hash") or ""
    name = f"{trial}_{digest}_{model_label(str(cfg.get('model')))}_{cfg.get('dataset')}_{values}"
    return re.sub(r"[^\w.,=+-]+", "_", name)[:130]
