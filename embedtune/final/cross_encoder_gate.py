"""Evidence before a trained cross-encoder is used: does it improve the bi-encoder's own ordering?

A cross-encoder trained here from a bi-encoder in a few dozen CPU steps can rank worse than the
bi-encoder it reranks (on a held-out 4,500-pair sweep it took the winner's MRR@10 from 0.871 to
0.397). So before the final stage scores it, `gate_cross_encoder` checks it on training questions
held back from its own training: each question's top 10 from a bi-encoder over the training
answers (plus the eval corpus as distractors), scored as retrieved and as reranked, on the
headline metric. The cross-encoder is used only when it scores higher; otherwise it is left out of
the scored grid and the report says so, with the numbers.
"""

from __future__ import annotations

import logging
import random
from dataclasses import asdict, dataclass
from typing import Any

from embedtune.data import PreparedData
from embedtune.evaluate import per_query_metrics
from embedtune.models import load_model, resolve_model, truncate
from embedtune.rerank.cross_encoder import CrossEncoderReranker
from embedtune.stats import paired_pvalue

log = logging.getLogger(__name__)

HELD_BACK_SHARE = 0.25  # of the distinct training questions, kept out of the cross-encoder's training
HELD_BACK_MAX = 200
HELD_BACK_MIN = 10  # fewer held-back questions than this: no gate (too little evidence either way)
DEPTH = 10


@dataclass
class GateResult:
    """The check of one dataset's trained cross-encoder (stored with the report)."""

    dataset: str
    metric: str
    n_questions: int
    bi_encoder: str
    retrieved: float  # the bi-encoder's own ordering
    reranked: float  # the cross-encoder's reordering of the same top 10
    p_value: float
    used: bool

    def line(self) -> str:
        verb = "used" if self.used else "skipped"
        why = "it improves" if self.used else "it does not improve"
        return (
            f"Cross-encoder trained here {verb} on {self.dataset}: {why} the bi-encoder's own ordering on "
            f"{self.n_questions} held-back training questions ({self.metric} {self.retrieved:.3f} as "
            f"retrieved → {self.reranked:.3f} reranked, p={self.p_value:.2g})."
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def held_back_questions(data: PreparedData, seed: int = 42) -> set[str]:
    """A seeded share of the distinct training questions, kept out of the cross-encoder's training."""
    questions = sorted({q for q, _ in data.train})
    n = min(HELD_BACK_MAX, int(len(questions) * HELD_BACK_SHARE))
    if n < HELD_BACK_MIN:
        return set()
    return set(random.Random(seed).sample(questions, n))


def gate_cross_encoder(
    data: PreparedData,
    held_back: set[str],
    cross_encoder: str,
    bi_encoder: str,
    metric: str,
    batch_size: int = 64,
    max_seq_length: int | None = None,
) -> GateResult | None:
    """Score `cross_encoder` against `bi_encoder`'s ordering on the `held_back` training questions
    (see the module note); None without enough held-back questions. `max_seq_length`: the
    bi-encoder's input cut, as the final stage evaluates it (None: the model's own)."""
    import numpy as np

    if len(held_back) < HELD_BACK_MIN:
        return None
    answers: dict[str, set[str]] = {}
    for q, a in data.train:
        if q in held_back:
            answers.setdefault(q, set()).add(a)
    docs = list(dict.fromkeys([*(a for _, a in data.train), *data.corpus.values()]))
    doc_id = {t: f"d{i}" for i, t in enumerate(docs)}
    questions = sorted(answers)
    relevant = {q: [doc_id[a] for a in sorted(answers[q])] for q in questions}
    model = load_model(resolve_model(bi_encoder))
    truncate(model, max_seq_length)
    d = model.encode(docs, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True)
    qv = model.encode(questions, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True)
    top = np.argsort(-(qv @ d.T), axis=1)[:, :DEPTH]
    retrieved = [[f"d{j}" for j in row] for row in top]
    ce = CrossEncoderReranker.load(cross_encoder, {v: k for k, v in doc_id.items()}, batch_size)
    reranked = ce.rerank_many(questions, retrieved, DEPTH)
    rel = [relevant[q] for q in questions]
    before = per_query_metrics(retrieved, rel)[metric]
    after = per_query_metrics(reranked, rel)[metric]
    result = GateResult(
        dataset=data.label,
        metric=metric,
        n_questions=len(questions),
        bi_encoder=str(bi_encoder),
        retrieved=float(np.mean(before)),
        reranked=float(np.mean(after)),
        p_value=float(paired_pvalue(after, before, metric)),
        used=float(np.mean(after)) > float(np.mean(before)),
    )
    log.info("%s", result.line())
    return result
