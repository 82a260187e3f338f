"""The final stage of a sweep: pick the best checkpoints, score them for retrieval in LanceDB next to
the untouched base models, write the leaderboard, log it to MLflow and register the winner.

Picking (`pick_models`, pure): per (base model, dataset) the trial whose *best epoch* scores highest
on the sweep metric (a trial's `best_metrics`, not its last epoch), plus the `top_k` best trials
overall, plus every base model as the baseline of every dataset. FAILED trials and trials without
a checkpoint are never picked. Ties are broken by fewer epochs trained, then by trial id, so the
same trial list always gives the same picks.

Evaluation runs per dataset (`embedtune.evaluate.evaluate_models`), the results are saved as
`<run_dir>/report/results.csv`, and `embedtune.report.build_report` writes the leaderboard. With a
tracking URI, the report folder is logged to the sweep's parent run (artifact path `report/`) with
summary metrics `final.<dataset>.*`, and the winner (the tuned model with the best leaderboard
metric) is logged with `mlflow.sentence_transformers.log_model` in a child run of the parent and
registered under `register_name` with the alias `alias` (default "champion").
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from embedtune.data import PreparedData
from embedtune.errors import EmbedtuneError
from embedtune.evaluate import EvalSpec, ModelEntry

log = logging.getLogger(__name__)

LEADERBOARD_METRICS = ("hit_at_1", "hit_at_5", "hit_at_10", "mrr_at_10", "ndcg_at_10")


class FinalSpec(BaseModel):
    """Settings of the final stage (the `final:` block of a sweep spec)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    top_k: int = Field(
        2, ge=0, description="best trials overall evaluated besides the best per (model, dataset)"
    )
    metric: str = Field("ir_recall_at_10", description="sweep metric that picks checkpoints (best epoch)")
    mode: Literal["max", "min"] = "max"
    leaderboard_metric: str = Field("hit_at_10", description="retrieval metric that ranks the leaderboard")
    eval: EvalSpec = Field(default_factory=EvalSpec)
    cross_encoder: str | None = Field(
        "train", description="'train' (train one per dataset), a local cross-encoder dir or hub id, or null"
    )
    cross_encoder_base: str = Field(
        "all-MiniLM-L6-v2", description="model a trained cross-encoder starts from"
    )
    cross_encoder_max_pairs: int | None = Field(
        400, ge=2, description="training pairs of a trained cross-encoder"
    )
    lancedb_uri: str | None = Field(None, description="None: <run_dir>/lancedb")
    registry: bool = Field(True, description="register the winner in the MLflow model registry")
    register_name: str | None = Field(None, description="None: embedtune-<sweep name>")
    alias: str = Field("champion", pattern=r"^[A-Za-z0-9_-]+$")
    probe_size: int = Field(200, ge=0, description="questions sampled for the 'should you fine-tune?' probe")

    @field_validator("leaderboard_metric")
    @classmethod
    def _lb_metric(cls, v: str) -> str:
        if v not in LEADERBOARD_METRICS:
            raise ValueError(f"must be one of {', '.join(LEADERBOARD_METRICS)}")
        return v

    @field_validator("cross_encoder")
    @classmethod
    def _ce(cls, v: str | None) -> str | None:
        if v is not None and (not v.strip() or v.strip().lower() in {"none", "null", "off"}):
            return None
        return v


@dataclass
class FinalResult:
    """What the final stage produced."""

    report_dir: Path
    results_path: Path
    files: dict[str, Path]
    winner: dict[str, Any] | None
    registered: dict[str, Any] | None = None  # {"name", "version", "alias", "model_uri", "run_id"}
    picked: dict[str, list[ModelEntry]] = field(default_factory=dict)
    cross_encoders: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------- picking (pure)


def _score(trial: dict[str, Any], metric: str) -> float | None:
    value = (trial.get("best_metrics") or {}).get(metric)
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def tuned_label(trial: dict[str, Any]) -> str:
    """Leaderboard label of a trial's best checkpoint: `<base>-ft-e<best epoch>-<trial id>`."""
    return f"{trial['model_label']}-ft-e{trial.get('best_epoch')}-{trial['trial_id']}"


def pick_models(
    trials: list[dict[str, Any]],
    base_models: list[str],
    top_k: int = 2,
    metric: str = "ir_recall_at_10",
    mode: str = "max",
    datasets: list[str] | None = None,
) -> dict[str, list[ModelEntry]]:
    """Models to evaluate, per dataset label: every base model (kind "base", `path` = the reference
    as given, resolved later), the best trial of each (base model, dataset) by its best epoch's
    `metric`, and the `top_k` best trials overall. Trials that FAILED, lack a checkpoint or lack
    the metric are skipped. Deterministic: ties go to fewer epochs, then the smaller trial id."""
    from embedtune.models import model_label

    sign = -1.0 if mode == "max" else 1.0
    usable = [
        t
        for t in trials
        if t.get("status") != "FAILED" and t.get("best_checkpoint") and _score(t, metric) is not None
    ]

    def order(t: dict[str, Any]) -> tuple:
        return (sign * _score(t, metric), int(t.get("best_epoch") or 0), str(t["trial_id"]))

    chosen: dict[str, dict[str, Any]] = {}
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for t in usable:
        groups.setdefault((str(t["model"]), str(t["dataset"])), []).append(t)
    for key in sorted(groups):
        best = min(groups[key], key=order)
        chosen[best["trial_id"]] = best
    for t in sorted(usable, key=order)[: max(top_k, 0)]:
        chosen.setdefault(t["trial_id"], t)

    labels = list(
        dict.fromkeys([*(datasets or []), *sorted({str(t["dataset"]) for t in trials if t.get("dataset")})])
    )
    out: dict[str, list[ModelEntry]] = {}
    for ds in labels:
        entries = [
            ModelEntry(label=model_label(m), path=m, base_model=model_label(m), kind="base")
            for m in base_models
        ]
        for t in sorted(chosen.values(), key=order):
            if str(t["dataset"]) == ds:
                entries.append(
                    ModelEntry(
                        label=tuned_label(t),
                        path=str(t["best_checkpoint"]),
                        base_model=str(t["model_label"]),
                        kind="tuned",
                        trial_id=str(t["trial_id"]),
                        epochs=int(t["best_epoch"]) if t.get("best_epoch") is not None else None,
                    )
                )
        out[ds] = entries
    return out


# ---------------------------------------------------------------- the stage


def _sweep_name(run_dir: Path) -> str:
    spec_file = run_dir / "spec.json"
    if spec_file.exists():
        try:
            return str(json.loads(spec_file.read_text()).get("name") or run_dir.name)
        except (OSError, ValueError):
            pass
    return run_dir.name


def _cross_encoders(
    spec: FinalSpec, datasets: dict[str, PreparedData], triplets: dict[str, Any], run_dir: Path
) -> dict[str, str]:
    """Cross-encoder path (or hub id) per dataset label; empty when the spec asks for none."""
    if spec.cross_encoder is None or "cross-encoder" not in spec.eval.rerankers:
        return {}
    if spec.cross_encoder != "train":
        return dict.fromkeys(datasets, spec.cross_encoder)
    from embedtune.negatives import MiningSpec, mine
    from embedtune.rerank import train_reranker

    out = {}
    for label, data in datasets.items():
        trip = triplets.get(label) or mine(data, MiningSpec(model=spec.cross_encoder_base))
        path = train_reranker(
            data, trip, base=spec.cross_encoder_base, max_pairs=spec.cross_encoder_max_pairs
        )
        print(f"[embedtune] cross-encoder reranker for {label}: {path}", flush=True)
        out[label] = str(path)
    return out


def _resolved(entries: list[ModelEntry]) -> list[ModelEntry]:
    from embedtune.models import resolve_model

    out = []
    for e in entries:
        path = e.path if e.kind == "tuned" else str(resolve_model(e.path))
        if e.kind == "tuned" and not Path(path).exists():
            log.warning("checkpoint of trial %s is gone (%s); skipping it", e.trial_id, path)
            continue
        out.append(ModelEntry(e.label, path, e.base_model, e.kind, e.trial_id, e.epochs))
    return out


def evaluate_and_report(
    run_dir: Path,
    entries: dict[str, list[ModelEntry]],
    datasets: dict[str, PreparedData],
    triplets: dict[str, Any],
    trials: list[dict[str, Any]],
    spec: FinalSpec,
    mlflow_parent_run_id: str | None = None,
    tracking_uri: str | None = None,
) -> FinalResult:
    """Evaluate `entries` per dataset, save the results, build the report, log and register.
    Shared by the sweep's final stage and `embedtune evaluate`."""
    import pandas as pd

    from embedtune.evaluate import evaluate_models
    from embedtune.report import build_report, save_results

    run_dir = Path(run_dir).resolve()
    (run_dir / "data").mkdir(parents=True, exist_ok=True)
    for label, data in datasets.items():
        data.save(run_dir / "data" / f"{label}.json")  # what `embedtune report` rebuilds from
    db_uri = spec.lancedb_uri or str(run_dir / "lancedb")
    eval_spec = spec.eval
    cross = _cross_encoders(spec, datasets, triplets, run_dir)
    if not cross and "cross-encoder" in eval_spec.rerankers:
        eval_spec = eval_spec.model_copy(
            update={"rerankers": [r for r in eval_spec.rerankers if r != "cross-encoder"]}
        )
    frames = []
    for label, models in entries.items():
        if label not in datasets:
            raise EmbedtuneError(
                f"no prepared data for dataset {label!r} (expected {run_dir}/data/{label}.json)"
            )
        models = _resolved(models)
        print(
            f"[embedtune] evaluating {len(models)} model(s) on {label}: {', '.join(m.label for m in models)}",
            flush=True,
        )
        frames.append(
            evaluate_models(models, datasets[label], eval_spec, db_uri, cross_encoder_path=cross.get(label))
        )
    results = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    results_path = save_results(run_dir, results)
    report = build_report(
        run_dir, trials, results, datasets, metric=spec.leaderboard_metric, probe_size=spec.probe_size
    )
    final = FinalResult(
        report.report_dir, results_path, report.files, report.winner, picked=entries, cross_encoders=cross
    )
    if tracking_uri:
        parent = mlflow_parent_run_id or _standalone_run(tracking_uri, run_dir, spec)
        log_report(tracking_uri, parent, report)
        if spec.registry and report.winner and report.winner.get("kind") == "tuned":
            name = spec.register_name or f"embedtune-{_sweep_name(run_dir)}"
            final.registered = register_winner(
                tracking_uri, parent, report.winner, name, spec.alias, spec.leaderboard_metric
            )
            print(f"[embedtune] registered {report.winner['model']} as {name} v{final.registered['version']} "
                  f"(alias {spec.alias})", flush=True)  # fmt: skip
        elif spec.registry:
            print("[embedtune] no tuned model was evaluated: nothing registered", flush=True)
    return final


def run_final_stage(
    run_dir: Path,
    trials: list[dict[str, Any]],
    datasets: dict[str, PreparedData],
    triplets: dict[str, Any],
    base_models: list[str],
    spec: FinalSpec,
    mlflow_parent_run_id: str | None,
    tracking_uri: str | None,
    max_seq_length: int | None = None,
) -> FinalResult:
    """Pick (see `pick_models`), evaluate in LanceDB, report, log to the parent run, register the winner.
    `max_seq_length` (the sweep's training truncation) applies to every model unless `spec.eval`
    sets its own, so the base models are not scored on longer inputs than the tuned ones."""
    if max_seq_length and spec.eval.max_seq_length is None:
        spec = spec.model_copy(
            update={"eval": spec.eval.model_copy(update={"max_seq_length": max_seq_length})}
        )
    entries = pick_models(trials, base_models, spec.top_k, spec.metric, spec.mode, datasets=list(datasets))
    entries = {k: v for k, v in entries.items() if k in datasets}
    return evaluate_and_report(
        run_dir, entries, datasets, triplets, trials, spec, mlflow_parent_run_id, tracking_uri
    )


# ---------------------------------------------------------------- MLflow


def _client(tracking_uri: str):
    from mlflow import MlflowClient

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    return MlflowClient(tracking_uri=tracking_uri)


def _standalone_run(tracking_uri: str, run_dir: Path, spec: FinalSpec) -> str:
    """A run for `embedtune evaluate` with a tracking URI (no sweep parent): experiment
    `embedtune-evaluate`, artifacts under <run_dir>/mlartifacts for sqlite stores."""
    c = _client(tracking_uri)
    name = "embedtune-evaluate"
    exp = c.get_experiment_by_name(name)
    if exp is None:
        location = (run_dir / "mlartifacts").resolve().as_uri() if tracking_uri.startswith("sqlite") else None
        exp_id = c.create_experiment(name, artifact_location=location)
    else:
        exp_id = exp.experiment_id
    return c.create_run(exp_id, run_name=run_dir.name, tags={"embedtune.kind": "evaluate"}).info.run_id


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
    import time

    from mlflow.entities import Metric

    c = _client(tracking_uri)
    c.log_artifacts(run_id, str(report.report_dir), artifact_path="report")
    metrics = summary_metrics(report.leaderboard, report.metric)
    if report.winner:
        metrics[f"final.winner.{report.metric}"] = float(report.winner[report.metric])
    now = int(time.time() * 1000)
    if metrics:
        c.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()])
    if report.winner:
        c.set_tag(run_id, "embedtune.winner", str(report.winner["model"]))


def register_winner(
    tracking_uri: str, parent_run_id: str, winner: dict[str, Any], name: str, alias: str, metric: str
) -> dict[str, Any]:
    """Log the winner's model in a child run of `parent_run_id` with
    `mlflow.sentence_transformers.log_model`, register it as `name` and point `alias` at it."""
    import mlflow
    import sentence_transformers
    import torch
    from sentence_transformers import SentenceTransformer

    c = _client(tracking_uri)
    parent = c.get_run(parent_run_id)
    tags = {
        "mlflow.parentRunId": parent_run_id,
        "embedtune.kind": "champion",
        "embedtune.trial_id": str(winner.get("trial_id") or ""),
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
    model = SentenceTransformer(str(winner["model_path"]), device="cpu")
    # Explicit requirements: inferring them starts a subprocess that reloads the model.
    reqs = [
        f"sentence-transformers=={sentence_transformers.__version__}",
        f"torch=={torch.__version__.split('+')[0]}",
    ]
    from embedtune.tracking import fluent_uri

    with fluent_uri(tracking_uri, registry=True), mlflow.start_run(run_id=child):
        info = mlflow.sentence_transformers.log_model(
            model, name="model", pip_requirements=reqs, registered_model_name=name
        )
    version = str(info.registered_model_version)
    c.set_registered_model_alias(name, alias, version)
    for k, v in {**keep, metric: winner[metric], "source_run": parent_run_id}.items():
        c.set_model_version_tag(name, version, k, str(v))
    return {"name": name, "version": version, "alias": alias, "model_uri": info.model_uri, "run_id": child}


__all__ = [
    "FinalResult",
    "FinalSpec",
    "evaluate_and_report",
    "pick_models",
    "register_winner",
    "run_final_stage",
]
