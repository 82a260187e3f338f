"""Step 2 of a sweep (`driver.run_sweep`): every dataset split, hard negatives mined once per
(dataset, miner), every base model scored once per dataset (epoch 0 of every curve)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from embedtune import env, storage
from embedtune.cache import stable_hash
from embedtune.clock import StageClock
from embedtune.data import PreparedData, prepare
from embedtune.errors import EmbedtuneError
from embedtune.evaluate import check_depth
from embedtune.models import model_label, resolve_model, truncate
from embedtune.negatives import Triplets, mine
from embedtune.records import ModelData
from embedtune.rundir import RunDir
from embedtune.specs import SweepSpec
from embedtune.sweep import preflight as pf
from embedtune.sweep.identity import ConfigHasher

log = logging.getLogger(__name__)


@dataclass
class Inputs:
    """What step 2 prepared for the trials and the final stage."""

    datasets: dict[str, PreparedData]
    triplets: dict[str, Triplets]
    base: dict[ModelData, dict[str, float]]
    hasher: ConfigHasher


def prepare_inputs(
    spec: SweepSpec, rundir: RunDir, state: pf.SweepState | None, final: bool, clock: StageClock
) -> Inputs:
    """The data, the hard negatives and the base scores, each timed as its stage of `clock`."""
    with clock.stage("data"):
        datasets = prepare_datasets(spec, rundir, state, final)
    triplets: dict[str, Triplets] = {}
    with clock.stage("mining"):
        for label, data in datasets.items() if spec.train.hard_negatives else ():
            triplets[label] = mine(data, spec.mining)
            how = "mined" if triplets[label].mined else "loaded from cache"
            log.info(
                "hard negatives %s (%s, key %s): %s", label, how, triplets[label].key, triplets[label].counts
            )
    if not spec.train.hard_negatives:
        clock.skip("mining", "train.hard_negatives off")
    with clock.stage("base_scores"):
        base = base_metrics(spec, datasets, triplets, rundir)
    hasher = ConfigHasher(
        {k: v.fingerprint for k, v in datasets.items()},
        spec.train.model_dump(),
        {k: v.key for k, v in triplets.items()},
    )
    return Inputs(datasets, triplets, base, hasher)


def prepare_datasets(
    spec: SweepSpec, rundir: RunDir, state: pf.SweepState | None, final: bool
) -> dict[str, PreparedData]:
    """Every dataset split (refused when its data changed under the run dir's trials), stored."""
    old_fingerprints = state.fingerprints if state else {}
    datasets: dict[str, PreparedData] = {}
    for ds in spec.datasets:
        data = prepare(ds)
        was = old_fingerprints.get(data.label)
        if was and was != data.fingerprint:  # the trials done in this run dir trained on other data
            raise EmbedtuneError(
                f"the data of {data.label!r} changed since the sweep in {rundir} (fingerprint {was} -> "
                f"{data.fingerprint}); use another --run-dir or --fresh"
            )
        datasets[data.label] = data
        if final and spec.final.enabled:
            check_depth(spec.final.eval, data, "final.eval.ks")
    rundir.create()
    rundir.save_spec(spec)
    for data in datasets.values():
        rundir.save_data(data)
        log.info(
            "data %s (%s): %s",
            data.label,
            data.fingerprint,
            ", ".join(f"{k}={v}" for k, v in data.counts.items()),
        )
    return datasets


def base_metrics(
    spec: SweepSpec, datasets: dict[str, PreparedData], triplets: dict[str, Triplets], rundir: RunDir
) -> dict[ModelData, dict[str, float]]:
    """Epoch-0 scores: every base model on every dataset, once (kept in the run dir by model,
    dataset and data fingerprint, and across runs in embedtune's home, like mined negatives)."""
    from embedtune.models import load_model
    from embedtune.train import build_evaluator, evaluator_metrics

    stored = rundir.base_metrics()
    out: dict[ModelData, dict[str, float]] = {}
    for model in spec.models:
        st = None
        for label, data in datasets.items():
            key = (model, label, data.fingerprint)
            if key not in stored:
                cache = base_scores_cache(model, data, triplets.get(label), spec.train.max_seq_length)
                stored[key] = _read_cached(cache)
                if not stored[key]:
                    if st is None:
                        st = load_model(resolve_model(model))
                        truncate(st, spec.train.max_seq_length)
                    stored[key] = evaluator_metrics(build_evaluator(data, triplets.get(label))(st))
                    storage.write_local_atomic(
                        cache, json.dumps(stored[key]).encode(), "free space under EMBEDTUNE_HOME"
                    )
                log.info(
                    "base %s on %s: %s=%.4f",
                    model_label(model),
                    label,
                    spec.scheduler.metric,
                    stored[key].get(spec.scheduler.metric, float("nan")),
                )
            out[ModelData(model, label)] = stored[key]
    rundir.save_base_metrics(stored)
    return out


# Bumped when the evaluator's metrics change, so no score of an older evaluator is reused.
BASE_SCORES_VERSION = 1


def base_scores_cache(
    model: str, data: PreparedData, triplets: Triplets | None, max_seq_length: int | None
) -> Path:
    """Where a base model's epoch-0 scores on `data` are kept across runs: keyed by what decides
    them (the model, the data fingerprint, the triplets, the truncation, the evaluator's version),
    so a rerun into a new run dir (or a second sweep on the same data) scores no base model again."""
    from embedtune.models import packaged_name

    key = stable_hash(
        BASE_SCORES_VERSION,
        packaged_name(model) or model,
        data.fingerprint,
        triplets.key if triplets is not None else None,
        max_seq_length,
    )
    return env.home() / "base-scores" / f"{data.label}-{key}.json"


def _read_cached(path: Path) -> dict[str, float]:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # none yet, or unreadable: scored again (and rewritten)
    ok = isinstance(raw, dict) and raw and all(isinstance(v, int | float) for v in raw.values())
    return {k: float(v) for k, v in raw.items()} if ok else {}
