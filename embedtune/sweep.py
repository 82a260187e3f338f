"""The sweep driver: a SweepSpec becomes parallel Ray Tune trials, each an MLflow child run.

Once per sweep (in the driver): prepare every dataset, mine hard negatives once per (dataset,
miner), score every base model once per dataset (epoch 0 of every curve). Then a `tune.Tuner`
runs the trainable over models × datasets × the search space; the prepared data and triplets
travel to trials through Ray's object store (`tune.with_parameters`), so trials on other nodes
need no shared disk. Each trial reports every epoch with a checkpoint; ASHA can stop it early.
After the trials: `trials.json`, a results table, and the final stage (LanceDB + leaderboard).

Resume: the run directory remembers its spec; running the same command again (or
`embedtune sweep --resume RUN_DIR`) restores the Tuner, so finished trials are not rerun and
unfinished ones continue from their last checkpoint, into the same MLflow runs.

Idempotence: a trial's identity is the hash of its resolved config (`config_hash`: model, data
label and fingerprint, hyperparameters, the train settings and hard-negative key). A grid sweep
runs an explicit list of configs; rerunning it, or running a grown spec (more models, datasets or
search values; everything else equal) into the same run dir, launches only the configs whose hash
has no done trial (FINISHED, or KILLED by the scheduler; FAILED ones run again) as a new Tune
experiment (`tune-2`, `tune-3`, ...) beside the earlier ones. `trials.json` keeps one record per
config hash, old and new, and the MLflow experiment one child run per config hash (tag
`embedtune.config_hash`; a stale run of a config that runs again is deleted). Sampled modes
(random/optuna) cannot list their configs: there `num_samples` counts the run dir's done trials, and
a drawn config that is already done is skipped.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from embedtune import tracking
from embedtune.cache import stable_hash
from embedtune.config import GAIN_SUFFIX, HYPERPARAMS, Distribution, SweepSpec
from embedtune.data import PreparedData, prepare
from embedtune.errors import EmbedtuneError
from embedtune.evaluate import check_depth
from embedtune.models import model_label, resolve_model, truncate
from embedtune.negatives import Triplets, mine
from embedtune.train import TrainConfig, build_evaluator, cpu_threads_for, train

log = logging.getLogger(__name__)
STATE_FILE = "sweep_state.json"
TUNE_NAME = "tune"
DONE_STATUSES = ("FINISHED", "KILLED")  # KILLED = stopped by the scheduler: done, not to be rerun
# Spec keys an extension of a run dir may change (models/datasets may only grow); the rest must match.
EXTENSIBLE = {"final", "ray", "models", "datasets", "search", "max_concurrent_trials"}
# How the sweep behaves, not what it computes: free to change between runs of one sweep.
OPERATIONAL = {"final": True, "ray": True, "mlflow": {"outage_wait_s"}}
MLFLOW_JOURNAL = "mlflow_pending.json"  # records an unreachable tracking server did not take


@dataclass
class SweepResult:
    run_dir: Path
    trials: list[dict[str, Any]]
    parent_run_id: str
    tracking_uri: str
    experiment_id: str
    resumed: bool = False
    final: Any = None
    timings: dict[str, float] = field(default_factory=dict)
    launched: int = 0  # trials of the Tune experiments this call ran or resumed
    experiments: list[str] = field(default_factory=list)  # Tune experiments of the run dir


# ---------------------------------------------------------------- trial identity

_HP_TYPES = {"epochs": int, "lr": float, "batch_size": int, "warmup_ratio": float, "seed": int}


def config_hash(
    config: dict[str, Any],
    fingerprint: str | None,
    train_settings: dict[str, Any],
    negatives_key: str | None = None,
) -> str:
    """A trial's identity: model, data (label and fingerprint), hyperparameters (typed, so 1 and
    1.0 agree), the train settings that shape the result and, with hard negatives, their key. Key
    order and the Tune-only keys (`config_hash` itself) do not matter."""
    train = dict(sorted(train_settings.items()))
    material = {
        "model": str(config["model"]),
        "dataset": str(config["dataset"]),
        "data": fingerprint,
        **{k: cast(config[k]) for k, cast in _HP_TYPES.items()},
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


class _Pick:
    """`tune.sample_from`: one key of the explicit config named by the trial's `config_hash`."""

    def __init__(self, table: dict[str, dict[str, Any]], key: str) -> None:
        self.table, self.key = table, key

    def __call__(self, spec):
        return self.table[spec["config"]["config_hash"]].get(self.key)


class TrialDirname:
    """Tune's `trial_dirname_creator` for an explicit-config experiment: the trial's id, config
    hash and values. (When Tune names the directory the `sample_from` keys are still unresolved
    placeholders, so the values come from the config table by hash.)"""

    def __init__(self, configs: list[dict[str, Any]]) -> None:
        self.table = {c["config_hash"]: c for c in configs}

    def __call__(self, trial) -> str:
        digest = str(trial.config.get("config_hash"))
        cfg = self.table.get(digest, {})
        values = ",".join(f"{k}={cfg.get(k)}" for k in HYPERPARAMS)
        name = f"{trial}_{digest}_{model_label(str(cfg.get('model')))}_{cfg.get('dataset')}_{values}"
        return re.sub(r"[^\w.,=+-]+", "_", name)[:130]


def explicit_space(configs: list[dict[str, Any]]) -> dict[str, Any]:
    """A Tune param space running exactly `configs` (each with its `config_hash`), flat as usual."""
    from ray import tune

    table = {c["config_hash"]: dict(c) for c in configs}
    space: dict[str, Any] = {"config_hash": tune.grid_search(list(table))}
    for key in sorted({k for c in configs for k in c} - {"config_hash"}):
        space[key] = tune.sample_from(_Pick(table, key))
    return space


# ---------------------------------------------------------------- trial side


def _base_key(model: str, dataset: str) -> str:
    return f"{model}\t{dataset}"


def _trial(config: dict[str, Any], payload: dict[str, Any]) -> None:
    """Ray Tune trainable: one fine-tuning run, reporting every epoch with a checkpoint."""
    import psutil
    import ray
    import torch
    from datasets import Dataset
    from ray import tune

    digest = payload["hasher"](config)
    if digest in payload.get("skip", {}):  # a sampled draw of a config done earlier in the run dir
        print(f"[embedtune] config {digest} is already done in this run dir; skipped", flush=True)
        # Tune wants the metric in a trial's last result; the done trial's score also informs optuna.
        tune.report({payload["tune_metric"]: payload["skip"][digest], "skipped_done_config": 1})
        return
    label = config["dataset"]
    data = PreparedData(**payload["datasets"][label])
    data.train = [tuple(p) for p in data.train]
    data.eval_pairs = [tuple(p) for p in data.eval_pairs]
    trip = payload["triplets"].get(label)
    triplets = (
        Triplets(
            trip["key"], Path("."), Dataset.from_dict(trip["train"]), Dataset.from_dict(trip["eval"]), False
        )
        if trip
        else None
    )
    cpus = payload["resources"]["cpu"]
    cfg = TrainConfig(
        model=config["model"],
        epochs=int(config["epochs"]),
        lr=float(config["lr"]),
        batch_size=int(config["batch_size"]),
        warmup_ratio=float(config["warmup_ratio"]),
        seed=int(config["seed"]),
        threads=cpu_threads_for(cpus),
        **payload["train_settings"],
    )
    start_epoch, resume_dir = 0, None
    # Scratch in the trial's working directory (Tune chdirs there; it lives in Ray's session dir):
    # a trial the scheduler stops is killed without running `finally`, and Ray's temp dir, not
    # /tmp, then holds what it left.
    work = Path(tempfile.mkdtemp(prefix="embedtune-trial-", dir=os.getcwd()))
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:  # restored trial: continue after the last reported epoch
        local = Path(checkpoint.to_directory(str(work / "restored")))
        start_epoch = int(json.loads((local / "state.json").read_text())["epoch"])
        resume_dir = local / "model"
    gpus = payload["resources"]["gpu"]
    metric = payload["metric"]
    base_score = payload["base_scores"].get(_base_key(config["model"], label))
    started = time.time()
    proc = psutil.Process()

    def on_epoch(epoch: int, metrics: dict[str, float], ckpt: Path | None) -> None:
        (ckpt / "state.json").write_text(json.dumps({"epoch": epoch, "trial_config": config}))
        report = dict(metrics)
        report["epoch"] = epoch
        if metric in metrics and base_score is not None:
            report[metric + GAIN_SUFFIX] = metrics[metric] - base_score
        report["system/rss_mb"] = proc.memory_info().rss / 2**20
        report["system/cpu_threads"] = torch.get_num_threads()
        # Where the trial ran (strings: MLflow metric logging skips them; result.json keeps them).
        report["system/node_id"] = ray.get_runtime_context().get_node_id()
        report["system/cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        if torch.cuda.is_available():
            report["system/gpu_max_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
            report["gpu_seconds"] = (time.time() - started) * max(gpus, 0)
        tune.report(report, checkpoint=tune.Checkpoint.from_directory(str(ckpt)))

    try:
        train(
            cfg,
            data,
            triplets if cfg.hard_negatives else None,
            out_dir=None,
            on_epoch=on_epoch,
            checkpoint_every_epoch=True,
            resume_from=resume_dir,
            start_epoch=start_epoch,
            evaluate_base=False,
            progress=False,
            scratch_root=work,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ---------------------------------------------------------------- driver side


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
    space: dict[str, Any] = {
        "model": cross(spec.models) if len(spec.models) > 1 else spec.models[0],
        "dataset": cross([d.label for d in spec.datasets])
        if len(spec.datasets) > 1
        else spec.datasets[0].label,
    }
    for name in HYPERPARAMS:
        space[name] = _axis(getattr(spec.search, name), mode)
    return space


def spec_hash(spec: SweepSpec) -> str:
    return stable_hash(spec.model_dump(exclude=OPERATIONAL))


def _git_commit() -> str:
    try:
        here = Path(__file__).resolve().parent
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except Exception:
        return "unknown"


def _versions() -> dict[str, str]:
    import importlib.metadata as md

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


def _base_metrics(
    spec: SweepSpec, datasets: dict[str, PreparedData], triplets: dict[str, Triplets], run_dir: Path
):
    """Epoch-0 scores: every base model on every dataset, once (cached in the run dir)."""
    from sentence_transformers import SentenceTransformer

    path = run_dir / "base_metrics.json"
    cached = json.loads(path.read_text()) if path.exists() else {}
    out: dict[tuple[str, str], dict[str, float]] = {}
    for model in spec.models:
        st = None
        for label, data in datasets.items():
            key = f"{model}||{label}||{data.fingerprint}"
            if key not in cached:
                if st is None:
                    st = SentenceTransformer(str(resolve_model(model)), device="cpu")
                    truncate(st, spec.train.max_seq_length)
                from embedtune.train import _clean

                cached[key] = _clean(build_evaluator(data, triplets.get(label))(st))
                print(
                    f"[embedtune] base {model_label(model)} on {label}: ir_recall_at_10={cached[key].get('ir_recall_at_10', 0):.4f}",
                    flush=True,
                )
            out[(model, label)] = cached[key]
    tracking.write_json(path, cached)
    return out


def _triplets_payload(t: Triplets) -> dict[str, Any]:
    return {"key": t.key, "train": t.train.to_dict(), "eval": t.eval.to_dict()}


def _check_local_resources(spec: SweepSpec) -> None:
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


def _check_writable(path: Path) -> None:
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


def _load_state(run_dir: Path) -> dict[str, Any]:
    path = run_dir / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def _old_spec(run_dir: Path) -> SweepSpec | None:
    path = run_dir / "spec.json"
    try:
        return SweepSpec.model_validate_json(path.read_text()) if path.exists() else None
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


def _load_records(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "trials.json"
    return json.loads(path.read_text()) if path.exists() else []


def _record_order(r: dict[str, Any]):
    return (r.get("dataset") or "", r.get("model_label") or "", r.get("epochs") or 0, r.get("trial_id") or "")


def merge_records(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per config hash: a newer attempt replaces an older one, except that a done
    record (FINISHED/KILLED) is never replaced by another trial's undone one."""
    out: dict[str, dict[str, Any]] = {}
    for r in [*old, *new]:
        prev = out.get(r["config_hash"])
        if (
            prev is not None
            and prev["status"] in DONE_STATUSES
            and r["status"] not in DONE_STATUSES
            and prev.get("trial_id") != r.get("trial_id")
        ):
            continue
        out[r["config_hash"]] = r
    return sorted(out.values(), key=_record_order)


def _tune_score(record: dict[str, Any], spec: SweepSpec) -> float:
    """A done trial's score on the metric Tune ranks by (its best epoch; the gain over its base)."""
    metric = spec.scheduler.metric
    best = (record.get("best_metrics") or {}).get(metric)
    if best is None:
        return 0.0
    if spec.scheduler.compare == "gain":
        history = record.get("history") or [{}]
        return float(best) - float((history[0].get("metrics") or {}).get(metric, best))
    return float(best)


def _done(records: list[dict[str, Any]]) -> set[str]:
    return {r["config_hash"] for r in records if r["status"] in DONE_STATUSES}


def _todo(
    spec: SweepSpec, hasher: ConfigHasher, records: list[dict[str, Any]], attempted: set[str]
) -> tuple[list[dict[str, Any]] | None, int]:
    """What is left to run: (grid configs not done nor attempted in this call, their count), or
    for sampled modes (None, draws left: num_samples minus the run dir's done/attempted trials)."""
    skip = _done(records) | attempted
    if spec.search.mode == "grid":
        todo = [c for c in grid_configs(spec, hasher) if c["config_hash"] not in skip]
        return todo, len(todo)
    return None, max(0, spec.search.num_samples - len(skip))


def run_sweep(
    spec: SweepSpec,
    run_dir: Path,
    resume: bool | None = None,
    final: bool = True,
    ray_address: str | None = None,
) -> SweepResult:
    """Run (or resume, or extend) a sweep into `run_dir`. `resume=None` resumes when `run_dir`
    holds a run of the same spec, and extends it when the spec only grew (more models, datasets,
    search values): then only configs without a done trial run. True insists on resuming; False
    refuses to reuse a run dir."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from embedtune import ray_env

    timings: dict[str, float] = {}
    t0 = time.time()
    run_dir = Path(run_dir).resolve()
    state = _load_state(run_dir)
    digest = spec_hash(spec)
    storage = spec.storage_path or str(run_dir)
    extending = False
    if state:
        if resume is False:
            raise EmbedtuneError(f"run dir {run_dir} already holds this sweep; resume it or pass --fresh")
        if state.get("spec_hash") != digest:
            old = _old_spec(run_dir)
            problem = "its spec.json is missing" if old is None else extension_problem(old, spec)
            if problem:
                raise EmbedtuneError(
                    f"run dir {run_dir} holds a different sweep ({problem}; only models, datasets and "
                    "search values may grow); use another --run-dir or --fresh"
                )
            extending = True
    elif resume:
        raise EmbedtuneError(
            f"nothing to resume in {run_dir}: no {STATE_FILE} (start the sweep without --resume)"
        )

    # Fail fast, before any data work or Ray: an unreachable tracking server, unwritable storage,
    # unknown models.
    tracking.check_reachable(
        state.get("tracking_uri") or spec.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    )
    for where in {run_dir} if "://" in storage else {run_dir, Path(storage).resolve()}:
        _check_writable(where)
    if not (ray_address or spec.ray.address or os.environ.get("RAY_ADDRESS")):
        _check_local_resources(spec)
    for model in spec.models:
        resolve_model(model)
    old_fingerprints: dict[str, str] = state.get("fingerprints", {})
    datasets: dict[str, PreparedData] = {}
    for ds in spec.datasets:
        data = prepare(ds)
        was = old_fingerprints.get(data.label)
        if was and was != data.fingerprint:  # the trials done in this run dir trained on other data
            raise EmbedtuneError(
                f"the data of {data.label!r} changed since the sweep in {run_dir} (fingerprint {was} -> "
                f"{data.fingerprint}); use another --run-dir or --fresh"
            )
        datasets[data.label] = data
        if final and spec.final.enabled:
            check_depth(spec.final.eval, data, "final.eval.ks")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "data").mkdir(exist_ok=True)
    (run_dir / "spec.json").write_text(spec.model_dump_json(indent=2))
    for data in datasets.values():
        data.save(run_dir / "data" / f"{data.label}.json")
        print(
            f"[embedtune] data {data.label} ({data.fingerprint}): "
            + ", ".join(f"{k}={v}" for k, v in data.counts.items()),
            flush=True,
        )
    triplets: dict[str, Triplets] = {}
    if spec.train.hard_negatives:
        for label, data in datasets.items():
            triplets[label] = mine(data, spec.mining)
            how = "mined" if triplets[label].mined else "loaded from cache"
            print(
                f"[embedtune] hard negatives {label} ({how}, key {triplets[label].key}): {triplets[label].counts}",
                flush=True,
            )
    timings["prepare_s"] = time.time() - t0
    base = _base_metrics(spec, datasets, triplets, run_dir)
    timings["base_eval_s"] = time.time() - t0 - timings["prepare_s"]

    hasher = ConfigHasher(
        {k: v.fingerprint for k, v in datasets.items()},
        spec.train.model_dump(),
        {k: v.key for k, v in triplets.items()},
    )
    # Records of earlier runs in this dir (made before config hashes existed: hashed now).
    records = merge_records([], [dict(r, config_hash=hasher(r)) for r in _load_records(run_dir)])
    experiments: list[str] = list(state.get("experiments") or ([TUNE_NAME] if state else []))
    trials_done = bool(state.get("trials_done", state.get("finished") or (run_dir / "trials.json").exists()))

    # A resumed sweep keeps its store; else the spec's, MLflow's own env var, or SQLite in the run dir.
    tracking_uri = (
        state.get("tracking_uri")
        or spec.mlflow.tracking_uri
        or os.environ.get("MLFLOW_TRACKING_URI")
        or tracking.default_tracking_uri(run_dir)
    )
    experiment_id = tracking.ensure_experiment(tracking_uri, spec.experiment, run_dir / "mlartifacts")
    parent = tracking.start_parent_run(tracking_uri, experiment_id, state.get("parent_run_id"), spec.name)
    resumed = bool(state)
    state = {"spec_hash": digest, "parent_run_id": parent, "experiment_id": experiment_id, "tracking_uri": tracking_uri,
             "storage": storage, "finished": False, "trials_done": trials_done, "experiments": experiments,
             "fingerprints": {**old_fingerprints, **hasher.fingerprints}}  # fmt: skip
    tracking.write_json(run_dir / STATE_FILE, state)
    params = {
        "spec": spec.model_dump_json(),
        "git_commit": _git_commit(),
        **{f"fingerprint.{k}": v.fingerprint for k, v in datasets.items()},
        **{f"version.{k}": v for k, v in _versions().items()},
        **{f"negatives.{k}": v.key for k, v in triplets.items()},
    }
    if extending:  # the parent run's `spec` stays the first one; each extension adds its own
        params[f"spec.{digest}"] = params.pop("spec")
    tracking.log_params(tracking_uri, parent, params)

    def new_callback(skip=()) -> tracking.MlflowTrialCallback:
        return tracking.MlflowTrialCallback(tracking_uri, experiment_id, parent, base, spec.mlflow.log_models,
                                            hasher, skip, journal=run_dir / MLFLOW_JOURNAL)  # fmt: skip

    # Records an earlier run kept while the tracking server was away go in first.
    replayed = tracking.replay_journal(new_callback())
    if replayed:
        print(f"[embedtune] replayed {replayed} MLflow record(s) kept by the last run", flush=True)

    # An unfinished Tune experiment (interrupted) continues first, from its checkpoints.
    restore_path = _join(storage, experiments[-1]) if experiments and not trials_done else None
    if restore_path and not tune.Tuner.can_restore(restore_path):
        restore_path = None
    todo, n_todo = _todo(spec, hasher, records, set())
    if records and not restore_path:
        print(
            f"[embedtune] {len(_done(records))} config(s) already done in {run_dir}; {n_todo} to run",
            flush=True,
        )
    launched = 0
    if restore_path or n_todo:
        state["trials_done"] = False
        tracking.write_json(run_dir / STATE_FILE, state)
        # Disconnects from a joined cluster, or stops the private local Ray and removes its files.
        with ray_env.session(
            address=ray_address or spec.ray.address, num_cpus=spec.ray.num_cpus, num_gpus=spec.ray.num_gpus
        ):
            try:
                payload = {
                    "metric": spec.scheduler.metric,
                    "base_scores": {
                        _base_key(m, label): scores[spec.scheduler.metric]
                        for (m, label), scores in base.items()
                        if spec.scheduler.metric in scores
                    },
                    "datasets": {k: asdict(v) for k, v in datasets.items()},
                    "triplets": {k: _triplets_payload(v) for k, v in triplets.items()},
                    "train_settings": spec.train.model_dump(),
                    "resources": spec.resources.model_dump(),
                    "hasher": hasher,
                    "tune_metric": spec.scheduler.tune_metric,
                }

                def trainable(skip: set[str]):
                    scores = {r["config_hash"]: _tune_score(r, spec) for r in records}
                    skipped = {h: scores.get(h, 0.0) for h in skip}
                    return tune.with_resources(
                        tune.with_parameters(_trial, payload={**payload, "skip": skipped}),
                        {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu},
                    )

                attempted: set[str] = set()
                t1 = time.time()
                if restore_path:
                    print(f"[embedtune] resuming sweep from {restore_path}", flush=True)
                    # Sampled modes may draw a config already done in another experiment: skip it.
                    skip = _done(records) if spec.search.mode != "grid" else set()
                    callback = new_callback(skip)
                    tuner = tune.Tuner.restore(
                        restore_path, trainable=trainable(skip), resume_unfinished=True, resume_errored=True
                    )
                    new = _fit(tuner, restore_path, spec, base, run_dir, callback, hasher, skip)
                    known = {r["trial_id"] for r in records if r["status"] in DONE_STATUSES}
                    launched += sum(r["trial_id"] not in known for r in new)
                    attempted |= {r["config_hash"] for r in new}
                    records = merge_records(records, new)
                    tracking.write_json(run_dir / "trials.json", records)
                    todo, n_todo = _todo(spec, hasher, records, attempted)
                if n_todo:
                    name = TUNE_NAME if not experiments else f"{TUNE_NAME}-{len(experiments) + 1}"
                    experiments.append(name)
                    tracking.write_json(run_dir / STATE_FILE, state)
                    skip = _done(records) | attempted if todo is None else set()
                    callback = new_callback(skip)
                    print(f"[embedtune] running {n_todo} trial(s) as Tune experiment {name}", flush=True)
                    tuner = _new_tuner(
                        spec, trainable(skip), storage, callback, ASHAScheduler, name, todo, n_todo
                    )
                    new = _fit(tuner, _join(storage, name), spec, base, run_dir, callback, hasher, skip)
                    launched += len(new)
                    records = merge_records(records, new)
                    tracking.write_json(run_dir / "trials.json", records)
                timings["trials_s"] = time.time() - t1
            except KeyboardInterrupt:
                try:
                    n = tracking.close_open_children(tracking_uri, experiment_id, parent, "KILLED")
                    tracking.finish_run(tracking_uri, parent, "KILLED")
                    closed = f"{n} open trial run(s) marked KILLED"
                except Exception as exc:  # the tracking server is away too: the next run closes them
                    closed = f"open trial runs not closed (MLflow: {tracking.redact(str(exc))[:120]})"
                print(f"[embedtune] interrupted: {closed}; run the same command to resume", flush=True)
                raise KeyboardInterrupt from None
        state["trials_done"] = True
        tracking.write_json(run_dir / STATE_FILE, state)
        # The trials are done; what MLflow did not take during an outage goes in now (or the
        # command fails naming the journal, and its next run replays it).
        replayed = tracking.replay_journal(new_callback(), spec.mlflow.outage_wait_s)
        if replayed:
            print(f"[embedtune] replayed {replayed} kept MLflow record(s)", flush=True)
    trials = records
    lookup = new_callback()
    for record in trials:
        if not record.get("mlflow_run_id"):  # run by a restored Tuner's own callback, or MLflow was away
            record["mlflow_run_id"] = lookup.find_existing(record["trial_id"])
    tracking.write_json(run_dir / "trials.json", trials)
    print_results_table(trials, spec.scheduler.metric)

    result = SweepResult(
        run_dir, trials, parent, tracking_uri, experiment_id, resumed, None, timings, launched, experiments
    )
    if final and spec.final.enabled:
        from embedtune.finalize import run_final_stage

        t2 = time.time()
        try:
            result.final = run_final_stage(
                run_dir,
                trials,
                datasets,
                triplets,
                spec.models,
                spec.final,
                parent,
                tracking_uri,
                max_seq_length=spec.train.max_seq_length,
            )
        except BaseException as exc:  # the sweep's run never stays RUNNING; rerunning redoes only this stage
            interrupted = isinstance(exc, KeyboardInterrupt)
            tracking.finish_run(tracking_uri, parent, "KILLED" if interrupted else "FAILED")
            print(
                f"[embedtune] final stage {'interrupted' if interrupted else 'failed'}; the trials are done: "
                "run the same command to redo only the final stage",
                flush=True,
            )
            raise
        timings["final_s"] = time.time() - t2
    timings["total_s"] = time.time() - t0
    tracking.log_metrics(tracking_uri, parent, {f"timing.{k}": v for k, v in timings.items()}, step=0)
    tracking.finish_run(tracking_uri, parent, "FINISHED")
    state["finished"] = True
    tracking.write_json(run_dir / STATE_FILE, state)
    return result


def _fit(tuner, tune_path: str, spec: SweepSpec, base, run_dir: Path, callback, hasher, skip) -> list[dict]:
    """Run a Tuner to its end; the records of its trials. Tune catches SIGINT itself, saves its
    state one last time and returns early (stopping the running trials in memory): unfinished
    trials in the saved state mean an interruption, raised as KeyboardInterrupt."""
    from ray import tune

    grid = tuner.fit()
    saved = tune.ExperimentAnalysis(tune_path).trials
    if any(t.status not in ("TERMINATED", "ERROR") for t in saved):
        raise KeyboardInterrupt
    return collect_trials(grid, spec, base, run_dir, callback, hasher, skip)


def _join(storage: str, name: str) -> str:
    return f"{storage.rstrip('/')}/{name}" if "://" in storage else str(Path(storage) / name)


def _new_tuner(
    spec: SweepSpec,
    trainable,
    storage: str,
    callback,
    asha_cls,
    name: str = TUNE_NAME,
    configs: list[dict[str, Any]] | None = None,
    num_samples: int | None = None,
):
    """A Tuner over `configs` (grid mode: an explicit list, each run once) or, for sampled modes
    (`configs` None), `num_samples` draws from the spec's space."""
    from ray import tune

    scheduler = None
    max_epochs = _max_epochs(spec)
    if spec.scheduler.type == "asha":
        scheduler = asha_cls(
            time_attr="epoch",
            max_t=max_epochs,
            grace_period=min(spec.scheduler.grace_period, max_epochs),
            reduction_factor=spec.scheduler.reduction_factor,
        )
    search_alg = None
    if spec.search.mode == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(seed=0)
    return tune.Tuner(
        trainable,
        param_space=explicit_space(configs) if configs is not None else param_space(spec),
        tune_config=tune.TuneConfig(
            metric=spec.scheduler.tune_metric,
            mode=spec.scheduler.mode,
            scheduler=scheduler,
            search_alg=search_alg,
            num_samples=1 if configs is not None else (num_samples or spec.search.num_samples),
            max_concurrent_trials=spec.max_concurrent_trials,
            reuse_actors=False,
            trial_dirname_creator=TrialDirname(configs) if configs is not None else None,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage if "://" in storage else str(Path(storage).resolve()),
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=spec.checkpoints.keep,
                checkpoint_score_attribute=spec.scheduler.metric,
                checkpoint_score_order=spec.scheduler.mode,
            ),
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            callbacks=[callback],
            verbose=1,
        ),
    )


def _max_epochs(spec: SweepSpec) -> int:
    e = spec.search.epochs
    if isinstance(e, Distribution):
        return int(max(e.values) if e.values else e.high)
    return max(e)


def collect_trials(
    grid, spec: SweepSpec, base, run_dir: Path, callback=None, hasher=None, skip=()
) -> list[dict[str, Any]]:
    """Trial records (docs/INTERFACES.md) from a ResultGrid; the best checkpoint is chosen by the
    trial's best epoch, not its last. Trials of configs in `skip` that did not run are left out."""
    metric, mode = spec.scheduler.metric, spec.scheduler.mode
    records = []
    for trial, result in zip(grid._experiment_analysis.trials, grid, strict=True):
        cfg = result.config or {}
        trial_id = trial.trial_id
        digest = hasher(cfg) if hasher else cfg.get("config_hash")
        df = result.metrics_dataframe
        if digest in skip and (df is None or not len(df) or "epoch" not in df) and not result.error:
            continue  # a sampled draw of an already done config: it returned without training
        history = [{"epoch": 0, "metrics": base.get((cfg.get("model"), cfg.get("dataset")), {})}]
        if df is not None and len(df):
            for row in df.to_dict("records"):
                if "epoch" in row and row["epoch"] == row["epoch"]:
                    metrics = {
                        k: float(v)
                        for k, v in row.items()
                        if k.startswith(("ir_", "triplet_", "train_", "system/rss_mb")) and v == v
                    }
                    history.append({"epoch": int(row["epoch"]), "metrics": metrics})
        trained = [h for h in history if h["epoch"] > 0]
        best = (
            (max if mode == "max" else min)(trained, key=lambda h: h["metrics"].get(metric, float("nan")))
            if trained
            else None
        )
        done = max((h["epoch"] for h in trained), default=0)
        planned = int(cfg.get("epochs", done) or 0)
        status = "FAILED" if result.error else ("FINISHED" if done >= planned else "KILLED")
        best_ckpt = None
        if not result.error and result.best_checkpoints:
            ckpt = result.get_best_checkpoint(metric, mode) or result.checkpoint
            best_ckpt = _local_checkpoint(ckpt, run_dir, trial_id)
        metrics = result.metrics or {}
        # None when a restored Tuner ran its own (unpickled) copy of the callback: run_sweep looks
        # it up in MLflow once the kept records are in.
        run_id = callback.run_ids.get(trial_id) if callback else None
        records.append(
            {
                "trial_id": trial_id,
                "config_hash": digest,
                "model": cfg.get("model"),
                "model_label": model_label(str(cfg.get("model"))),
                "dataset": cfg.get("dataset"),
                **{k: cfg.get(k) for k in HYPERPARAMS},
                "status": status,
                "error": tracking.redact(tracking.exception_line(str(result.error)) or "")[:300] or None
                if result.error
                else None,
                "duration_s": float(metrics.get("time_total_s", 0.0) or 0.0),
                "gpu_seconds": metrics.get("gpu_seconds"),
                "epochs_done": done,
                "history": history,
                "best_epoch": best["epoch"] if best else None,
                "best_metrics": best["metrics"] if best else {},
                "best_checkpoint": best_ckpt,
                "mlflow_run_id": run_id,
            }
        )
    records.sort(key=_record_order)
    return records


def _local_checkpoint(ckpt, run_dir: Path, trial_id: str) -> str | None:
    """A local directory holding the checkpoint's sentence-transformers model (downloaded from
    remote storage when needed)."""
    if ckpt is None:
        return None
    path = Path(ckpt.path)
    if type(ckpt.filesystem).__name__ == "LocalFileSystem" and (path / "model").exists():
        return str(path / "model")
    target = run_dir / "checkpoints" / trial_id
    if not (target / "model").exists():
        ckpt.to_directory(str(target))
    return str(target / "model")


def print_results_table(trials: list[dict[str, Any]], metric: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"embedtune sweep results (best epoch by {metric})")
    for col in (
        "dataset",
        "model",
        "epochs",
        "lr",
        "batch",
        "status",
        "best epoch",
        "base",
        metric,
        "time s",
    ):
        table.add_column(col, justify="right" if col not in ("dataset", "model", "status") else "left")
    for t in trials:
        base_score = (t["history"][0]["metrics"] or {}).get(metric) if t["history"] else None
        score = t["best_metrics"].get(metric)
        table.add_row(
            str(t["dataset"]), t["model_label"], str(t["epochs"]), f"{t['lr']:.1e}" if t["lr"] else "-",
            str(t["batch_size"]), t["status"], str(t["best_epoch"] or "-"),
            f"{base_score:.4f}" if base_score is not None else "-", f"{score:.4f}" if score is not None else "-",
            f"{t['duration_s']:.0f}",
        )  # fmt: skip
    Console(width=max(120, shutil.get_terminal_size().columns)).print(table)


def resolve_run_dir(spec: SweepSpec, run_dir: str | None) -> Path:
    return Path(run_dir) if run_dir else Path("runs") / spec.name
