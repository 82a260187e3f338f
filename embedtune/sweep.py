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
"""

from __future__ import annotations

import json
import logging
import os
import platform
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
from embedtune.models import model_label, resolve_model, truncate
from embedtune.negatives import Triplets, mine
from embedtune.train import TrainConfig, build_evaluator, cpu_threads_for, train

log = logging.getLogger(__name__)
STATE_FILE = "sweep_state.json"
TUNE_NAME = "tune"


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
    return stable_hash(spec.model_dump(exclude={"final", "ray"}))


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


def _load_state(run_dir: Path) -> dict[str, Any]:
    path = run_dir / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def run_sweep(
    spec: SweepSpec,
    run_dir: Path,
    resume: bool | None = None,
    final: bool = True,
    ray_address: str | None = None,
) -> SweepResult:
    """Run (or resume) a sweep into `run_dir`. `resume=None` resumes when `run_dir` holds an
    unfinished run of the same spec; True insists on resuming; False refuses to reuse a run dir."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from embedtune import ray_env

    timings: dict[str, float] = {}
    t0 = time.time()
    run_dir = Path(run_dir).resolve()
    state = _load_state(run_dir)
    digest = spec_hash(spec)
    storage = spec.storage_path or str(run_dir)
    if state:
        if state.get("spec_hash") != digest:
            raise EmbedtuneError(
                f"run dir {run_dir} holds a different sweep (spec changed); use another --run-dir or --fresh"
            )
        if resume is False:
            raise EmbedtuneError(f"run dir {run_dir} already holds this sweep; resume it or pass --fresh")
    elif resume:
        raise EmbedtuneError(
            f"nothing to resume in {run_dir}: no {STATE_FILE} (start the sweep without --resume)"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "data").mkdir(exist_ok=True)
    (run_dir / "spec.json").write_text(spec.model_dump_json(indent=2))

    # Fail fast on unknown models, before any data work or Ray.
    for model in spec.models:
        resolve_model(model)
    datasets: dict[str, PreparedData] = {}
    for ds in spec.datasets:
        data = prepare(ds)
        data.save(run_dir / "data" / f"{data.label}.json")
        datasets[data.label] = data
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
             "storage": storage, "finished": False}  # fmt: skip
    tracking.write_json(run_dir / STATE_FILE, state)
    tracking.log_params(
        tracking_uri,
        parent,
        {
            "spec": spec.model_dump_json(),
            "git_commit": _git_commit(),
            **{f"fingerprint.{k}": v.fingerprint for k, v in datasets.items()},
            **{f"version.{k}": v for k, v in _versions().items()},
            **{f"negatives.{k}": v.key for k, v in triplets.items()},
        },
    )

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
            }
            trainable = tune.with_resources(
                tune.with_parameters(_trial, payload=payload),
                {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu},
            )
            callback = tracking.MlflowTrialCallback(
                tracking_uri, experiment_id, parent, base, spec.mlflow.log_models
            )
            tune_path = _join(storage, TUNE_NAME)
            if resumed and tune.Tuner.can_restore(tune_path):
                print(f"[embedtune] resuming sweep from {tune_path}", flush=True)
                tuner = tune.Tuner.restore(
                    tune_path, trainable=trainable, resume_unfinished=True, resume_errored=True
                )
            else:
                resumed = False
                tuner = _new_tuner(spec, trainable, storage, callback, ASHAScheduler)
            t1 = time.time()
            grid = tuner.fit()
            timings["trials_s"] = time.time() - t1
            # Tune catches SIGINT itself, saves its state one last time and returns early (stopping the
            # running trials in memory). The saved state tells: unfinished trials there = interrupted.
            saved = tune.ExperimentAnalysis(tune_path).trials
            if any(t.status not in ("TERMINATED", "ERROR") for t in saved):
                raise KeyboardInterrupt
            trials = collect_trials(grid, spec, base, run_dir, callback)
            tracking.write_json(run_dir / "trials.json", trials)
            print_results_table(trials, spec.scheduler.metric)
        except KeyboardInterrupt:
            n = tracking.close_open_children(tracking_uri, experiment_id, parent, "KILLED")
            tracking.finish_run(tracking_uri, parent, "KILLED")
            print(
                f"[embedtune] interrupted: {n} open trial run(s) marked KILLED; run the same command to resume",
                flush=True,
            )
            raise KeyboardInterrupt from None

    result = SweepResult(run_dir, trials, parent, tracking_uri, experiment_id, resumed, None, timings)
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


def _join(storage: str, name: str) -> str:
    return f"{storage.rstrip('/')}/{name}" if "://" in storage else str(Path(storage) / name)


def _new_tuner(spec: SweepSpec, trainable, storage: str, callback, asha_cls):
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
        param_space=param_space(spec),
        tune_config=tune.TuneConfig(
            metric=spec.scheduler.tune_metric,
            mode=spec.scheduler.mode,
            scheduler=scheduler,
            search_alg=search_alg,
            num_samples=spec.search.num_samples,
            max_concurrent_trials=spec.max_concurrent_trials,
            reuse_actors=False,
        ),
        run_config=tune.RunConfig(
            name=TUNE_NAME,
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


def collect_trials(grid, spec: SweepSpec, base, run_dir: Path, callback=None) -> list[dict[str, Any]]:
    """Trial records (docs/INTERFACES.md) from a ResultGrid; the best checkpoint is chosen by the
    trial's best epoch, not its last."""
    metric, mode = spec.scheduler.metric, spec.scheduler.mode
    records = []
    for trial, result in zip(grid._experiment_analysis.trials, grid, strict=True):
        cfg = result.config or {}
        trial_id = trial.trial_id
        history = [{"epoch": 0, "metrics": base.get((cfg.get("model"), cfg.get("dataset")), {})}]
        df = result.metrics_dataframe
        if df is not None and len(df):
            for row in df.to_dict("records"):
                if "epoch" in row and row["epoch"] == row["epoch"]:
                    metrics = {
                        k: float(v)
                        for k, v in row.items()
                        if k.startswith(("ir_", "triplet_", "train_loss")) and v == v
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
        records.append(
            {
                "trial_id": trial_id,
                "model": cfg.get("model"),
                "model_label": model_label(str(cfg.get("model"))),
                "dataset": cfg.get("dataset"),
                **{k: cfg.get(k) for k in HYPERPARAMS},
                "status": status,
                "error": str(result.error).splitlines()[0][:300] if result.error else None,
                "duration_s": float(metrics.get("time_total_s", 0.0) or 0.0),
                "gpu_seconds": metrics.get("gpu_seconds"),
                "epochs_done": done,
                "history": history,
                "best_epoch": best["epoch"] if best else None,
                "best_metrics": best["metrics"] if best else {},
                "best_checkpoint": best_ckpt,
                "mlflow_run_id": callback.run_ids.get(trial_id) if callback else None,
            }
        )
    records.sort(key=lambda r: (r["dataset"] or "", r["model_label"], r["epochs"] or 0, r["trial_id"]))
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
