"""Cross-encoder reranking: every (query, candidate) pair scored by a cross-encoder, batched."""

from __future__ import annotations

import logging
from pathlib import Path

from embedtune import env
from embedtune.errors import EmbedtuneError
from embedtune.rerank.base import Reranker, ids

log = logging.getLogger(__name__)


def load_cross_encoder(ref: str | Path, max_length: int | None = None, device: str | None = None):
    """Load a CrossEncoder from a local dir (used as is) or a hub id; any failure is one EmbedtuneError."""
    from sentence_transformers.cross_encoder import CrossEncoder

    ref = str(ref)
    path = Path(ref).expanduser()
    if path.exists() and not (path.is_dir() and (path / "config.json").exists()):
        raise EmbedtuneError(f"reranker {ref} is not a cross-encoder model directory (no config.json in it)")
    try:
        return CrossEncoder(
            str(path) if path.exists() else ref, max_length=max_length, device=device or env.device()
        )
    except Exception as exc:
        where = "local directory" if path.exists() else "Hugging Face id (offline?)"
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise EmbedtuneError(
            f"cross-encoder reranker {ref!r} ({where}) failed to load: {type(exc).__name__}: {first}"
        ) from exc


class CrossEncoderReranker(Reranker):
    """`cross-encoder`: the candidates of all queries scored in one batched `predict` call.

    Used instead of LanceDB's `CrossEncoderReranker`, which runs one small predict per query; the
    ranking is the same (tests/test_rerank.py checks it against LanceDB's reranker loaded from the
    same local path), `as_lancedb()` gives that LanceDB reranker. Hybrid queries rerank the union
    of both legs."""

    name = "cross-encoder"
    query_types = ("vector", "fts", "hybrid")
    deep = True

    def __init__(
        self,
        model,
        corpus: dict[str, str] | None = None,
        batch_size: int = 64,
        path: str | None = None,
        progress: bool = False,
    ) -> None:
        self.model = model
        self.corpus = corpus or {}
        self.batch_size = batch_size
        self.path = path
        self.progress = progress
        # (query, document) -> score. A cross-encoder's score does not depend on which retriever
        # found the document, and the candidate lists of the query types and of the models under
        # evaluation overlap heavily, so each distinct pair is scored once: on the local sweep this
        # cut cross-encoder calls several-fold (see `pairs_scored` / `pairs_asked`).
        self._scores: dict[tuple[str, str], float] = {}
        self.pairs_asked = 0
        self.pairs_scored = 0

    @classmethod
    def load(cls, ref: str | Path, corpus: dict[str, str], batch_size: int = 64, progress: bool = False):
        return cls(load_cross_encoder(ref), corpus, batch_size, str(ref), progress)

    def scores(self, pairs: list[tuple[str, str]]) -> list[float]:
        todo = list(dict.fromkeys(p for p in pairs if p not in self._scores))
        self.pairs_asked += len(pairs)
        self.pairs_scored += len(todo)
        if todo:
            fresh = self.model.predict(
                todo,
                batch_size=self.batch_size,
                show_progress_bar=self.progress and len(todo) >= 1000,
                convert_to_numpy=True,
            )
            self._scores.update(zip(todo, (float(x) for x in fresh), strict=True))
        return [self._scores[p] for p in pairs]

    def rerank_many(self, queries: list[str], candidates: list[list[str]], limit: int) -> list[list[str]]:
        """Per query, its candidate ids ordered by cross-encoder score (ties keep retrieval order)."""
        pairs = [(q, self.corpus[c]) for q, cands in zip(queries, candidates, strict=True) for c in cands]
        if not pairs:
            return [[] for _ in queries]
        scores = self.scores(pairs)
        out, pos = [], 0
        for cands in candidates:
            s = scores[pos : pos + len(cands)]
            pos += len(cands)
            order = sorted(range(len(cands)), key=lambda i: -s[i])
            out.append([cands[i] for i in order[:limit]])
        return out

    def rank(self, query_type, queries, vector_legs, fts_legs, limit):
        if query_type == "hybrid":
            candidates = [
                list(dict.fromkeys([*ids(v), *ids(f)])) for v, f in zip(vector_legs, fts_legs, strict=True)
            ]
        else:
            candidates = [ids(leg) for leg in (vector_legs if query_type == "vector" else fts_legs)]
        return self.rerank_many(queries, candidates, limit)

    def as_lancedb(self):
        """LanceDB's own `CrossEncoderReranker` on the same weights (a local path or hub id)."""
        from lancedb.rerankers import CrossEncoderReranker as LanceCrossEncoder

        ref = self.path or str(getattr(self.model, "name_or_path", "") or "")
        if not ref:
            raise EmbedtuneError("as_lancedb needs the cross-encoder's path or hub id")
        return LanceCrossEncoder(
            model_name=ref,
            column="text",
            device=str(self.model.device),
            batch_size=self.batch_size,
            max_length=self.model.max_length,
        )
