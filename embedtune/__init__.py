"""embedtune: find the best fine-tuned sentence-embedding model for a retrieval job, and prove it."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import sys

__version__ = "0.1.0"

# A served table names its embedding function `embedtune` (embedtune.lance_function); LanceDB looks
# it up by name in its registry, so `import embedtune` registers it. Importing LanceDB here would
# cost every process seconds (the CLI, Ray workers), so the function is registered right after
# LanceDB's embeddings package is imported, by whoever imports it.
_LANCE_EMBEDDINGS = "lancedb.embeddings"


def _register_lance_function() -> None:
    try:
        import embedtune.lance_function  # noqa: F401
    except Exception as exc:  # a broken optional import must not break `import lancedb`
        logging.getLogger(__name__).warning("embedtune's LanceDB embedding function not registered: %s", exc)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds lancedb.embeddings as usual, and registers embedtune's function once it has run."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _LANCE_EMBEDDINGS:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module) -> None:
            run(module)
            _register_lance_function()

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


if _LANCE_EMBEDDINGS in sys.modules:
    _register_lance_function()
elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterImport())
