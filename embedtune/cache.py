"""Content-addressed on-disk artefacts, built once.

Every derived artefact (a materialised model, mined negatives, a trained reranker) lives in a
directory named by a hash of what it was made from. It is built in a temporary sibling and renamed
into place under a file lock, so concurrent trials never see a half-written directory and an
interrupted build leaves nothing that looks finished.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filelock import FileLock

COMPLETE_MARKER = ".complete"


def stable_hash(*parts: Any, length: int = 16) -> str:
    """Hash JSON-serialisable parts (dicts with sorted keys) into a short hex key."""
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, default=str, ensure_ascii=False).encode())
        h.update(b"\x00")
    return h.hexdigest()[:length]


def is_complete(path: Path) -> bool:
    return (path / COMPLETE_MARKER).exists()


def lock_for(path: Path) -> FileLock:
    """The lock that serialises builders of `path` (a sibling file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path.parent / f".{path.name}.lock"))


def build_once(path: Path, build: Callable[[Path], None]) -> tuple[Path, bool]:
    """Return (path, built): `path` holds a complete artefact; `build(tmpdir)` runs only when it
    does not exist yet. A leftover incomplete directory is removed and rebuilt."""
    path = Path(path)
    if is_complete(path):
        return path, False
    with lock_for(path):
        if is_complete(path):  # another process built it while we waited
            return path, False
        if path.exists():
            shutil.rmtree(path)  # half-written by an interrupted run
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            tmp.chmod(0o755)
            build(tmp)
            (tmp / COMPLETE_MARKER).write_text("")
            tmp.rename(path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return path, True
