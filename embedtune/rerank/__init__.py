"""Rerankers: how the candidates a query retrieved become its final ranking.

Every reranker is a small class behind one interface (`base.Reranker`, after LanceDB's): `none`
(the leg as retrieved), `rrf` and `linear` (LanceDB's hybrid fusions), `cross-encoder` (batched
cross-encoder scores; `embedtune.final.cross_encoder_train` trains one offline). To add one: subclass `Reranker`
in a module here, give it a `name` and the `query_types` it applies to, add it to `RERANKERS`
(and to `specs.evaluation.RerankerName`).
"""

from __future__ import annotations

from pathlib import Path

from embedtune.rerank.base import Reranker
from embedtune.rerank.cross_encoder import CrossEncoderReranker, load_cross_encoder
from embedtune.rerank.fusion import RRF, AsRetrieved, Linear, fuse
from embedtune.specs import EvalSpec

RERANKERS: dict[str, type[Reranker]] = {
    cls.name: cls for cls in (AsRetrieved, RRF, Linear, CrossEncoderReranker)
}
# Which rerankers apply to which query type: RRF and linear fuse the vector and FTS legs, so they
# exist for hybrid only (over one ranked list RRF is the identity); a hybrid query always fuses,
# so it has no "none"; a cross-encoder reranks any candidate list.
VALID_RERANKERS: dict[str, tuple[str, ...]] = {
    q: tuple(name for name, cls in RERANKERS.items() if q in cls.query_types)
    for q in ("vector", "fts", "hybrid")
}


def combos(spec: EvalSpec) -> list[tuple[str, str]]:
    """The (query type, reranker) pairs of `spec` that make sense (see VALID_RERANKERS)."""
    return [(q, r) for q in spec.query_types for r in spec.rerankers if r in VALID_RERANKERS[q]]


def build(
    names: set[str],
    spec: EvalSpec,
    corpus: dict[str, str],
    cross_encoder: str | Path | None = None,
    progress: bool = False,
) -> dict[str, Reranker]:
    """One reranker object per name (the cross-encoder loaded from `cross_encoder`)."""
    out: dict[str, Reranker] = {}
    for name in names:
        if name == "cross-encoder":
            out[name] = CrossEncoderReranker.load(cross_encoder, corpus, spec.batch_size, progress)
        elif name == "linear":
            out[name] = Linear(spec.linear_weight)
        else:
            out[name] = RERANKERS[name]()
    return out


__all__ = [
    "RERANKERS",
    "VALID_RERANKERS",
    "AsRetrieved",
    "CrossEncoderReranker",
    "Linear",
    "RRF",
    "Reranker",
    "build",
    "combos",
    "fuse",
    "load_cross_encoder",
]
