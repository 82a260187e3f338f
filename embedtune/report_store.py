"""What a report is rebuilt from, stored inside it: the evaluation rows (`results.csv`), their
per-query values (`per_query.parquet`), the do-no-harm check (`harm.json`), the probe cache
(`probe.json`) and `meta.json` (the metrics it was built with)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from embedtune.errors import EmbedtuneError
from embedtune.records import HarmCheck

log = logging.getLogger(__name__)

RESULTS_FILE = "results.csv"
PER_QUERY_FILE = "per_query.parquet"
HARM_FILE = "harm.json"
PROBE_FILE = "probe.json"
META_FILE = "meta.json"
PER_QUERY = "per_query"  # results column: dict metric -> one value per query (see evaluate.COLUMNS)
_PQ_KEYS = ["dataset", "model", "query_type", "reranker"]


def save_results(report_dir: Path, results) -> Path:
    """Store the evaluation rows as `results.csv` and their per-query values (the `per_query`
    column, if any) as `per_query.parquet`: one row per (dataset, model, query_type, reranker,
    metric) with the list of values."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    report_dir.mkdir(parents=True, exist_ok=True)
    path = report_dir / RESULTS_FILE
    results.drop(columns=[PER_QUERY], errors="ignore").to_csv(path, index=False)
    rows: dict[str, list] = {k: [] for k in [*_PQ_KEYS, "metric", "values"]}
    if PER_QUERY in results:
        for rec in results[[*_PQ_KEYS, PER_QUERY]].to_dict("records"):
            for m, values in (rec[PER_QUERY] if isinstance(rec[PER_QUERY], dict) else {}).items():
                for k in _PQ_KEYS:
                    rows[k].append(str(rec[k]))
                rows["metric"].append(str(m))
                rows["values"].append([float(x) for x in values])
    if rows["metric"]:
        schema = pa.schema(
            [*((k, pa.string()) for k in [*_PQ_KEYS, "metric"]), ("values", pa.list_(pa.float64()))]
        )
        pq.write_table(pa.table(rows, schema=schema), report_dir / PER_QUERY_FILE)
    return path


def _load_per_query(path: Path) -> dict[tuple[str, ...], dict[str, Any]]:
    """(dataset, model, query_type, reranker) -> {metric: float array} from a per-query sidecar."""
    import numpy as np
    import pyarrow.parquet as pq

    tbl = pq.read_table(path)
    col = tbl.column("values").combine_chunks()
    flat, offsets = col.flatten().to_numpy(zero_copy_only=False), col.offsets.to_numpy()
    keys = zip(*(tbl.column(k).to_pylist() for k in [*_PQ_KEYS, "metric"]), strict=True)
    out: dict[tuple[str, ...], dict[str, Any]] = {}
    for i, (*key, metric) in enumerate(keys):
        out.setdefault(tuple(key), {})[metric] = np.asarray(flat[offsets[i] : offsets[i + 1]], dtype=float)
    return out


def load_results(report_dir: Path):
    import pandas as pd

    path = Path(report_dir) / RESULTS_FILE
    if not path.exists():
        raise EmbedtuneError(
            f"no stored results: {path} is missing (run the final stage or `embedtune evaluate` first)"
        )
    df = pd.read_csv(path, dtype={"trial_id": "string"})
    df["trial_id"] = df["trial_id"].astype(object).where(df["trial_id"].notna(), None)
    sidecar = path.parent / PER_QUERY_FILE
    if sidecar.exists():  # without it the report has blank intervals
        values = _load_per_query(sidecar)
        keys = zip(*(df[k].astype(str) for k in _PQ_KEYS), strict=True)
        df[PER_QUERY] = [values.get(tuple(k)) for k in keys]
    return df


def load_json(path: Path, default: Any) -> Any:
    if not path.exists():
        return default
    try:
        return json.loads(path.read_text())
    except ValueError:
        log.warning("%s is not valid JSON: ignored", path)
        return default


def load_harm(report_dir: Path) -> HarmCheck:
    return HarmCheck.from_dict(load_json(Path(report_dir) / HARM_FILE, {}))


def current_harm(harm: HarmCheck, dataset_winners: dict[str, dict[str, Any] | None]) -> HarmCheck:
    """`harm` keeping only the rows whose winner is still the dataset's winner (a re-evaluation may
    have picked another)."""
    current = {ds: (w or {}).get("model") for ds, w in dataset_winners.items()}
    kept = [r for r in harm.rows if current.get(r.dataset) == r.winner]
    if len(kept) < len(harm.rows):
        log.warning(
            "dropping %d stale do-no-harm row(s) of models that are no longer the winner",
            len(harm.rows) - len(kept),
        )
    return HarmCheck(**{**harm.__dict__, "rows": kept})


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, default=str))
