"""Hard negatives: (question, answer) pairs → (anchor, positive, negative) triplets, cached on disk.

Mining is sentence-transformers' `mine_hard_negatives`; this module only decides what to mine
against and caches the result under a key of (data fingerprint, miner model, settings), so a
sweep mines once per (dataset, miner) and every trial loads the same triplets.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from embedtune import env
from embedtune.cache import build_once, stable_hash
from embedtune.data import PreparedData
from embedtune.errors import EmbedtuneError

log = logging.getLogger(__name__)


class MiningSpec(BaseModel):
    """Settings passed to `mine_hard_negatives` (see its docs for the meaning of each)."""

    model_config = ConfigDict(extra="forbid")

    model: str = "all-MiniLM-L6-v2"
    num_negatives: int = Field(1, ge=1, description="negatives per pair (one triplet each)")
    range_min: int = Field(0, ge=0, description="skip the top range_min candidates (likely false negatives)")
    range_max: int | None = Field(50, ge=1, description="consider only the top range_max candidates")
    relative_margin: float | None = Field(
        0.05, ge=0, lt=1, description="negative must score < (1-m) x positive"
    )
    absolute_margin: float | None = Field(None, ge=0)
    sampling_strategy: str = Field("top", pattern="^(top|random)$")
    batch_size: int = Field(64, ge=1)
    max_seq_length: int | None = Field(
        None, ge=8, description="truncate texts while mining (None = the model's own)"
    )

    @model_validator(mode="after")
    def _check(self) -> MiningSpec:
        if self.range_max is not None and self.range_max <= self.range_min:
            raise ValueError(
                f"range_max ({self.range_max}) must be greater than range_min ({self.range_min})"
            )
        return self


@dataclass
class Triplets:
    """Mined triplets for training and for the TripletEvaluator, and where they are cached."""

    key: str
    path: Path
    train: object  # datasets.Dataset with anchor / positive / negative
    eval: object
    mined: bool  # False when loaded from the cache

    @property
    def counts(self) -> dict[str, int]:
        return {"train_triplets": len(self.train), "eval_triplets": len(self.eval)}


def cache_key(data: PreparedData, spec: MiningSpec) -> str:
    """Key of (data fingerprint, mining settings); `sentence-transformers/<name>` of a packaged
    model keys like its short name (same weights)."""
    from embedtune.models import packaged_name

    settings = spec.model_dump() | {"model": packaged_name(spec.model) or spec.model}
    if settings["max_seq_length"] is None:
        del settings["max_seq_length"]  # keys made before this setting existed stay valid
    return stable_hash(data.fingerprint, settings)


def _mine(pairs: list[tuple[str, str]], corpus: list[str], model, spec: MiningSpec):
    from datasets import Dataset
    from sentence_transformers.util import mine_hard_negatives

    ds = Dataset.from_dict({"anchor": [q for q, _ in pairs], "positive": [a for _, a in pairs]})
    return mine_hard_negatives(
        ds,
        model,
        corpus=corpus,
        range_min=spec.range_min,
        range_max=spec.range_max,
        relative_margin=spec.relative_margin,
        absolute_margin=spec.absolute_margin,
        num_negatives=spec.num_negatives,
        sampling_strategy=spec.sampling_strategy,
        batch_size=spec.batch_size,
        output_format="triplet",
        verbose=False,
    )


def mine(data: PreparedData, spec: MiningSpec | None = None, cache_dir: Path | None = None) -> Triplets:
    """Mine (or load from cache) train and eval triplets for `data` with `spec`.

    Train negatives come from the distinct train answers, eval negatives from the eval corpus, so
    no eval text enters training."""
    from datasets import Dataset

    spec = spec or MiningSpec()
    key = cache_key(data, spec)
    target = (Path(cache_dir) if cache_dir else env.home() / "negatives") / f"{data.label}-{key}"

    def build(tmp: Path) -> None:
        from sentence_transformers import SentenceTransformer

        from embedtune.models import resolve_model, truncate

        model = SentenceTransformer(str(resolve_model(spec.model)), device=_device())
        truncate(model, spec.max_seq_length)
        train_corpus = list(dict.fromkeys(a for _, a in data.train))
        log.info("mining hard negatives for %s with %s", data.label, spec.model)
        train = _mine(data.train, train_corpus, model, spec)
        evals = _mine(data.eval_pairs, list(data.corpus.values()), model, spec)
        if len(train) == 0:
            raise EmbedtuneError(
                f"no triplets mined for {data.label}: every candidate negative was filtered out; "
                "loosen relative_margin / absolute_margin or widen range_max"
            )
        train.to_parquet(str(tmp / "train.parquet"))
        evals.to_parquet(str(tmp / "eval.parquet"))

    path, built = build_once(target, build)
    return Triplets(
        key=key,
        path=path,
        train=Dataset.from_parquet(str(path / "train.parquet")),
        eval=Dataset.from_parquet(str(path / "eval.parquet")),
        mined=built,
    )


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
