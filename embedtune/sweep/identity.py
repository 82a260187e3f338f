"""A trial's identity and the space Tune draws trials from.

A trial is the hash of its resolved config (`config_hash`: model, data label and fingerprint,
hyperparameters, the train settings and hard-negative key). A grid sweep runs an explicit list of
configs (`grid_configs`), handed to Tune as points to evaluate, so a rerun or a grown grid can run
exactly the configs not done yet. Sampled modes (random/optuna) draw from `param_space`.
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
LATER_DEFAULTS = {"loss": "mnrl", "mini_batch_size": 32, "gradient_checkpointing": False}


def config_hash(
    config: dict[str, Any],
    fingerprint: str | None,
    train_settings: dict[str, Any],
    negatives_key: str | None = None,
) -> str:
    """A trial's identity: model, data (label and fingerprint), hyperparameters (typed, so 1 and
    1.0 agree), the train settings that shape the result and, with hard negatives, their key. Key
    order and the Tune-only keys (`config_hash` itself) do not matter."""
    # Settings added later count only when set, so trials of older run dirs keep their identity.
    train = {k: v for k, v in sorted(train_settings.items()) if LATER_DEFAULTS.get(k, _UNSET) != v}
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
    return stable_hash("trial-config-v1", material)


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


def grid_configs(spec: SweepSpec, hasher: ConfigHasher) -> list[dict[str, Any]]:
    """Every config of a grid sweep: models × datasets × the search lists (× repeats)."""
    out = []
    axes = [spec.models, [d.label for d in spec.datasets], *(getattr(spec.search, k) for k in HYPERPARAMS)]
    for repeat in range(spec.search.num_samples):
        for model, label, *values in itertools.product(*axes):
            cfg: dict[str, Any] = {
                "model": model,
                "dataset": label,
                **dict(zip(HYPERPARAMS, values, strict=True)),
            }
            if repeat:
                cfg["repeat"] = repeat
            cfg["config_hash"] = hasher(cfg)
            out.append(cfg)
    return list({c["config_hash"]: c for c in out}.values())


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
    return space


def trial_dirname(trial) -> str:
    """Tune's `trial_dirname_creator`: the trial's id, config hash and values (filesystem-safe)."""
    cfg = trial.config
    values = ",".join(f"{k}={cfg.get(k)}" for k in HYPERPARAMS)
    digest = cfg.get("config_hash") or ""
    name = f"{trial}_{digest}_{model_label(str(cfg.get('model')))}_{cfg.get('dataset')}_{values}"
    return re.sub(r"[^\w.,=+-]+", "_", name)[:130]
