"""What a trial trained and was evaluated on, as MLflow dataset inputs (`mlflow.log_input`'s records).

Each trial run gets two inputs per dataset: `<label>/train` (context `training`) and `<label>/eval`
(context `evaluation`), `mlflow.data` datasets whose digest is embedtune's data fingerprint (content,
column mapping and split settings: `embedtune.data`) and whose source is the file, folder or hub id
the pairs came from. The MLflow UI's Datasets column shows them. MLflow keeps one input per
(dataset, run), so logging them again (a replayed op, a reopened run) adds nothing.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

from embedtune.data import resolve_source
from embedtune.specs import DataSpec
from embedtune.tracking import client as mlc

log = logging.getLogger(__name__)

CONTEXTS = {"train": "training", "eval": "evaluation"}


def data_lineage(specs: list[DataSpec], fingerprints: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Dataset label -> what its inputs record (plain values: it travels in Tune's pickled callback)."""
    out: dict[str, dict[str, Any]] = {}
    for spec in specs:
        if spec.label not in fingerprints:
            continue
        target, fmt = resolve_source(spec)
        out[spec.label] = {
            "digest": fingerprints[spec.label],
            "source": str(target),
            "format": fmt,
            "hf_split": spec.hf_split,
            "hf_config": spec.hf_config,
        }
    return out


def _source(info: dict[str, Any]):
    if info["format"] == "hf":
        from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource

        return HuggingFaceDatasetSource(
            path=info["source"], split=info.get("hf_split"), config_name=info.get("hf_config")
        )
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    with warnings.catch_warnings():  # MLflow warns about its source resolution order
        warnings.simplefilter("ignore")
        return resolve_dataset_source(info["source"])


def dataset_inputs(label: str, info: dict[str, Any]) -> list:
    """The two DatasetInput entities (train, eval) of one dataset."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    source = _source(info)
    out = []
    for part, context in CONTEXTS.items():
        entity = MetaDataset(source, name=f"{label}/{part}", digest=info["digest"])._to_mlflow_entity()
        out.append(DatasetInput(dataset=entity, tags=[InputTag(key="mlflow.data.context", value=context)]))
    return out


def log_data_inputs(tracking_uri: str, run_id: str, label: str, info: dict[str, Any] | None) -> None:
    """Log `label`'s train and eval inputs to `run_id` (nothing when `info` is None)."""
    if not info:
        return
    mlc.client(tracking_uri).log_inputs(run_id, datasets=dataset_inputs(label, info))
