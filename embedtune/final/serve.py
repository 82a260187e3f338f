"""The final stage's last step: serve each dataset's recommended model as a searchable table.

Per dataset, the recommended model is its winner where the verdict is to fine-tune (registered as a
model version of the sweep's registered model, alias `<alias>-<dataset>`, unless it is the run's
champion already), else its best base model (a packaged or hub model, loaded offline through
`embedtune.models`). The registered version is tagged with the dataset, its fingerprint, the base
model, the metric, the gain with its p-value and the report's URI. The model then embeds the
dataset's whole corpus into `<lancedb_uri>/serve/<dataset>` (`embedtune.serve`) with the encoder the
leaderboard scored with (`final.encode_backend`, the evaluation's truncation), so a vector search of
the table ranks as the leaderboard's (model, vector, no reranker) row did.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from embedtune.data import PreparedData
from embedtune.encode import resolve_backend
from embedtune.final.registry import register_winner
from embedtune.models import resolve_model
from embedtune.rundir import REPORT, RunDir
from embedtune.serve import ServedTable, build_served_table, serve_uri, whole_corpus
from embedtune.specs import FinalSpec
from embedtune.tracking import client as mlc

log = logging.getLogger(__name__)

FINE_TUNE = "Fine-tune"  # how a verdict line that recommends the tuned model starts (report.verdict)


def serves_winner(winner: dict[str, Any] | None, verdict: str) -> bool:
    """Whether a dataset's winner is the model served for it: a tuned model whose verdict is to
    fine-tune (otherwise the best base model is)."""
    return bool(winner) and winner.get("kind") == "tuned" and verdict.startswith(FINE_TUNE)


def recommended(final: Any, dataset: str) -> dict[str, Any] | None:
    """The leaderboard row of the model to serve for `dataset`: its winner when the verdict is to
    fine-tune, else the best base model's row (vector search, no reranker, when there is one)."""
    winner = final.dataset_winners.get(dataset)
    verdict = (final.verdicts.get(dataset) or {}).get("verdict", "")
    board = final.leaderboard
    if serves_winner(winner, verdict):
        return winner
    if board is None or board.empty:
        return None
    bases = board[(board["dataset"] == dataset) & (board["kind"] == "base")]
    if bases.empty:
        return None
    metric = final.metric
    plain = bases[(bases["query_type"] == "vector") & (bases["reranker"] == "none")]
    rows = plain if not plain.empty else bases
    return rows.sort_values([metric, "model"], ascending=[False, True], kind="stable").iloc[0].to_dict()


def vector_row(final: Any, dataset: str, model: str) -> dict[str, Any] | None:
    """The leaderboard's (model, vector, no reranker) row on `dataset`: what the table reproduces."""
    board = final.leaderboard
    if board is None or board.empty:
        return None
    rows = board[
        (board["dataset"] == dataset)
        & (board["model"] == model)
        & (board["query_type"] == "vector")
        & (board["reranker"] == "none")
    ]
    return rows.iloc[0].to_dict() if not rows.empty else None


def _number(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if out == out else None


def _registered(
    final: Any,
    row: dict[str, Any],
    spec: FinalSpec,
    tracking_uri: str,
    parent: str,
    name: str,
    report_uri: str,
    data: PreparedData,
) -> dict[str, Any]:
    """The registered version of a dataset's tuned winner (the run's champion's, or a new one), tagged."""
    reg = final.registered
    if not (
        reg
        and final.winner
        and final.winner.get("model") == row["model"]
        and final.winner.get("dataset") == row["dataset"]
    ):
        alias = re.sub(r"[^A-Za-z0-9_-]+", "_", f"{spec.alias}-{row['dataset']}")
        reg = register_winner(tracking_uri, parent, row, name, alias, final.metric)
    metric = final.metric
    gain, p = _number(row.get(f"delta_{metric}")), _number(row.get(f"p_{metric}"))
    tags = {
        "dataset": row["dataset"],
        "data_fingerprint": data.fingerprint,
        "base_model": row.get("base_model"),
        "metric": metric,
        metric: row.get(metric),
        "gain": f"{gain:+.4f}" if gain is not None else "",
        "p_value": f"{p:.4g}" if p is not None else "",
        "report": report_uri,
    }
    c = mlc.client(tracking_uri)
    for k, v in tags.items():
        c.set_model_version_tag(reg["name"], reg["version"], k, str(v))
    return reg


def serve_datasets(
    rundir: RunDir,
    final: Any,  # final.stage.FinalResult (stage imports this module)
    datasets: dict[str, PreparedData],
    spec: FinalSpec,
    tracking_uri: str | None,
    parent_run_id: str | None,
    sweep_name: str | None = None,
) -> dict[str, ServedTable]:
    """Write every dataset's served table (see the module docstring); returns them by dataset."""
    from embedtune.lance_function import REGISTRY_PREFIX, seed_cache  # imports LanceDB: only here

    specs = rundir.dataset_specs()
    db_uri = serve_uri(spec.lancedb_uri or rundir.default_lancedb)
    backend = resolve_backend(spec.encode_backend)
    report_uri = rundir.uri(REPORT)
    name = spec.register_name or f"embedtune-{sweep_name or rundir.path.name}"
    stored_uri = mlc.redact(tracking_uri) if tracking_uri else None  # never a password in a table
    out: dict[str, ServedTable] = {}
    for label, data in datasets.items():
        row = recommended(final, label)
        if row is None:
            log.warning("no model to serve for %s (nothing was evaluated)", label)
            continue
        meta: dict[str, Any] = {
            "dataset": label,
            "data_fingerprint": data.fingerprint,
            "metric": final.metric,
        }
        if row.get("kind") == "tuned":
            meta.update(kind="tuned", base_model=row.get("base_model"), model_label=row["model"])
            if tracking_uri and parent_run_id and spec.registry:
                reg = _registered(final, row, spec, tracking_uri, parent_run_id, name, report_uri, data)
                model = f"{REGISTRY_PREFIX}{reg['name']}/{reg['version']}"
                seed_cache(model, stored_uri, row["model_path"])  # no download on this machine
                meta.update(registered_model=reg["name"], model_version=reg["version"])
            else:
                model = str(row["model_path"])  # nothing registered: the local checkpoint
        else:
            label_ref = str(row["model"])
            try:
                resolve_model(label_ref)  # a packaged / hub name: resolvable anywhere
                model = label_ref
            except Exception:
                model = str(row["model_path"])
            meta.update(kind="base", base_model=label_ref, model_label=label_ref)
        plain = vector_row(final, label, str(row["model"])) or {}
        for m in (final.metric, "hit_at_10"):
            if _number(plain.get(m)) is not None:
                meta[f"vector_{m}"] = round(float(plain[m]), 6)
        meta.update(
            model=model,
            verdict=(final.verdicts.get(label) or {}).get("verdict", ""),
            report=report_uri,
            encode_backend=backend,
        )
        corpus = whole_corpus(data, specs.get(label))
        out[label] = build_served_table(
            db_uri,
            label,
            corpus,
            model=model,
            tracking_uri=stored_uri if model.startswith(REGISTRY_PREFIX) else None,
            backend=backend,
            max_seq_length=spec.eval.max_seq_length,
            meta=meta,
            batch_size=spec.eval.batch_size,
        )
        if tracking_uri and parent_run_id:
            mlc.set_tags(
                tracking_uri,
                parent_run_id,
                {f"embedtune.served.{label}": f"{db_uri} table {label} v{out[label].version} ({model})"},
            )
    return out
