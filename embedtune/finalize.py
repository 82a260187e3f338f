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

Do no harm (`do_no_harm`, only when `final.ood` names out-of-domain data specs): each dataset's
winner and its base model are scored on every OOD set (`ood_data`: all questions are queries;
vector search via `evaluate_models`), compared query by query (`harm_check`: paired bootstrap
interval, exact McNemar p from `embedtune.stats`) and flagged "harm" on a significant drop. The
result is `<run_dir>/report/harm.json`, which the report (and every rebuild) turns into a
"Do no harm" table, and which is logged with the report folder.
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

from embedtune.data import DataSpec, PreparedData
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
    epoch_compare: bool = Field(
        True,
        description="also score the best checkpoint of every other epoch count per (model, dataset), "
        "vector search only, so the report can tell whether an epoch count is best beyond noise",
    )
    lancedb_uri: str | None = Field(None, description="None: <run_dir>/lancedb")
    registry: bool = Field(True, description="register the winner in the MLflow model registry")
    register_name: str | None = Field(None, description="None: embedtune-<sweep name>")
    alias: str = Field("champion", pattern=r"^[A-Za-z0-9_-]+$")
    probe_size: int = Field(200, ge=0, description="questions sampled for the 'should you fine-tune?' probe")
    ood: list[DataSpec] = Field(
        default_factory=list,
        description="out-of-domain sets (pair files or BEIR folders) the winner must not get worse on: the "
        "do-no-harm check scores the winner and its base model on each (vector search)",
    )
    ood_max_corpus: int | None = Field(
        2000,
        ge=10,
        description="documents per out-of-domain corpus at most (relevant ones always kept); null: all",
    )
    harm_alpha: float = Field(0.05, gt=0, lt=0.5, description="significance level of the do-no-harm flag")

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


def epoch_entries(
    trials: list[dict[str, Any]],
    picked: dict[str, list[ModelEntry]],
    metric: str = "ir_recall_at_10",
    mode: str = "max",
) -> dict[str, list[ModelEntry]]:
    """Per dataset: for each base model, the best trial of every epoch count (its best epoch: the
    epochs its checkpoint was trained) that `picked` does not already hold. These are scored on
    vector search only: enough for the report's epoch advice, at a fraction of the full grid's cost."""
    sign = -1.0 if mode == "max" else 1.0
    usable = [t for t in trials if t.get("status") != "FAILED" and t.get("best_checkpoint")
              and _score(t, metric) is not None and t.get("best_epoch") is not None]  # fmt: skip
    best: dict[tuple[str, str, int], dict[str, Any]] = {}
    for t in sorted(usable, key=lambda t: (sign * _score(t, metric), str(t["trial_id"]))):
        best.setdefault((str(t["dataset"]), str(t["model_label"]), int(t["best_epoch"])), t)
    out: dict[str, list[ModelEntry]] = {}
    for (ds, base, epochs), t in sorted(best.items()):
        have = {(e.base_model, e.epochs) for e in picked.get(ds, []) if e.kind == "tuned"}
        if ds in picked and (base, epochs) not in have:
            out.setdefault(ds, []).append(
                ModelEntry(
                    label=tuned_label(t),
                    path=str(t["best_checkpoint"]),
                    base_model=base,
                    kind="tuned",
                    trial_id=str(t["trial_id"]),
                    epochs=epochs,
                )  # fmt: skip
            )
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
    epoch_models: dict[str, list[ModelEntry]] | None = None,
) -> FinalResult:
    """Evaluate `entries` per dataset (and `epoch_models`, see `epoch_entries`, on vector search
    only), save the results, build the report, log and register. Shared by the sweep's final stage
    and `embedtune evaluate`."""
    import pandas as pd

    from embedtune.evaluate import evaluate_models
    from embedtune.report import build_report, save_results

    run_dir = Path(run_dir).resolve()
    (run_dir / "data").mkdir(parents=True, exist_ok=True)
    for label, data in datasets.items():
        data.save(run_dir / "data" / f"{label}.json")  # what `embedtune report` rebuilds from
    db_uri = spec.lancedb_uri or str(run_dir / "lancedb")
    if spec.ood:
        from embedtune.data import _resolve_source

        for ood in spec.ood:
            _resolve_source(ood)  # a missing OOD file fails now, not after the evaluation
    eval_spec = spec.eval
    cross = _cross_encoders(spec, datasets, triplets, run_dir)
    if not cross and "cross-encoder" in eval_spec.rerankers:
        eval_spec = eval_spec.model_copy(
            update={"rerankers": [r for r in eval_spec.rerankers if r != "cross-encoder"]}
        )
    frames = []
    resolved: dict[str, list[ModelEntry]] = {}
    for label, models in entries.items():
        if label not in datasets:
            raise EmbedtuneError(
                f"no prepared data for dataset {label!r} (expected {run_dir}/data/{label}.json)"
            )
        models = resolved[label] = _resolved(models)
        print(
            f"[embedtune] evaluating {len(models)} model(s) on {label}: {', '.join(m.label for m in models)}",
            flush=True,
        )
        frames.append(
            evaluate_models(models, datasets[label], eval_spec, db_uri, cross_encoder_path=cross.get(label))
        )
        extra = _resolved((epoch_models or {}).get(label, []))
        if extra:
            print(f"[embedtune] epoch comparison on {label} (vector search): {', '.join(m.label for m in extra)}",
                  flush=True)  # fmt: skip
            vector_only = eval_spec.model_copy(update={"query_types": ["vector"], "rerankers": ["none"]})
            frames.append(evaluate_models(extra, datasets[label], vector_only, db_uri, progress=False))
            resolved[label] = [*models, *extra]
    results = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    results_path = save_results(run_dir, results)
    from embedtune.report import HARM_FILE, REPORT_DIR

    harm_file = run_dir / REPORT_DIR / HARM_FILE
    harm_file.unlink(missing_ok=True)  # a check of an earlier evaluation is not about these results
    if spec.ood and not results.empty:
        try:
            do_no_harm(run_dir, results, trials, resolved, spec, db_uri)  # read back by build_report
        except Exception as exc:  # the leaderboard must not be lost to the extra check
            log.warning("do-no-harm check failed: %s: %s", type(exc).__name__, exc)
            print(
                f"[embedtune] do-no-harm check failed ({type(exc).__name__}: {exc}); report without it",
                flush=True,
            )
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
    extra = epoch_entries(trials, entries, spec.metric, spec.mode) if spec.epoch_compare else None
    return evaluate_and_report(
        run_dir, entries, datasets, triplets, trials, spec, mlflow_parent_run_id, tracking_uri, extra
    )


# ---------------------------------------------------------------- do no harm


def ood_data(spec: DataSpec, max_corpus: int | None = 2000) -> PreparedData:
    """An out-of-domain evaluation set: every question of `spec` (after `max_pairs` sampling) is a
    query, relevant to the answers it is paired with; the corpus holds those answers plus the other
    documents (a BEIR corpus, the other answers), seeded-sampled down to `max_corpus` documents in all
    (relevant ones always kept). Nothing is held out for training: none is done on it."""
    from embedtune.cache import stable_hash
    from embedtune.data import load_pairs

    pairs, extra = load_pairs(spec)
    docs: dict[str, str] = {}
    queries: dict[str, str] = {}
    relevant: dict[str, list[str]] = {}
    qid_of: dict[str, str] = {}
    for q, a in pairs:
        cid = docs.setdefault(a, f"d{len(docs)}")
        qid = qid_of.setdefault(q, f"q{len(qid_of)}")
        queries[qid] = q
        if cid not in relevant.setdefault(qid, []):
            relevant[qid].append(cid)
    others = [d for d in dict.fromkeys(extra) if d not in docs]
    if max_corpus is not None and len(docs) + len(others) > max_corpus:
        import random

        keep = max(0, max_corpus - len(docs))
        others = [others[i] for i in sorted(random.Random(spec.seed).sample(range(len(others)), keep))]
    for d in others:
        docs.setdefault(d, f"d{len(docs)}")
    corpus = {cid: text for text, cid in docs.items()}
    fingerprint = stable_hash("ood", stable_hash(pairs, length=64), sorted(corpus.values()), spec.seed)
    counts = {"pairs": len(pairs), "eval_questions": len(queries), "corpus": len(corpus)}
    return PreparedData(fingerprint, spec.label, [], list(pairs), queries, corpus, relevant, counts)


def harm_check(
    base_hits, winner_hits, alpha: float = 0.05, seed: int = 0, n_boot: int = 2000
) -> dict[str, Any]:
    """Paired comparison of a winner with its base model over the same queries (one 0/1 hit per
    query each, same order): `delta` = winner − base, its paired-bootstrap (1 − alpha) interval
    (`ci_low`, `ci_high`), `p_value` (exact McNemar for 0/1 hits, paired bootstrap otherwise, from
    embedtune.stats), `band` = half-width of the base score's own bootstrap interval, and `flag`:
    "harm" when the winner scores lower and the drop is significant (p < alpha) or larger than the
    95% band (the interval of delta lies below 0, or the drop exceeds `band`); else "".
    A model compared with itself has delta 0, p 1 and no flag."""
    import numpy as np

    from embedtune.stats import bootstrap_ci, paired_pvalue

    b = np.asarray(base_hits, dtype=float)
    w = np.asarray(winner_hits, dtype=float)
    if b.ndim != 1 or b.shape != w.shape or not len(b):
        raise EmbedtuneError(
            f"harm check needs per-query scores over the same queries, got {b.shape} and {w.shape}"
        )
    delta = float(w.mean() - b.mean())
    lo, hi = bootstrap_ci(w - b, n_boot=n_boot, alpha=alpha, seed=seed)
    base_lo, base_hi = bootstrap_ci(b, n_boot=n_boot, alpha=alpha, seed=seed)
    band = (base_hi - base_lo) / 2
    p = paired_pvalue(w, b, "hit_at_10", n_boot=n_boot, seed=seed)  # 1.0 when no query differs
    harmed = delta < 0 and (p < alpha or hi < 0 or -delta > band)
    return {"base_score": float(b.mean()), "winner_score": float(w.mean()), "delta": delta,
            "ci_low": float(lo), "ci_high": float(hi), "p_value": float(p), "band": float(band),
            "n_queries": int(len(b)), "flag": "harm" if harmed else ""}  # fmt: skip


def harm_pairs(results, trials: list[dict[str, Any]], entries: dict[str, list[ModelEntry]], metric: str):
    """(training dataset, base entry, winner entry) per dataset whose winner (the report's
    `pick_winner`: the best tuned row that beats its base) is a tuned model."""
    from embedtune.report import PER_QUERY, leaderboard, pick_winner

    # Only the winner is needed here: without per-query values the leaderboard skips the bootstrap
    # (build_report computes the intervals once).
    board = leaderboard(results.drop(columns=[PER_QUERY], errors="ignore"), trials, metric)
    out = []
    for ds, rows in board.groupby("dataset", sort=True):
        w = pick_winner(rows, metric)
        if not w or w.get("kind") != "tuned":
            continue
        by_label = {e.label: e for e in entries.get(str(ds), [])}
        tuned, base = by_label.get(w["model"]), by_label.get(w["base_model"])
        if tuned is None or base is None:
            log.warning(
                "do no harm: no model entry for %s or its base %s on %s", w["model"], w["base_model"], ds
            )
            continue
        out.append((str(ds), base, tuned))
    return out


def do_no_harm(
    run_dir: Path,
    results,
    trials: list[dict[str, Any]],
    entries: dict[str, list[ModelEntry]],
    spec: FinalSpec,
    db_uri: str,
) -> dict[str, Any]:
    """Score each dataset's winner and its base model on every out-of-domain set of `spec.ood`
    (vector search, no reranker, via `evaluate_models`), compare them query by query (`harm_check`)
    and write `<run_dir>/report/harm.json`: {"metric", "alpha", "test", "rows": [one per (dataset,
    ood set)], "results": the evaluation rows, "hits": {ood: {model: per-query hit@10}}}. `entries`
    hold resolved model paths."""
    import time

    from embedtune.evaluate import evaluate_models
    from embedtune.report import HARM_FILE, REPORT_DIR

    pairs = harm_pairs(results, trials, entries, spec.leaderboard_metric)
    ood_spec = EvalSpec(query_types=["vector"], rerankers=["none"], ks=sorted({*spec.eval.ks, 10}),
                        batch_size=spec.eval.batch_size, max_seq_length=spec.eval.max_seq_length)  # fmt: skip
    out: dict[str, Any] = {"metric": "hit_at_10", "alpha": spec.harm_alpha, "seconds": 0.0,
                           "test": "exact McNemar on per-query hits (embedtune.stats)",
                           "rows": [], "results": [], "hits": {}}  # fmt: skip
    start = time.perf_counter()
    for ood_spec_data in spec.ood if pairs else []:
        data = ood_data(ood_spec_data, spec.ood_max_corpus)
        models = list({e.label: e for _, base, tuned in pairs for e in (base, tuned)}.values())
        print(f"[embedtune] do no harm on {data.label} ({len(data.queries)} queries, {len(data.corpus)} docs): "
              f"{', '.join(m.label for m in models)}", flush=True)  # fmt: skip
        frame = evaluate_models(models, data, ood_spec, db_uri, progress=False)
        # evaluate_models keeps every row's per-query values (ood_spec.ks includes 10)
        hits = {
            row["model"]: [float(x) for x in row["per_query"]["hit_at_10"]]
            for row in frame.to_dict("records")
        }
        out["hits"][data.label] = hits
        out["results"] += [{k: v for k, v in r.items() if k != "per_query"} for r in frame.to_dict("records")]
        for ds, base, tuned in pairs:
            check = harm_check(hits[base.label], hits[tuned.label], alpha=spec.harm_alpha)
            out["rows"].append({"dataset": ds, "ood": data.label, "ood_source": ood_spec_data.source,
                                "base_model": base.label, "winner": tuned.label, **check})  # fmt: skip
            if check["flag"]:
                print(f"[embedtune] HARM: {tuned.label} (trained on {ds}) loses {check['delta']:+.4f} hit@10 on "
                      f"{data.label} vs {base.label} (p={check['p_value']:.3g})", flush=True)  # fmt: skip
    out["seconds"] = round(time.perf_counter() - start, 2)
    path = Path(run_dir) / REPORT_DIR / HARM_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1, default=str))
    return out


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
    harm_rows = (getattr(report, "harm", None) or {}).get("rows") or []
    for r in harm_rows:
        metrics[f"final.{r['dataset']}.ood.{r['ood']}.delta_hit_at_10"] = float(r["delta"])
    now = int(time.time() * 1000)
    if metrics:
        c.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()])
    if report.winner:
        c.set_tag(run_id, "embedtune.winner", str(report.winner["model"]))
    if harm_rows:
        flagged = sorted({f"{r['winner']}@{r['ood']}" for r in harm_rows if r.get("flag") == "harm"})
        c.set_tag(run_id, "embedtune.harm", ", ".join(flagged) or "none")


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
    "do_no_harm",
    "epoch_entries",
    "evaluate_and_report",
    "harm_check",
    "ood_data",
    "pick_models",
    "register_winner",
    "run_final_stage",
]
