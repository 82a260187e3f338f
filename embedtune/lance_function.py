"""embedtune's LanceDB embedding function, registered as `embedtune` in LanceDB's registry.

A served table (`embedtune.serve`) is created through LanceDB's embedding API with this function,
so the table itself knows how to embed a question: in any process that has imported embedtune,
`lancedb.connect(uri).open_table("medquad").search("a question")` embeds the text with the model
the table names and searches. `import embedtune` registers the function (lazily: when LanceDB's
embeddings package is imported, see `embedtune/__init__.py`), because LanceDB looks a table's
function up by name.

Why a function of our own and not LanceDB's `sentence-transformers` one: the model a table names is
`models:/<name>/<version>` in the MLflow registry (a winner trained on a cluster: its artifact is in
S3 behind the tracking server) or a packaged base model that must load offline
(`embedtune.models`), which `SentenceTransformer(name)` cannot resolve; and the vectors must come
from the encoder the leaderboard scored with (`embedtune.encode`: the same backend, truncation and
normalisation), or the table's search would not reproduce the leaderboard's numbers.

Registry models are downloaded once into `EMBEDTUNE_HOME/served/<key>/` (key: the tracking URI
without credentials and the model URI). The tracking URI comes from the table (where it was
registered) or `$MLFLOW_TRACKING_URI` (a laptop pointing at the cluster's server; the login from
`MLFLOW_TRACKING_USERNAME` / `MLFLOW_TRACKING_PASSWORD`).
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from lancedb.embeddings.base import TextEmbeddingFunction
from lancedb.embeddings.registry import register

from embedtune import env
from embedtune.cache import build_once, stable_hash
from embedtune.errors import EmbedtuneError

log = logging.getLogger(__name__)

NAME = "embedtune"
REGISTRY_PREFIX = "models:/"
ST_MARKER = "modules.json"  # a sentence-transformers folder has it


def _cache_dir(model: str, tracking_uri: str | None) -> Path:
    from embedtune.tracking.client import redact

    key = stable_hash(redact(tracking_uri or ""), model)
    return env.home() / "served" / key


def _st_folder(root: Path) -> Path:
    """The sentence-transformers folder inside a downloaded MLflow model."""
    hits = sorted(p.parent for p in root.rglob(ST_MARKER))
    if not hits:
        raise EmbedtuneError(f"{root} holds no sentence-transformers model ({ST_MARKER} not found)")
    return min(hits, key=lambda p: len(p.parts))


def seed_cache(model: str, tracking_uri: str | None, local: str | Path) -> Path:
    """Put the local copy `local` of registry model `model` into the cache (the final stage has it on
    disk already: a later search on this machine does not download it again)."""

    def build(tmp: Path) -> None:
        shutil.copytree(local, tmp / "model")

    path, _ = build_once(_cache_dir(model, tracking_uri), build)
    return path / "model"


def _download(model: str, tracking_uri: str) -> Path:
    import mlflow

    from embedtune.tracking.client import fluent_uri

    def build(tmp: Path) -> None:
        log.info("downloading %s from the MLflow registry", model)
        with fluent_uri(tracking_uri, registry=True):
            got = mlflow.artifacts.download_artifacts(artifact_uri=model, dst_path=str(tmp / "mlflow"))
        shutil.copytree(_st_folder(Path(got)), tmp / "model")
        shutil.rmtree(tmp / "mlflow", ignore_errors=True)

    try:
        path, _ = build_once(_cache_dir(model, tracking_uri), build)
    except EmbedtuneError:
        raise
    except Exception as exc:
        from embedtune.tracking.client import redact

        raise EmbedtuneError(
            f"cannot load {model} from the MLflow registry at {redact(tracking_uri)}: "
            f"{type(exc).__name__}: {exc}".splitlines()[0]
            + " (set MLFLOW_TRACKING_URI and MLFLOW_TRACKING_USERNAME/PASSWORD to the server it was registered on)"
        ) from exc
    return path / "model"


def resolve_served_model(model: str, tracking_uri: str | None = None) -> Path:
    """A local sentence-transformers folder for `model`: a registry URI (`models:/<name>/<version>`,
    from the cache or downloaded from the tracking server), else any reference
    `embedtune.models.resolve_model` takes (a packaged model offline, a local folder, a hub id)."""
    if not model.startswith(REGISTRY_PREFIX):
        from embedtune.models import resolve_model

        return resolve_model(model)
    from_env = os.environ.get("MLFLOW_TRACKING_URI")
    candidates = [u for u in dict.fromkeys([tracking_uri, from_env]) if u]
    for uri in [*candidates, None]:
        cached = _cache_dir(model, uri) / "model"
        if (cached / ST_MARKER).exists():
            return cached
    uri = from_env or tracking_uri
    if not uri:
        raise EmbedtuneError(
            f"{model} names the MLflow registry: set MLFLOW_TRACKING_URI to its tracking server"
        )
    return _download(model, uri)


@functools.lru_cache(maxsize=4)
def _encoder(model: str, tracking_uri: str | None, backend: str, max_seq_length: int | None):
    from embedtune.encode import load_encoder

    encoder = load_encoder(resolve_served_model(model, tracking_uri), backend)
    encoder.truncate(max_seq_length)
    return encoder


@register(NAME)
class EmbedtuneEmbeddings(TextEmbeddingFunction):
    """Embeds with `model` on `backend` (see `embedtune.encode`), truncated to `max_seq_length`
    tokens, unit-normalised: exactly what the final stage scored."""

    model: str
    tracking_uri: str | None = None  # where a `models:/` model was registered (no credentials)
    backend: str = "torch"
    max_seq_length: int | None = None
    batch_size: int = 64

    def _enc(self) -> Any:
        return _encoder(self.model, self.tracking_uri, self.backend, self.max_seq_length)

    def ndims(self) -> int:
        return self._enc().dim

    def generate_embeddings(self, texts) -> list:
        return list(self._enc().encode([str(t) for t in texts], batch_size=self.batch_size))
