"""The final stage's MLflow side: the report and summary metrics on the sweep's parent run, and the
winner logged in a child run and registered in the model registry."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from embedtune.tracking import client as mlc

EVALUATE_EXPERIMENT = "embedtune-evaluate"


def standalone_run(tracking_uri: str, run_dir: Path, name: str) -> str:
    """A run for `embedtune evaluate` with a tracking URI (no sweep parent): experiment
    `embedtune-evaluate`, artifacts under <run_dir>/mlartifacts for sqlite stores."""
    exp_id = mlc.ensure_experiment(tracking_uri, EVALUATE_EXPERIMENT, Path(run_dir) / "mlartifacts")
    c = mlc.client(tracking_uri)
    return c.create_run(exp_id, run_name=name, tags={mlc.KIND_TAG: "evaluate"}).info.run_id


def summary_metrics(leaderboard, metric: str) -> dict[str, float]:
    """`final.<dataset>.base_<metric>` (best base), `.best_<metric>` (best tuned), `.gain`, and the winner's."""
    out: dict[str, float] = {}
    for ds, rows in leaderboard.groupby("dataset", sort=True):
        base = rows[rows["kind"] == "base"][metric].max()
        tuned = rows[rows["kind"] == "tuned"][metric].max()
        if base == base:
            out[f"final.{ds}.base_{metric}"] = float(base)
        if tuned == tuned:
            out[f"final.{ds}.best_{metric}"] = float(tuned)
            if base == base:
                out[f"final.{ds}.gain"] = float(tuned - base)
    return out


def log_report(tracking_uri: str, run_id: str, report) -> None:
    """Log the report folder (leaderboards, plots, results.csv) and summary metrics to `run_id`."""
    from mlflow.entities import Metric

    c = mlc.client(tracking_uri)
    c.log_artifacts(run_id, str(report.report_dir), artifact_path="report")
    metrics = summary_metrics(report.leaderboard, report.metric)
    if report.winner:
        metrics[f"final.winner.{report.metric}"] = float(report.winner[report.metric])
    for r in report.harm.rows:
        metrics[f"final.{r.dataset}.ood.{r.ood}.delta_{report.harm.metric}"] = float(r.delta)
    now = int(time.time() * 1000)
    if metrics:
        c.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()])
    if report.winner:
        c.set_tag(run_id, "embedtune.winner", str(report.winner["model"]))
    if report.harm.rows:
        flagged = sorted({f"{r.winner}@{r.ood}" for r in report.harm.rows if r.flag == "harm"})
        c.set_tag(run_id, "embedtune.harm", ", ".join(flagged) or "none")


def log_report_files(tracking_uri: str, run_id: str, paths: list[Path]) -> None:
    """Log (again) files of the report folder to `run_id`'s `report/` artifacts."""
    c = mlc.client(tracking_uri)
    for path in paths:
        c.log_artifact(run_id, str(path), artifact_path="report")


def register_winner(
    tracking_uri: str, parent_run_id: str, winner: dict[str, Any], name: str, alias: str, metric: str
) -> dict[str, Any]:
    """Log the winner's model in a child run of `parent_run_id` with
    `mlflow.sentence_transformers.log_model`, register it as `name` and point `alias` at it."""
    c = mlc.client(tracking_uri)
    parent = c.get_run(parent_run_id)
    tags = {
        mlc.PARENT_TAG: parent_run_id,
        mlc.KIND_TAG: "champion",
        mlc.TRIAL_TAG: str(winner.get("trial_id") or ""),
        "embedtune.dataset": str(winner["dataset"]),
    }
    child = c.create_run(
        parent.info.experiment_id, run_name=f"champion-{winner['model']}", tags=tags
    ).info.run_id
    keep = {k: winner.get(k) for k in ("dataset", "model", "base_model", "query_type", "reranker", "epochs")}
    for k, v in keep.items():
        c.log_param(child, k, str(v))
    c.log_metric(child, metric, float(winner[metric]))
    delta = winner.get(f"delta_{metric}")
    if delta is not None and delta == delta:
        c.log_metric(child, f"delta_{metric}", float(delta))
    info = mlc.log_sentence_transformer(tracking_uri, child, Path(winner["model_path"]), registered_name=name)
    version = str(info.registered_model_version)
    c.set_registered_model_alias(name, alias, version)
    for k, v in {**keep, metric: winner[metric], "source_run": parent_run_id}.items():
        c.set_model_version_tag(name, version, k, str(v))
    return {"name": name, "version": version, "alias": alias, "model_uri": info.model_uri, "run_id": child}
