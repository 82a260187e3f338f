"""Files written so a reader never sees half of one: atomic local writes (unique temp, fsync, rename),
folder swaps, and the same calls on object storage (tests/test_cluster_local.py runs them on S3)."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from embedtune import storage


def test_atomic_write_leaves_old_or_new_never_half(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "state.json"
    storage.write_json(target, {"v": 1})
    # a writer that dies mid-write (here: fsync raises) leaves the old file and no temp file
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(28, "No space left")))
    with pytest.raises(OSError, match="No space"):
        storage.write_json(target, {"v": 2, "pad": "x" * 100_000})
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_concurrent_writers_use_unique_temp_files(tmp_path: Path) -> None:
    """Two writers of one file never share a temp name (a fixed `.tmp` name let one writer rename
    the other's half-written file into place)."""
    target = tmp_path / "trials.json"
    payloads = [{"writer": i, "rows": list(range(20_000))} for i in range(4)]
    errors: list[BaseException] = []

    def write(p):
        try:
            for _ in range(10):
                storage.write_json(target, p)
                json.loads(target.read_text())  # always a whole file
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert json.loads(target.read_text()) in payloads
    assert [p.name for p in tmp_path.iterdir()] == ["trials.json"]


def test_swap_dir_replaces_a_folder_whole(tmp_path: Path) -> None:
    old = tmp_path / "report"
    old.mkdir()
    (old / "a.md").write_text("old")
    (old / "stale.png").write_text("old plot")
    new = tmp_path / "staging"
    new.mkdir()
    (new / "a.md").write_text("new")
    storage.swap_dir(new, old)
    assert sorted(p.name for p in old.iterdir()) == ["a.md"] and (old / "a.md").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]


def test_locations_and_missing_files(tmp_path: Path) -> None:
    assert storage.is_remote("s3://bucket/key") and not storage.is_remote(tmp_path)
    assert not storage.is_remote(f"file://{tmp_path}")
    assert storage.join("s3://b/sweeps/", "x", "/y.json") == "s3://b/sweeps/x/y.json"
    assert storage.join(tmp_path, "a", "b.json") == str(tmp_path / "a" / "b.json")
    assert storage.read_json(tmp_path / "nope.json", "default") == "default"
    assert storage.read_bytes(tmp_path / "nope") is None and not storage.exists(tmp_path / "nope")
    storage.delete(tmp_path / "nope")  # nothing to delete: no error
