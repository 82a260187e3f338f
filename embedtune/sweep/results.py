"""Trial records from Tune's results, merged across the run dir's Tune experiments."""

from __future__ import annotations

import logging
import shutil
from typing import Any

from embedtune.models import model_label
from embedtune.records import DONE_STATUSES, EpochPoint, ModelData, TrialRecord, best_point
from embedtune.specs import SweepSpec
from embedtune.specs.metrics import FINAL_ERROR, HYPERPARAMS, RECORDED_PREFIXES
from embedtune.tracking.callback import checkpoint_uri
from embedtune.tracking.client import exception_line, redact

log = logging.getLogger(__name__)


def collect_trials(
    grid, spec: SweepSpec, base: dict[ModelData, dict[str, float]], run_ids=None, hasher=None, skip=()
) -> list[TrialRecord]:
    """Trial records (docs/INTERFACES.md) from a ResultGrid. The best checkpoint is the trial's best
    epoch, not its last. Trials of configs in `skip` that did not run are left out. `run_ids`:
    trial id -> MLflow run id, where known."""
    metric, mode = spec.scheduler.metric, spec.scheduler.mode
    records = []
    for trial, result in zip(grid._experiment_analysis.trials, grid, strict=True):
        cfg = result.config or {}
        digest = hasher(cfg) if hasher else cfg.get("config_hash")
        df = result.metrics_dataframe
        if digest in skip and (df is None or not len(df) or "epoch" not in df) and not result.error:
            continue  # a sampled draw of an already done config: it returned without training
        key = ModelData(str(cfg.get("model")), str(cfg.get("dataset")))
        history = [EpochPoint(0, dict(base.get(key, {})))]
        for row in df.to_dict("records") if df is not None and len(df) else []:
            if "epoch" in row and row["epoch"] == row["epoch"]:
                kept = {k: float(v) for k, v in row.items() if k.startswith(RECORDED_PREFIXES) and v == v}
                history.append(EpochPoint(int(row["epoch"]), kept))
        best = best_point(history, metric, mode)
        done = max((p.epoch for p in history), default=0)
        planned = int(cfg.get("epochs", done) or 0)
        final = (result.metrics or {}).get(FINAL_ERROR)  # failed for good, not retried (trainable)
        failed = bool(result.error or final)
        status = "FAILED" if failed else ("FINISHED" if done >= planned else "KILLED")
        best_ckpt = None
        if not failed and result.best_checkpoints:
            ckpt = result.get_best_checkpoint(metric, mode) or result.checkpoint
            best_ckpt = f"{checkpoint_uri(ckpt).rstrip('/')}/model" if ckpt is not None else None
        metrics = result.metrics or {}
        error = None
        if failed:
            error = redact(exception_line(str(final or result.error)) or "")[:300] or None
        records.append(
            TrialRecord(
                trial_id=trial.trial_id,
                config_hash=digest,
                model=cfg.get("model"),
                model_label=model_label(str(cfg.get("model"))),
                dataset=cfg.get("dataset"),
                **{k: cfg.get(k) for k in HYPERPARAMS},
                status=status,
                error=error,
                duration_s=float(metrics.get("time_total_s", 0.0) or 0.0),
                gpu_seconds=metrics.get("gpu_seconds"),
                epochs_done=done,
                history=history,
                best_epoch=best.epoch if best else None,
                best_metrics=best.metrics if best else {},
                best_checkpoint=best_ckpt,
                mlflow_run_id=(run_ids or {}).get(trial.trial_id),
            )
        )
    records.sort(key=TrialRecord.order)
    return records


def merge_records(old: list[TrialRecord], new: list[TrialRecord]) -> list[TrialRecord]:
    """One record per config hash: a newer attempt replaces an older one, except that a done
    record (FINISHED/KILLED) is never replaced by another trial's undone one."""
    out: dict[str, TrialRecord] = {}
    for r in [*old, *new]:
        prev = out.get(r.config_hash)
        if prev is not None and prev.done and not r.done and prev.trial_id != r.trial_id:
            continue
        out[r.config_hash] = r
    return sorted(out.values(), key=TrialRecord.order)


def done_configs(records: list[TrialRecord]) -> set[str]:
    return {r.config_hash for r in records if r.status in DONE_STATUSES}


def tune_score(record: TrialRecord, spec: SweepSpec) -> float:
    """A done trial's score on the metric Tune ranks by (its best epoch; the gain over its base)."""
    metric = spec.scheduler.metric
    best = record.score(metric)
    if best is None:
        return 0.0
    if spec.scheduler.compare == "gain":
        base = record.base_score(metric)
        return best - (base if base is not None else best)
    return best


def print_results_table(trials: list[TrialRecord], metric: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"embedtune sweep results (best epoch by {metric})")
    left = ("dataset", "model", "status")
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
        table.add_column(col, justify="left" if col in left else "right")
    for t in trials:
        base, score = t.base_score(metric), t.score(metric)
        table.add_row(
            str(t.dataset),
            t.model_label,
            str(t.epochs),
            f"{t.lr:.1e}" if t.lr else "-",
            str(t.batch_size),
            t.status,
            str(t.best_epoch or "-"),
            f"{base:.4f}" if base is not None else "-",
            f"{score:.4f}" if score is not None else "-",
            f"{t.duration_s:.0f}",
        )
    Console(width=max(120, shutil.get_terminal_size().columns)).print(table)


def trial_summary(records: list[TrialRecord]) -> dict[str, Any]:
    return {s: sum(r.status == s for r in records) for s in ("FINISHED", "KILLED", "FAILED")}
