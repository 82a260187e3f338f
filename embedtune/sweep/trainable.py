"""The Ray Tune trainable: one fine-tuning run inside a trial process, reporting every epoch
(with a checkpoint: every epoch in separate mode, each listed epoch count of a branch trial).

What a trial needs travels in a `TrialPayload` through Ray's object store (`tune.with_parameters`),
so trials on other nodes need no shared disk: the prepared data, the mined triplets (in memory),
the base models' scores (to report the gain over the base model) and the sweep's settings.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from embedtune import storage
from embedtune.data import PreparedData
from embedtune.errors import EmbedtuneError
from embedtune.memory import cap_gpu_memory
from embedtune.negatives import Triplets
from embedtune.records import ModelData
from embedtune.specs import Resources, TrainConfig, TrainSettings
from embedtune.specs.metrics import FINAL_ERROR, GAIN_SUFFIX
from embedtune.sweep.identity import LINEAR_SCHEDULE, branch_epochs, is_done, member_hashes

log = logging.getLogger(__name__)


@dataclass
class TrialPayload:
    """Everything a trial needs besides its config (picklable)."""

    metric: str  # the sweep metric every epoch reports
    tune_metric: str  # what Tune ranks on (the metric or its gain over the base model)
    base_scores: dict[ModelData, float]  # the sweep metric of each base model on each dataset
    datasets: dict[str, PreparedData]
    triplets: dict[str, Triplets]  # in memory (`Triplets.in_memory`)
    train: TrainSettings
    resources: Resources
    hasher: Any  # sweep.identity.ConfigHasher
    skip: dict[str, float] = field(default_factory=dict)  # done (config, epochs) -> their Tune score
    mode: str = "max"  # the scheduler's mode (the worst score of a trial that failed for good)
    storage: str = ""  # the Tune storage root: checkpoints are copied there (a local folder or a URI)


def cpu_threads_for(trial_cpus: float) -> int:
    """Threads a trial may use: its CPU share, at least one (so concurrent trials do not fight)."""
    return max(1, int(trial_cpus or os.cpu_count() or 1))


def _safetensors_problem(path: Path) -> str | None:
    """Why a .safetensors file is not whole (a truncated copy, a partial write), or None: its header
    must parse and its tensors must end exactly where the file does."""
    try:
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{path.name} has {len(head)} bytes"
            n = int.from_bytes(head, "little")
            header = json.loads(f.read(n))
        end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        return f"{path.name} has no readable header ({type(exc).__name__})"
    size = path.stat().st_size
    if size != 8 + n + end:
        return f"{path.name} is {size} bytes, its header says {8 + n + end}"
    return None


def check_checkpoint(local: Path, shown: str) -> int:
    """The epoch a restored checkpoint (copied to `local`) was saved after; an EmbedtuneError naming
    the checkpoint (`shown`: where it is stored) when it is partial or damaged, instead of a
    traceback from deep inside the model loader on every retry."""
    why = None
    try:
        epoch = int(json.loads((local / "state.json").read_text())["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        why, epoch = "its state.json is missing or unreadable", 0
    weights = sorted((local / "model").glob("*.safetensors"))
    if why is None and not weights:
        why = "it holds no model weights (model/*.safetensors)"
    for w in weights if why is None else []:
        why = _safetensors_problem(w)
        if why:
            break
    if why:
        raise EmbedtuneError(
            f"checkpoint {shown} is damaged ({why}); rerun the same command to train this config from the start"
        )
    return epoch


STORAGE_WAIT_S = 180.0  # how long a restoring trial waits out an object store that does not answer


def restore_checkpoint(checkpoint, local: Path, wait_s: float = STORAGE_WAIT_S) -> Path:
    """`checkpoint` copied into `local`, waiting out an object store that does not answer (a trial
    that failed because S3 went away is retried by Tune at once, while S3 may still be down: without
    the wait every retry fails the same way and the trial ends FAILED). Each attempt starts from an
    empty folder, so a partial copy is never used."""

    def attempt() -> Path:
        shutil.rmtree(local, ignore_errors=True)
        return Path(checkpoint.to_directory(str(local)))

    return storage.waiting_out_outages(attempt, f"restoring checkpoint {checkpoint.path}", wait_s)


def report_checkpoint(
    report: dict[str, Any], ckpt: Path, remote: bool, wait_s: float = STORAGE_WAIT_S
) -> None:
    """Report an epoch with its checkpoint; on remote storage, an upload that fails because the
    object store is away is retried (into the next checkpoint index, after removing what the failed
    upload left) until it is back: failing the trial instead makes Tune restart it at once, from its
    last checkpoint, while the store is still down, and a short outage could spend every retry."""
    from ray import tune

    tries = 0

    def attempt() -> None:
        nonlocal tries
        if tries:
            _drop_partial_checkpoint()
        tries += 1
        tune.report(dict(report), checkpoint=tune.Checkpoint.from_directory(str(ckpt)))

    what = f"saving the epoch {report.get('epoch')} checkpoint"
    storage.waiting_out_outages(attempt, what, wait_s if remote else 0.0)  # local storage: no wait


ROOM_MARGIN = 1.1  # a checkpoint copy needs its bytes plus the filesystem's own overhead
ROOM_SLACK_BYTES = 16 * 2**20


def _checkpoint_need(ckpt: Path) -> int:
    """Free bytes a copy of the checkpoint folder `ckpt` needs."""
    return int(storage.folder_bytes(ckpt) * ROOM_MARGIN) + ROOM_SLACK_BYTES


def no_room_error(epoch: int, where: str, need: int, free: int) -> EmbedtuneError:
    return EmbedtuneError(
        f"no room for the epoch {epoch} checkpoint at {where}: it needs about {need / 2**20:.0f} MB and "
        f"{free / 2**20:.0f} MB are free; free space there (or lower checkpoints.keep, or set storage_path "
        "to a bigger disk), then run the same command again to redo this trial"
    )


def check_checkpoint_room(ckpt: Path, storage_root: str, epoch: int) -> None:
    """Stop the trial in one line when the local Tune storage cannot hold this checkpoint (the disk
    filled since the sweep's up-front check): Ray would start the copy, fail half-way with ENOSPC
    and leave a partial checkpoint behind, on every retry."""
    if not storage_root or storage.is_remote(storage_root):
        return  # object storage has no disk of ours to measure
    need = _checkpoint_need(ckpt)
    free = shutil.disk_usage(storage_root).free
    if free < need:
        raise no_room_error(epoch, storage_root, need, free)


def _drop_partial_checkpoint() -> None:
    """Remove what a failed checkpoint copy left in Tune storage (a local folder or an S3 prefix).
    Ray has no public handle on the folder it was copying into; its session's storage context names it."""
    try:
        import pyarrow.fs
        from ray.train._internal.session import get_session

        context = get_session().storage
        fs, folder = context.storage_filesystem, context.checkpoint_fs_path
        if folder and fs.get_file_info(folder).type == pyarrow.fs.FileType.Directory:
            fs.delete_dir(folder)
    except Exception as exc:  # noqa: BLE001 - best effort: Ray's internals may move, S3 may be away
        log.warning("could not remove a partial checkpoint: %s", exc)


def run_trial(config: dict[str, Any], payload: TrialPayload) -> None:
    """One trial: train `config` on its dataset, report each epoch with a checkpoint (continuing
    after the last reported epoch when Tune restores the trial from a checkpoint)."""
    import psutil
    import ray
    import torch
    from ray import tune

    from embedtune.train import train

    if is_done(config, payload.hasher, payload.skip):  # a sampled draw of a config done earlier
        done = list(member_hashes(config, payload.hasher).values())
        log.warning("config %s is already done in this run dir; skipped", payload.hasher(config))
        # Tune wants the metric in a trial's last result; the done trial's score also informs optuna.
        tune.report({payload.tune_metric: max(payload.skip[h] for h in done), "skipped_done_config": 1})
        return
    listed = branch_epochs(config)  # branch mode: checkpoint (and record) only these epoch counts
    label = config["dataset"]
    data = payload.datasets[label]
    cfg = TrainConfig(
        model=config["model"],
        epochs=int(config["epochs"]),
        lr=float(config["lr"]),
        batch_size=int(config["batch_size"]),
        warmup_ratio=float(config["warmup_ratio"]),
        lr_schedule=str(config.get("lr_schedule") or LINEAR_SCHEDULE),
        seed=int(config["seed"]),
        threads=cpu_threads_for(payload.resources.cpu),
        **{**payload.train.model_dump(), "loss": config.get("loss") or payload.train.loss},  # search.loss
    )
    # Scratch in the trial's working directory (Tune chdirs there; it lives in Ray's session dir):
    # a trial the scheduler stops is killed without running `finally`, and Ray's temp dir, not
    # /tmp, then holds what it left.
    work = Path(tempfile.mkdtemp(prefix="embedtune-trial-", dir=os.getcwd()))
    start_epoch, resume_dir = 0, None
    checkpoint = tune.get_checkpoint()
    base_score = payload.base_scores.get(ModelData(str(config["model"]), str(label)))
    cap_gpu_memory(payload.resources.gpu)  # a trial sharing a GPU stays within its share
    started = time.time()
    proc = psutil.Process()

    def on_epoch(epoch: int, metrics: dict[str, float], ckpt: Path | None) -> None:
        report = dict(metrics)
        report["epoch"] = epoch
        if payload.metric in metrics and base_score is not None:
            report[payload.metric + GAIN_SUFFIX] = metrics[payload.metric] - base_score
        report["system/rss_mb"] = proc.memory_info().rss / 2**20
        report["system/cpu_threads"] = torch.get_num_threads()
        # Where the trial ran (strings: MLflow metric logging skips them; result.json keeps them).
        report["system/node_id"] = ray.get_runtime_context().get_node_id()
        report["system/cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        if torch.cuda.is_available():
            report["system/gpu_max_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
            report["gpu_seconds"] = (time.time() - started) * max(payload.resources.gpu, 0)
        if ckpt is None:  # branch mode, an epoch count not listed: a result without a checkpoint
            tune.report(report)
            return
        (ckpt / "state.json").write_text(json.dumps({"epoch": epoch, "trial_config": config}))
        check_checkpoint_room(ckpt, payload.storage, epoch)
        try:
            report_checkpoint(report, ckpt, remote=storage.is_remote(payload.storage))
        except OSError as exc:
            if not storage.is_disk_full(exc) or not payload.storage or storage.is_remote(payload.storage):
                raise
            _drop_partial_checkpoint()
            free = shutil.disk_usage(payload.storage).free
            raise no_room_error(epoch, payload.storage, _checkpoint_need(ckpt), free) from exc

    try:
        if checkpoint is not None:  # restored trial: continue after the last reported epoch
            local = restore_checkpoint(checkpoint, work / "restored")
            start_epoch, resume_dir = check_checkpoint(local, checkpoint.path), local / "model"
        train(
            cfg,
            data,
            payload.triplets.get(label) if cfg.hard_negatives else None,
            out_dir=None,
            on_epoch=on_epoch,
            checkpoint_every_epoch=listed or True,
            resume_from=resume_dir,
            start_epoch=start_epoch,
            evaluate_base=False,
            progress=False,
            scratch_root=work,
        )
    except EmbedtuneError as exc:
        # embedtune's own errors are final (a diverged loss, bad input, a damaged checkpoint): Tune would retry the trial
        # from its last checkpoint (max_failures) and fail the same way. Tune cannot be told an
        # error is final, so the trial ends now, its last result carrying the error (recorded as
        # FAILED in trials.json and MLflow); infrastructure failures still raise and are retried.
        log.error("trial failed for good (not retried): %s", exc)
        worst = float("-inf") if payload.mode == "max" else float("inf")
        tune.report({payload.tune_metric: worst, FINAL_ERROR: str(exc)})
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
