"""Checks before any data work or Ray starts, each failing with one line that names what to fix,
and what a run dir's stored state says about this sweep (new, resumed, extended or refused)."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from embedtune import credentials, memory, ray_env, storage
from embedtune.cache import stable_hash
from embedtune.errors import EmbedtuneError
from embedtune.models import check_max_seq_length, resolve_model
from embedtune.rundir import SPEC, STATE, RunDir
from embedtune.specs import SweepSpec
from embedtune.tracking import client as mlc

log = logging.getLogger(__name__)

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
    trial_seconds: float = 0.0  # wall time of the trial phases so far (search.budget.minutes counts it)

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
    try:
        old = rundir.spec()
    except EmbedtuneError as exc:  # an older or edited spec.json: one line naming the file and key
        raise EmbedtuneError(f"{exc}; use another --run-dir or --fresh") from None
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


def planned_trials(spec: SweepSpec) -> int:
    """How many trials the spec asks for (grid: models x datasets x search lists x repeats)."""
    if spec.search.mode != "grid":
        return spec.search.draws
    n = len(spec.models) * len(spec.datasets) * spec.search.num_samples
    for key in ("epochs", "lr", "batch_size", "warmup_ratio", "seed"):
        n *= len(getattr(spec.search, key))
    return n


def checkpoint_bytes(spec: SweepSpec, cpus: float | None = None) -> tuple[int, str]:
    """Disk the sweep's checkpoints need at most (and how it was counted): Tune keeps
    `checkpoints.keep` per trial, each the size of its model, and a running trial writes its next one
    before dropping the oldest."""
    model = max(storage.folder_bytes(resolve_model(m)) for m in spec.models)
    trials = planned_trials(spec)
    running = min(trials, spec.max_concurrent_trials or trials)
    if cpus:
        running = min(running, max(1, int(cpus // spec.resources.cpu)))
    need = model * (spec.checkpoints.keep * trials + running)
    how = (
        f"checkpoints.keep {spec.checkpoints.keep} x {trials} trial(s) + {running} running, "
        f"x {model / 2**20:.0f} MiB per model"
    )
    return need, how


def check_disk(spec: SweepSpec, where: Path, cpus: float | None = None) -> None:
    """Refuse, in one line, a sweep whose checkpoints cannot fit in the free space at `where`
    (the Tune storage, local) instead of failing hours in with a full disk."""
    probe = Path(where).resolve()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    need, how = checkpoint_bytes(spec, cpus)
    if need > free:
        raise EmbedtuneError(
            f"not enough disk for the checkpoints at {where}: about {need / 2**30:.1f} GiB needed ({how}), "
            f"{free / 2**30:.1f} GiB free; free space, lower checkpoints.keep or fewer trials"
            + (" (search.budget.max_trials)" if spec.search.mode == "auto" and spec.search.budget else "")
            + ", or set storage_path to a bigger disk"
        )


def _existing(path: Path) -> Path:
    probe = Path(path).resolve()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def check_local_staging(spec: SweepSpec, rundir: RunDir, joins_cluster: bool, ray_tmp: Path) -> None:
    """With the Tune storage on object storage, what still lands on this machine's disk, refused
    in one line when it cannot fit: the final stage's local copies of the checkpoints it evaluates
    (in the run dir's local work folder) and, on a private local Ray, each running trial's
    checkpoint staged in Ray's temp dir (`ray_tmp`) before it is uploaded (the one written and the
    one restored). A cluster's worker disks are not seen from here (README)."""
    model = max(storage.folder_bytes(resolve_model(m)) for m in spec.models)
    per_pair = (
        len(spec.search.epochs) if spec.final.epoch_compare and isinstance(spec.search.epochs, list) else 1
    )
    copies = len(spec.models) * len(spec.datasets) * per_pair + spec.final.top_k
    needs = {rundir.path: (model * copies, f"{copies} checkpoint copies for the final stage")}
    if not joins_cluster:
        trials = planned_trials(spec)
        running = min(
            trials, spec.max_concurrent_trials or trials, max(1, int(_local_cpus(spec) // spec.resources.cpu))
        )
        needs[ray_tmp] = (model * 2 * running, f"{running} running trial(s) x 2 staged checkpoints")
    by_disk: dict[int, list[tuple[Path, int, str]]] = {}
    for where, (need, how) in needs.items():
        by_disk.setdefault(os.stat(_existing(where)).st_dev, []).append((where, need, how))
    for parts in by_disk.values():
        need = sum(n for _, n, _ in parts)
        free = shutil.disk_usage(_existing(parts[0][0])).free
        if need > free:
            where = " and ".join(str(w) for w, _, _ in parts)
            how = " + ".join(h for _, _, h in parts)
            raise EmbedtuneError(
                f"not enough local disk at {where} (the Tune storage is remote, but checkpoints pass through "
                f"here): about {need / 2**30:.2f} GiB needed ({how}, x {model / 2**20:.0f} MiB per model), "
                f"{free / 2**30:.2f} GiB free; free space there (a private Ray stages in /tmp), or set EMBEDTUNE_HOME "
                "(the run's local work folder) to a bigger disk"
            )


def tracking_uri_for(spec: SweepSpec, rundir: RunDir, state: SweepState | None) -> str:
    """A resumed sweep keeps its store; else the spec's, MLflow's own env var, or SQLite in the run dir.
    Returned as it may be stored: without its password (moved to $MLFLOW_TRACKING_PASSWORD)."""
    given = [spec.mlflow.tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")]
    clean = [mlc.keep_secret_in_env(u) if u else None for u in given]  # a password given now counts
    uri = (state.tracking_uri if state else None) or clean[0] or clean[1] or rundir.sqlite_tracking_uri()
    return mlc.keep_secret_in_env(uri)


def without_secrets(spec: SweepSpec) -> SweepSpec:
    """`spec` as it may be written to the run dir and hashed: a password in mlflow.tracking_uri
    moves to the environment (see `tracking.client.keep_secret_in_env`), an S3 key pair in
    storage_path or final.lancedb_uri to AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (see
    `credentials.s3_keys_to_env`); any other credential there or in a dataset source is refused."""
    for i, data in enumerate(spec.datasets):
        credentials.check_source(data.source, f"datasets.{i}.source")
    pairs = {credentials.s3_keys_of(u) for u in (spec.storage_path, spec.final.lancedb_uri)} - {None}
    if len(pairs) > 1:
        raise EmbedtuneError(
            "storage_path and final.lancedb_uri carry different S3 keys: a run uses one S3 login; give it once, "
            "or through AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
        )
    uri = spec.mlflow.tracking_uri
    clean = mlc.keep_secret_in_env(uri) if uri else uri
    update: dict = {}
    if clean != uri:
        update["mlflow"] = spec.mlflow.model_copy(update={"tracking_uri": clean})
    storage_path = credentials.s3_keys_to_env(spec.storage_path, "storage_path")
    if storage_path != spec.storage_path:
        update["storage_path"] = storage_path
    lancedb_uri = credentials.s3_keys_to_env(spec.final.lancedb_uri, "final.lancedb_uri")
    if lancedb_uri != spec.final.lancedb_uri:
        update["final"] = spec.final.model_copy(update={"lancedb_uri": lancedb_uri})
    return spec.model_copy(update=update) if update else spec


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
    check_seq_lengths(spec)
    tune_root = rundir.tune_storage(spec.storage_path, spec.name)
    if not storage.is_remote(tune_root):
        check_disk(spec, storage.local_path(tune_root), None if joins_cluster else _local_cpus(spec))
    else:
        check_local_staging(spec, rundir, joins_cluster, ray_env.TEMP_ROOT)
    return tracking_uri


def check_seq_lengths(spec: SweepSpec) -> None:
    """Every truncation length the sweep sets fits each model it applies to (refused here, naming the
    model, its limit and the value, instead of an index error in a trial)."""
    for model in spec.models:
        check_max_seq_length(model, spec.train.max_seq_length, "train.max_seq_length")
        check_max_seq_length(model, spec.final.eval.max_seq_length, "final.eval.max_seq_length")
    if spec.train.hard_negatives:
        check_max_seq_length(spec.mining.model, spec.mining.max_seq_length, "mining.max_seq_length")


def _local_cpus(spec: SweepSpec) -> float:
    return spec.ray.num_cpus or os.cpu_count() or 1


# ---------------------------------------------------------------- GPU memory probe

PROBE_WAIT_ENV = "EMBEDTUNE_PROBE_WAIT_S"  # on a cluster with no GPU node yet: seconds to wait for one
# Default wait on a cluster whose autoscaler can add a GPU node: a cold GPU node (machine, image
# pull, Ray start) takes minutes; the trials wait for the same node anyway.
PROBE_WAIT_AUTOSCALING_S = 900.0


def probe_wait_s(setting: str | None, autoscaling: bool) -> float:
    """Seconds the memory probe waits for a GPU worker: EMBEDTUNE_PROBE_WAIT_S when set (0: do not
    wait), else PROBE_WAIT_AUTOSCALING_S on an autoscaling cluster and 0 on a fixed one."""
    if setting is not None and setting.strip():
        try:
            wait = float(setting)
        except ValueError:
            raise EmbedtuneError(
                f"{PROBE_WAIT_ENV}={setting!r} is not a number of seconds (e.g. 600, or 0)"
            ) from None
        return max(wait, 0.0)
    return PROBE_WAIT_AUTOSCALING_S if autoscaling else 0.0


def _cluster_autoscales() -> bool:
    """True when an autoscaler runs for the connected cluster: Ray's v1 monitor publishes its status
    in the GCS key-value store, v2 marks itself there."""
    try:
        from ray._private import ray_constants
        from ray.experimental import internal_kv

        if internal_kv._internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS):
            return True
        from ray.autoscaler.v2.utils import is_autoscaler_v2

        return is_autoscaler_v2(fetch_from_server=True)
    except Exception:  # noqa: BLE001 - an internal API of Ray: without it, the fixed-cluster default
        log.debug("could not tell whether the Ray cluster autoscales", exc_info=True)
        return False


def probe_keys(spec: SweepSpec) -> list[memory.ProbeKey]:
    """The distinct (model, batch size, sequence length, loss, checkpointing) steps of a sweep."""
    sizes = spec.search.batch_size
    batches = sorted({int(b) for b in sizes}) if isinstance(sizes, list) else [int(sizes.largest)]
    t = spec.train
    return [
        memory.ProbeKey(
            m,
            b,
            t.max_seq_length,
            loss,
            t.mini_batch_size,
            t.gradient_checkpointing,
            t.hard_negatives,
            t.fp16,
        )  # fmt: skip
        for m in spec.models
        for b in batches
        for loss in spec.losses
    ]


def run_probes(keys: list[memory.ProbeKey]) -> list[dict]:
    """One measured training step per key on this process's GPU ([] without CUDA)."""
    import torch

    from embedtune.specs import TrainConfig
    from embedtune.train import probe_memory

    if not torch.cuda.is_available():
        return []
    configs = [
        TrainConfig(
            model=k.model,
            batch_size=k.batch_size,
            max_seq_length=k.max_seq_length,
            loss=k.loss,
            mini_batch_size=k.mini_batch_size,
            gradient_checkpointing=k.gradient_checkpointing,
            hard_negatives=k.hard_negatives,
            fp16=k.fp16,
        )  # fmt: skip
        for k in keys
    ]
    return [probe_memory(c, "cuda") for c in configs]


def _probe_on_cluster(spec: SweepSpec, keys: list[memory.ProbeKey], address: str) -> list[dict] | None:
    """Run the probes as a Ray task asking for a trial's GPU share, so it lands on a GPU worker."""
    import ray

    from embedtune import ray_env

    setting = os.environ.get(PROBE_WAIT_ENV)
    with ray_env.session(address=address):
        wait_s = probe_wait_s(setting, _cluster_autoscales())
        if ray.cluster_resources().get("GPU", 0) <= 0 and wait_s <= 0:
            log.info(
                "memory probe skipped: no GPU node in the Ray cluster yet (set %s to wait for the autoscaler)",
                PROBE_WAIT_ENV,
            )
            return None
        task = ray.remote(num_gpus=min(spec.resources.gpu, 1.0), num_cpus=min(spec.resources.cpu, 1.0))(
            run_probes
        )
        ref = task.remote(keys)
        started = time.time()
        done, _ = ray.wait([ref], timeout=max(wait_s, 0) + 600)
        if not done:
            ray.cancel(ref, force=True)
            log.info("memory probe skipped: no GPU worker took it within %.0f s", time.time() - started)
            return None
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as exc:  # one line, as every preflight error
            cause = getattr(exc, "cause", None) or exc
            first = (str(cause).strip().splitlines() or [""])[0][:300]
            raise EmbedtuneError(
                f"memory probe failed on a GPU worker: {type(cause).__name__}: {first}"
            ) from None


def check_gpu_memory(spec: SweepSpec, address: str | None = None) -> list[tuple[memory.ProbeKey, dict]]:
    """Before any trial: one measured training step per distinct memory shape on a GPU (this
    machine's, or a cluster worker's), refusing in one line a config whose peak exceeds its
    `resources.gpu` share of the device (less a margin). Skipped, with a log line, without a GPU."""
    if spec.resources.gpu <= 0:
        return []
    keys = probe_keys(spec)
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        results = _probe_on_cluster(spec, keys, address)
    else:
        import torch

        if not torch.cuda.is_available():
            log.info("memory probe skipped: no CUDA GPU on this machine")
            return []
        results = run_probes(keys)
    if not results:
        if results is not None:
            log.info("memory probe skipped: the GPU worker has no CUDA device")
        return []
    for key, got in zip(keys, results, strict=True):
        line = memory.refusal(
            key,
            got["peak_gpu_bytes"],
            got["device_total_bytes"],
            spec.resources.gpu,
            got["device_name"],
            out_of_memory=bool(got.get("out_of_memory")),
        )
        if line:
            raise EmbedtuneError(line)
        log.info(
            "memory probe: %s: peak %.1f of %.1f GiB allowed on %s",
            key.describe(),
            got["peak_gpu_bytes"] / memory.GIB,
            memory.gpu_budget_bytes(got["device_total_bytes"], spec.resources.gpu) / memory.GIB,
            got["device_name"],
        )
    return list(zip(keys, results, strict=True))
