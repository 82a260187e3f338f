"""Step 3 of a sweep (`driver.run_sweep`): the sweep's MLflow experiment and parent run (the spec,
git commit, package versions and data fingerprints as its params); records an earlier run could
not send are replayed."""

from __future__ import annotations

import importlib.metadata as md
import logging
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embedtune.rundir import RunDir
from embedtune.specs import SweepSpec
from embedtune.sweep import preflight as pf
from embedtune.sweep.inputs import Inputs
from embedtune.tracking import client as mlc
from embedtune.tracking.callback import MlflowTrialCallback, replay_journal
from embedtune.tracking.journal import Journal
from embedtune.tracking.lineage import data_lineage
from embedtune.tracking.trial_runs import TrialRuns

log = logging.getLogger(__name__)


@dataclass
class Tracking:
    """Step 3's MLflow handles; `callback()` makes the Tune callback of one experiment."""

    uri: str
    experiment_id: str
    parent: str
    runs_args: dict[str, Any]
    journal: Journal

    def callback(self, skip=()) -> MlflowTrialCallback:
        return MlflowTrialCallback(TrialRuns(**self.runs_args), self.journal, skip)


def _git_commit() -> str:
    try:
        here = Path(__file__).resolve().parent
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except Exception:
        return "unknown"


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in (
        "embedtune",
        "torch",
        "ray",
        "mlflow",
        "lancedb",
        "sentence-transformers",
        "transformers",
        "datasets",
    ):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def open_tracking(
    spec: SweepSpec,
    rundir: RunDir,
    state: pf.SweepState | None,
    tracking_uri: str,
    inputs: Inputs,
    extending: bool,
) -> Tracking:
    experiment_id = mlc.ensure_experiment(tracking_uri, spec.experiment, rundir.mlartifacts)
    parent = mlc.start_parent_run(
        tracking_uri, experiment_id, state.parent_run_id if state else None, spec.name
    )
    params = {
        "spec": spec.model_dump_json(),
        "git_commit": _git_commit(),
        **{f"fingerprint.{k}": v.fingerprint for k, v in inputs.datasets.items()},
        **{f"version.{k}": v for k, v in _versions().items()},
        **{f"negatives.{k}": v.key for k, v in inputs.triplets.items()},
    }
    if extending:  # the parent run's `spec` stays the first one; each extension adds its own
        params[f"spec.{pf.spec_hash(spec)}"] = params.pop("spec")
    mlc.log_params(tracking_uri, parent, params)
    runs_args = {
        "tracking_uri": tracking_uri,
        "experiment_id": experiment_id,
        "parent_run_id": parent,
        "base_metrics": inputs.base,
        "epoch_metric": spec.scheduler.metric,
        "log_models": spec.mlflow.log_models,
        "hasher": inputs.hasher,
        "lineage": data_lineage(spec.datasets, {k: v.fingerprint for k, v in inputs.datasets.items()}),
    }
    tracking = Tracking(tracking_uri, experiment_id, parent, runs_args, Journal(rundir))
    # Records an earlier run kept while the tracking server was away go in first.
    replayed = replay_journal(tracking.callback())
    if replayed:
        log.info("replayed %d MLflow record(s) kept by the last run", replayed)
    return tracking
