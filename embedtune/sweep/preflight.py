"""Checks before any data work or Ray starts, each failing with one line that names what to fix,
and what a run dir's stored state says about this sweep (new, resumed, extended or refused)."""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from embedtune import storage
from embedtune.cache import stable_hash
from embedtune.errors import EmbedtuneError
from embedtune.models import resolve_model
from embedtune.rundir import SPEC, STATE, RunDir
from embedtune.specs import SweepSpec
from embedtune.tracking import client as mlc

# Spec keys an extension of a run dir may change (models/datasets may only grow); the rest must match.
EXTENSIBLE = {"final", "ray", "models", "datasets", "search", "max_concurrent_trials"}
# How the sweep behaves, not what it computes: free to change between runs of one sweep.
OPERATIONAL = {"final": True, "ray": True, "mlflow": {"outage_wait_s"}}
TUNE_NAME = "tune"


@dataclass
class SweepState:
    """`sweep_state.json`: what a run dir remembers between runs of its sweep."""

    spec_hash: str = ""
    parent_run_id: str | None = None
    experiment_id: str | None = None
    tracking_uri: str | None = None
    storage: str | None = None
    finished: bool = False
    trials_done: bool = False
    experiments: list[str] = field(default_factory=list)  # Tune experiment names, oldest first
    fingerprints: dict[str, str] = field(default_factory=dict)  # dataset label -> data fingerprint

    @classmethod
    def load(cls, rundir: RunDir) -> SweepState | None:
        raw = rundir.read_json(STATE)
        if not raw:
            return None
        return cls(**{k: v for k, v in raw.items() if k in cls.__dataclass_fields__})

    def save(self, rundir: RunDir) -> None:
        rundir.write_json(STATE, asdict(self))

    def next_experiment(self) -> str:
        name = TUNE_NAME if not self.experiments else f"{TUNE_NAME}-{len(self.experiments) + 1}"
        self.experiments.append(name)
        return name


def spec_hash(spec: SweepSpec) -> str:
    return stable_hash(spec.model_dump(exclude=OPERATIONAL))


def stored_spec(rundir: RunDir) -> SweepSpec | None:
    raw = rundir.read_json(SPEC)
    try:
        return SweepSpec.model_validate(raw) if raw else None
    except Exception:
        return None


def extension_problem(old: SweepSpec, new: SweepSpec) -> str | None:
    """Why `new` cannot extend the sweep `old` in the same run dir; None when it can (only models,
    datasets and search values may grow or change; dropped models/datasets are not allowed)."""
    exclude = {**dict.fromkeys(EXTENSIBLE, True), **OPERATIONAL}
    a, b = old.model_dump(exclude=exclude), new.model_dump(exclude=exclude)
    changed = sorted(k for k in {*a, *b} if a.get(k) != b.get(k))
    if changed:
        return f"{', '.join(changed)} changed"
    if old.search.epochs_mode != new.search.epochs_mode:  # another schedule: every trial is another
        return "search.epochs_mode changed"
    dropped = [m for m in old.models if m not in new.models]
    if dropped:
        return f"model(s) {', '.join(dropped)} dropped"
    now = {d.label: d for d in new.datasets}
    for d in old.datasets:
        if d.label not in now:
            return f"dataset {d.label!r} dropped"
        if now[d.label].model_dump() != d.model_dump():
            return f"dataset {d.label!r} changed"
    return None


def check_run_dir(spec: SweepSpec, rundir: RunDir, state: SweepState | None, resume: bool | None) -> bool:
    """Whether this sweep may run into `rundir` given what it holds: nothing (a new sweep), the same
    sweep (resume), or one it grows (extend: returns True). Raises otherwise."""
    if state is None:
        if resume:
            raise EmbedtuneError(
                f"nothing to resume in {rundir}: no {STATE} (start the sweep without --resume)"
            )
        return False
    if resume is False:
        raise EmbedtuneError(f"run dir {rundir} already holds this sweep; resume it or pass --fresh")
    if state.spec_hash == spec_hash(spec):
        return False
    old = stored_spec(rundir)
    problem = f"its {SPEC} is missing" if old is None else extension_problem(old, spec)
    if problem:
        raise EmbedtuneError(
            f"run dir {rundir} holds a different sweep ({problem}; only models, datasets and "
            "search values may grow); use another --run-dir or --fresh"
        )
    return True


def check_writable(path: Path) -> None:
    """`path`, or the nearest existing folder it would be made in, takes a file (probed, removed);
    else one clear line naming it. Creates nothing, so a sweep refused later leaves no empty dir."""
    probe = path.resolve()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        if not probe.is_dir():
            raise NotADirectoryError(20, f"{probe} is a file")
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".embedtune-write-probe-"):
            pass
    except OSError as exc:
        raise EmbedtuneError(
            f"{path} is not writable ({exc.strerror or exc}): choose another --run-dir / storage_path"
        ) from None


def check_remote_writable(location: str) -> None:
    """Object storage at `location` takes a write (one small object, removed again); else one line
    naming the location and the reason (endpoint, credentials, bucket)."""
    probe = storage.join(location, ".embedtune-write-probe")
    try:
        storage.write_bytes(probe, b"probe")
        storage.delete(probe)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise EmbedtuneError(
            f"{location} is not writable ({first[:200]}): check the bucket, the endpoint (AWS_ENDPOINT_URL) and "
            "the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
        ) from None


def check_local_resources(spec: SweepSpec) -> None:
    """A private local Ray has this machine's CPUs and GPUs (or the spec's `ray.num_cpus/num_gpus`):
    a trial asking for more would wait in PENDING forever, so say so now. (A joined cluster may
    autoscale; Tune reports what it cannot place there.)"""
    import torch

    gpus = spec.ray.num_gpus if spec.ray.num_gpus is not None else torch.cuda.device_count()
    cpus = spec.ray.num_cpus or os.cpu_count() or 1
    if spec.resources.gpu > gpus:
        raise EmbedtuneError(
            f"resources.gpu: {spec.resources.gpu:g} per trial, but the local Ray has {gpus:g} GPU(s): set "
            "resources.gpu: 0 to train on CPU, declare GPUs with ray.num_gpus, or --address a cluster with GPUs"
        )
    if spec.resources.cpu > cpus:
        raise EmbedtuneError(
            f"resources.cpu: {spec.resources.cpu:g} per trial, but the local Ray has {cpus} CPU(s): lower "
            "resources.cpu or --address a bigger cluster"
        )


def tracking_uri_for(spec: SweepSpec, rundir: RunDir, state: SweepState | None) -> str:
    """A resumed sweep keeps its store; else the spec's, MLflow's own env var, or SQLite in the run dir."""
    return (
        (state.tracking_uri if state else None)
        or spec.mlflow.tracking_uri
        or os.environ.get("MLFLOW_TRACKING_URI")
        or rundir.sqlite_tracking_uri()
    )


def preflight(spec: SweepSpec, rundir: RunDir, state: SweepState | None, joins_cluster: bool) -> str:
    """The checks that need no data: the tracking server answers (and takes our credentials), the run
    dir and storage are writable, a private Ray can place a trial, every model resolves. Returns
    the tracking URI the sweep will use."""
    tracking_uri = tracking_uri_for(spec, rundir, state)
    mlc.check_access(tracking_uri)
    local = [] if rundir.remote else [rundir.path]
    remote = [rundir.location] if rundir.remote else []
    if spec.storage_path:
        (remote if storage.is_remote(spec.storage_path) else local).append(
            spec.storage_path
            if storage.is_remote(spec.storage_path)
            else storage.local_path(spec.storage_path).resolve()
        )
    for where in dict.fromkeys(local):
        check_writable(where)
    for where in dict.fromkeys(remote):
        check_remote_writable(str(where))
    if not joins_cluster:
        check_local_resources(spec)
    for model in spec.models:
        resolve_model(model)
    return tracking_uri
