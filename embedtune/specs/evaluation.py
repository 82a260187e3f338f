"""Retrieval evaluation and the final stage (a sweep's `final:` block)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from embedtune.specs.base import Strict
from embedtune.specs.data import DataSpec
from embedtune.specs.metrics import DEFAULT_LEADERBOARD_METRIC, DEFAULT_SWEEP_METRIC, check_leaderboard_metric

QueryType = Literal["vector", "fts", "hybrid"]
RerankerName = Literal["none", "rrf", "linear", "cross-encoder"]
# How corpora and queries are encoded after training (embedtune.encode): `auto` = openvino on a CPU,
# torch on a GPU.
EncodeBackend = Literal["auto", "torch", "onnx", "onnx-int8", "openvino", "openvino-int8"]


class OodSpec(DataSpec):
    """An out-of-domain set of `final.ood`: a data spec, and the datasets it is in the domain of."""

    in_domain_for: list[str] = Field(
        default_factory=list,
        description="dataset labels whose winners are not checked on this set (it is their domain: "
        "e.g. other SQuAD paragraphs for a SQuAD-trained winner); a set whose label or source is a "
        "dataset's own is skipped for it anyway",
    )


class EvalSpec(Strict):
    """What to evaluate. Combinations a reranker does not apply to (see `embedtune.rerank`) are skipped."""

    ks: list[int] = Field(default_factory=lambda: [1, 5, 10], description="hit@k cut-offs")
    query_types: list[QueryType] = Field(default_factory=lambda: ["vector", "fts", "hybrid"])
    rerankers: list[RerankerName] = Field(default_factory=lambda: ["none", "rrf", "linear", "cross-encoder"])
    overfetch: int = Field(
        4, ge=1, description="a reranker sees k x overfetch candidates, then the top k are kept"
    )
    batch_size: int = Field(64, ge=1, description="encode / cross-encoder batch size")
    max_seq_length: int | None = Field(
        None,
        ge=8,
        description="truncate every model's queries and documents to this many tokens (a sweep sets "
        "its train.max_seq_length, so base and tuned models compete under the same truncation); "
        "None: each model's own limit",
    )
    dims: list[int] | None = Field(
        None,
        description="also score vector search on each of these leading slices of every model's "
        "embedding (re-normalised), one row each (kind `truncated`, label `<model>@<d>d`): what serving "
        "a smaller index costs in quality. A sweep sets its train.matryoshka_dims here unless given",
    )
    linear_weight: float = Field(0.7, ge=0, le=1, description="weight of the vector leg in linear fusion")
    fts_threads: int = Field(4, ge=1, description="parallel FTS queries (LanceDB FTS takes one query string)")

    @model_validator(mode="after")
    def _check(self) -> EvalSpec:
        if not self.ks or any(k < 1 for k in self.ks):
            raise ValueError(f"ks must be positive integers, got {self.ks}")
        self.ks = sorted(set(self.ks))
        if not self.query_types or not self.rerankers:
            raise ValueError("query_types and rerankers must not be empty")
        if self.dims is not None:
            if any(d < 1 for d in self.dims):
                raise ValueError(f"dims must be positive embedding dimensions, got {self.dims}")
            self.dims = sorted(set(self.dims), reverse=True)
        return self

    @property
    def depth(self) -> int:
        """How many results a query returns: the largest k, and at least 10 for MRR@10 / nDCG@10."""
        return max([*self.ks, 10])


class FinalSpec(Strict):
    """Settings of the final stage: pick, score in LanceDB, report, register."""

    enabled: bool = True
    top_k: int = Field(
        2, ge=0, description="best trials overall evaluated besides the best per (model, dataset)"
    )
    metric: str = Field(DEFAULT_SWEEP_METRIC, description="sweep metric that picks checkpoints (best epoch)")
    mode: Literal["max", "min"] = "max"
    leaderboard_metric: str = Field(
        DEFAULT_LEADERBOARD_METRIC, description="retrieval metric that ranks the leaderboard"
    )
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
    encode_backend: EncodeBackend = Field(
        "auto",
        description="encoder of every corpus / query pass after training (LanceDB ingest and queries, "
        "base-model scores, do no harm, the probe): auto (openvino on a CPU, torch on a GPU), torch, "
        "onnx, onnx-int8, openvino, openvino-int8; exports are cached per checkpoint",
    )
    lancedb_uri: str | None = Field(None, description="None: <run_dir>/lancedb")
    registry: bool = Field(True, description="register the winner in the MLflow model registry")
    register_name: str | None = Field(None, description="None: embedtune-<sweep name>")
    alias: str = Field("champion", pattern=r"^[A-Za-z0-9_-]+$")
    serve: bool = Field(
        True,
        description="after the report, write each dataset's served table (<lancedb_uri>/serve/<dataset>): "
        "its whole corpus embedded with the recommended model, searchable by text (embedtune search)",
    )
    probe_size: int = Field(200, ge=0, description="questions sampled for the 'should you fine-tune?' probe")
    ood: list[OodSpec] = Field(
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

    @field_validator("ood", mode="before")
    @classmethod
    def _ood(cls, v):
        """A plain `DataSpec` (the Python API) is an OOD set in no dataset's domain."""
        if isinstance(v, list):
            return [
                x.model_dump(exclude_unset=True)
                if isinstance(x, DataSpec) and not isinstance(x, OodSpec)
                else x
                for x in v
            ]
        return v

    @field_validator("leaderboard_metric")
    @classmethod
    def _lb_metric(cls, v: str) -> str:
        return check_leaderboard_metric(v)

    @field_validator("cross_encoder")
    @classmethod
    def _ce(cls, v: str | None) -> str | None:
        if v is not None and (not v.strip() or v.strip().lower() in {"none", "null", "off"}):
            return None
        return v
