"""Trial records from Tune's results, merged across the run dir's Tune experiments."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from embedtune.models import model_label
from embedtune.records import DONE_STATUSES, EpochPoint, ModelData, TrialRecord, best_point, number
from embedtune.specs import SweepSpec
from embedtune.specs.metrics import ERROR_LINE_CHARS, FINAL_ERROR, HYPERPARAMS, RECORDED_PREFIXES
from embedtune.sweep.identity import LINEAR_SCHEDULE, branch_epochs, is_done, member_hashes
from embedtune.tracking.callback import checkpoint_uri
from embedtune.tracking.client import exception_line, redact

if TYPE_CHECKING:
    from rich.table import Table

log = logging.getLogger(__name__)


def collect_trials(
    grid, spec: SweepSpec, base: dict[ModelData, dict[str, float]], run_ids=None, hasher=None, skip=()
) -> list[TrialRecord]:
    """Trial records (docs/INTERFACES.md) from a ResultGrid: one per Tune trial in separate mode (its
    best checkpoint is its best epoch, not its last), one per listed epoch count of a branch trial
    (see `TrialRecord`). Trials of configs in `skip` that did not run are left out. `run_ids`:
    trial id -> MLflow run id, where known."""
    metric, mode = spec.scheduler.metric, spec.scheduler.mode
    records = []
    for trial, result in zip(grid._experiment_analysis.trials, grid, strict=True):
        cfg = result.config or {}
        digest = hasher(cfg) if hasher else cfg.get("config_hash")
        df = result.metrics_dataframe
        ran = df is not None and len(df) and "epoch" in df
        skipped = is_done(cfg, hasher, set(skip)) if hasher else digest in skip
        if skipped and not ran and not result.error:
            continue  # a sampled draw of an already done config: it returned without training
        key = ModelData(str(cfg.get("model")), str(cfg.get("dataset")))
        rows: dict[int, dict[str, Any]] = {}  # epoch -> its (last) result row
        for row in df.to_dict("records") if ran else []:
            if row["epoch"] == row["epoch"]:  # a restored trial may repeat an epoch: the last counts
                rows[int(row["epoch"])] = row
        history = [EpochPoint(0, dict(base.get(key, {})))]
        for epoch, row in sorted(rows.items()):
            kept = {k: float(v) for k, v in row.items() if k.startswith(RECORDED_PREFIXES) and v == v}
            history.append(EpochPoint(epoch, kept))
        done = max((p.epoch for p in history), default=0)
        final = (result.metrics or {}).get(FINAL_ERROR)  # failed for good, not retried (trainable)
        failed = bool(result.error or final)
        error = None
        if failed:
            error = redact(exception_line(str(final or result.error)) or "")[:ERROR_LINE_CHARS] or None
        common = {
            "model": cfg.get("model"),
            "model_label": model_label(str(cfg.get("model"))),
            "dataset": cfg.get("dataset"),
            **{k: cfg.get(k) for k in HYPERPARAMS},
            "mlflow_run_id": (run_ids or {}).get(trial.trial_id),
            "lr_schedule": str(cfg.get("lr_schedule") or LINEAR_SCHEDULE),
            "loss": str(cfg.get("loss") or spec.train.loss),
        }
        listed = branch_epochs(cfg)
        if listed is None:
            records.append(
                _separate_record(
                    trial.trial_id, digest, result, history, done, failed, error, common, metric, mode
                )
            )
            continue
        checkpoints = {
            int(m["epoch"]): f"{checkpoint_uri(c).rstrip('/')}/model"
            for c, m in result.best_checkpoints or []
            if m.get("epoch") is not None
        }
        members = member_hashes(cfg, hasher) if hasher else {e: digest for e in listed}
        for e in listed:
            reached = done >= e and e in rows
            status = "FINISHED" if reached else ("FAILED" if failed else "KILLED")
            row = rows.get(min(done, e), result.metrics or {})
            point = next((p for p in history if p.epoch == e), None) if reached else None
            records.append(
                TrialRecord(
                    trial_id=trial.trial_id if e == max(listed) else f"{trial.trial_id}-e{e}",
                    config_hash=members[e],
                    **{**common, "epochs": e},
                    status=status,
                    error=None if reached else error,
                    duration_s=float(row.get("time_total_s", 0.0) or 0.0),  # training up to this count
                    gpu_seconds=number(row.get("gpu_seconds")),
                    epochs_done=min(done, e),
                    history=[p for p in history if p.epoch <= e],
                    best_epoch=e if point else None,
                    best_metrics=point.metrics if point else {},
                    best_checkpoint=checkpoints.get(e) if point else None,
                    tune_trial_id=trial.trial_id,
                )
            )
    records.sort(key=TrialRecord.order)
    return records


def _separate_record(
    trial_id, digest, result, history, done, failed, error, common, metric, mode
) -> TrialRecord:
    """The record of a separate-mode trial: its best epoch and the checkpoint there."""
    best = best_point(history, metric, mode)
    planned = int(common.get("epochs") or done or 0)
    status = "FAILED" if failed else ("FINISHED" if done >= planned else "KILLED")
    best_ckpt = None
    if not failed and result.best_checkpoints:
        ckpt = result.get_best_checkpoint(metric, mode) or result.checkpoint
        best_ckpt = f"{checkpoint_uri(ckpt).rstrip('/')}/model" if ckpt is not None else None
    metrics = result.metrics or {}
    return TrialRecord(
        trial_id=trial_id,
        config_hash=digest,
        **common,
        status=status,
        error=error,
        duration_s=float(metrics.get("time_total_s", 0.0) or 0.0),
        gpu_seconds=metrics.get("gpu_seconds"),
        epochs_done=done,
        history=history,
        best_epoch=best.epoch if best else None,
        best_metrics=best.metrics if best else {},
        best_checkpoint=best_ckpt,
    )


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


def done_runs(records: list[TrialRecord]) -> set[str]:
    """The Tune trials (one per branch in branch mode) whose records are done: what a sampled
    sweep's `num_samples` counts."""
    return {r.run_trial_id for r in records if r.status in DONE_STATUSES}


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


def results_table(trials: list[TrialRecord], metric: str) -> Table:
    """The trials as a table (one row per record: its setup, status, base and best score); the CLI
    prints it."""
    from rich.table import Table

    table = Table(title=f"embedtune sweep results (best epoch by {metric})")
    left = ("dataset", "model", "loss", "status")
    losses = len({t.loss for t in trials}) > 1  # a column only when the sweep compared losses
    for col in ("dataset", "model", *(["loss"] if losses else []), "epochs", "lr", "batch", "status",
                "best epoch", "base", metric, "time s"):  # fmt: skip
        table.add_column(col, justify="left" if col in left else "right")
    for t in trials:
        base, score = t.base_score(metric), t.score(metric)
        table.add_row(
            str(t.dataset),
            t.model_label,
            *([str(t.loss or "-")] if losses else []),
            str(t.epochs),
            f"{t.lr:.1e}" if t.lr else "-",
            str(t.batch_size),
            t.status,
            str(t.best_epoch or "-"),
            f"{base:.4f}" if base is not None else "-",
            f"{score:.4f}" if score is not None else "-",
            f"{t.duration_s:.0f}",
        )
    return table
