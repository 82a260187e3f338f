"""Hard negatives: (question, answer) pairs → (anchor, positive, negative) triplets, cached on disk.

Mining is sentence-transformers' `mine_hard_negatives`; this module only decides what to mine
against and caches the result under a key of (data fingerprint, miner model, settings), so a
sweep mines once per (dataset, miner) and every trial loads the same triplets.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

from embedtune import env
from embedtune.cache import build_once, stable_hash
from embedtune.data import PreparedData
from embedtune.errors import EmbedtuneError
from embedtune.specs import MiningSpec

log = logging.getLogger(__name__)


@dataclass
class Triplets:
    """Mined triplets for training and for the TripletEvaluator, and where they are cached."""

    key: str
    path: Path | None  # the cache folder (None for an in-memory copy)
    train: object  # datasets.Dataset with anchor / positive / negative
    eval: object
    mined: bool  # False when loaded from the cache

    @property
    def counts(self) -> dict[str, int]:
        return {"train_triplets": len(self.train), "eval_triplets": len(self.eval)}

    def in_memory(self) -> Triplets:
        """A copy held in memory, pickled by value: it travels to trials on other nodes (a dataset
        read from the cache is memory-mapped from a file only this machine has)."""
        from datasets import Dataset

        return replace(
            self,
            path=None,
            train=Dataset.from_dict(self.train.to_dict()),
            eval=Dataset.from_dict(self.eval.to_dict()),
        )


def cache_key(data: PreparedData, spec: MiningSpec) -> str:
    """Key of (data fingerprint, mining settings); `sentence-transformers/<name>` of a packaged
    model keys like its short name (same weights)."""
    from embedtune.models import packaged_name

    settings = spec.model_dump() | {"model": packaged_name(spec.model) or spec.model}
    if settings["max_seq_length"] is None:
        del settings["max_seq_length"]  # no truncation keys like the model's own limit
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

        model = SentenceTransformer(str(resolve_model(spec.model)), device=env.device())
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
