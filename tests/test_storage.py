"""Files written so a reader never sees half of one: atomic local writes (unique temp, fsync, rename),
folder swaps, and the same calls on object storage (tests/test_cluster_local.py runs them on S3)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from embedtune import storage


def test_a_write_onto_a_full_disk_leaves_the_old_file_and_one_line(tmp_path: Path) -> None:
    """The state file sits on a real 1 MiB disk (a tmpfs) filled to the brim after its first write:
    the next write fails with one line naming the folder and the fix, and leaves the old file whole
    and no temp file behind."""
    from small_disk import on_small_disk

    disk = tmp_path / "disk"
    script = tmp_path / "write.py"
    script.write_text(
        "import json, sys\n"
        "from pathlib import Path\n"
        "from embedtune import storage\n"
        "from embedtune.errors import EmbedtuneError\n"
        "target = Path(sys.argv[1]) / 'state.json'\n"
        "if sys.argv[2] == 'first':\n"
        "    storage.write_json(target, {'v': 1})\n"
        "    sys.exit(0)\n"
        "try:\n"
        "    storage.write_json(target, {'v': 2, 'pad': 'x' * 100_000})\n"
        "except EmbedtuneError as exc:\n"
        "    print('ERROR', exc)\n"
        "print('FILES', json.dumps(sorted(p.name for p in target.parent.iterdir())))\n"
        "print('STATE', target.read_text().replace(chr(10), ' '))\n"
    )
    run = f"python {script} {disk}"
    done = on_small_disk(disk, "1m", f"{run} first && fill_to_brim && {run} second", timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in done.stdout.strip().splitlines())
    assert lines["ERROR"] == (
        f"no space left on the disk of {disk} while writing state.json; free space there or give "
        "--run-dir a bigger disk"
    ), done.stdout
    assert json.loads(lines["FILES"]) == [".filler", "state.json"]  # no temp file left
    assert json.loads(lines["STATE"]) == {"v": 1}  # the old file, whole


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
