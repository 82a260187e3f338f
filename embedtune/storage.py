"""Files on local disk or object storage, written so a reader never sees half a file.

A *location* is a local path or a URI (`s3://bucket/key`, `gs://...`, `file:///...`). Local writes
go to a unique temporary sibling, are fsynced and renamed into place (and the folder fsynced), so
a crash leaves either the old file or the new one. On object storage a single PUT is atomic by
itself. Remote locations go through `pyarrow.fs` (what Ray Tune uses for its storage too), which
takes the endpoint and credentials of S3-compatible stores from the environment (`AWS_ENDPOINT_URL`,
`AWS_ACCESS_KEY_ID`, ...).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from embedtune.errors import EmbedtuneError

log = logging.getLogger(__name__)
T = TypeVar("T")


def is_remote(location: str | Path) -> bool:
    text = str(location)
    return "://" in text and not text.startswith("file://")


def local_path(location: str | Path) -> Path:
    return Path(str(location).removeprefix("file://")).expanduser()


def join(location: str | Path, *parts: str) -> str:
    """`location/part/...` for a path or a URI."""
    if is_remote(location):
        return "/".join([str(location).rstrip("/"), *(p.strip("/") for p in parts)])
    return str(local_path(location).joinpath(*parts))


def _fs(location: str):
    from pyarrow import fs

    return fs.FileSystem.from_uri(location)


# ---------------------------------------------------------------- a full disk


def folder_bytes(path: str | Path) -> int:
    """The bytes of every file under the local folder `path`."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether `exc`, or an exception it came from, says the disk is full: an OSError with ENOSPC,
    or a library's error that carries it in its text (LanceDB / Arrow: "No space left on device
    (os error 28)")."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(exc) or "os error 28" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def full_path(exc: BaseException | None) -> str | None:
    """The file an OSError in `exc`'s chain names, if any."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.filename:
            return str(exc.filename)
        exc = exc.__cause__ or exc.__context__
    return None


def waiting_out_outages(attempt: Callable[[], T], what: str, wait_s: float) -> T:
    """`attempt()`, retried with backoff (2 s doubling to 30 s) while it raises an OSError that an
    object store coming back would cure (pyarrow's S3 errors are OSErrors), for up to `wait_s`
    seconds; a missing file or a full disk is raised at once, as is the last error at the deadline.
    `attempt` must start from a clean state each time (no partial copy from the try before)."""
    deadline, pause = time.monotonic() + wait_s, 2.0
    while True:
        try:
            return attempt()
        except OSError as exc:
            if isinstance(exc, FileNotFoundError) or is_disk_full(exc) or time.monotonic() + pause > deadline:
                raise
            log.warning("%s failed (%s); retrying in %.0f s", what, exc, pause)
            time.sleep(pause)
            pause = min(pause * 2, 30.0)


def disk_full_error(where: str | Path, what: str, fix: str) -> EmbedtuneError:
    """The one line for a disk that filled while writing `what` at `where`."""
    return EmbedtuneError(
        f"no space left on the disk of {where} while writing {what}; free space there or {fix}"
    )


# ---------------------------------------------------------------- local atomic writes


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_local_atomic(path: Path, data: bytes, advice: str = "give --run-dir a bigger disk") -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)  # the old file (if any) stays whole
        if is_disk_full(exc):
            raise disk_full_error(path.parent, path.name, advice) from exc
        raise
    _fsync_dir(path.parent)


# ---------------------------------------------------------------- any location


def write_bytes(location: str | Path, data: bytes) -> None:
    if not is_remote(location):
        write_local_atomic(local_path(location), data)
        return
    fs, path = _fs(str(location))
    with fs.open_output_stream(path) as out:  # one PUT: the object appears whole or not at all
        out.write(data)


def read_bytes(location: str | Path) -> bytes | None:
    """The file's bytes, or None when it does not exist."""
    if not is_remote(location):
        path = local_path(location)
        return path.read_bytes() if path.is_file() else None
    from pyarrow import fs as pafs

    fs, path = _fs(str(location))
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as src:
        return src.read()


def write_json(location: str | Path, obj: Any) -> None:
    write_bytes(location, json.dumps(obj, indent=2, default=str, ensure_ascii=False).encode())


def read_json(location: str | Path, default: Any = None) -> Any:
    raw = read_bytes(location)
    return default if raw is None else json.loads(raw)


def exists(location: str | Path) -> bool:
    if not is_remote(location):
        return local_path(location).exists()
    from pyarrow import fs as pafs

    fs, path = _fs(str(location))
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def delete(location: str | Path) -> None:
    """Remove a file or a folder (recursively); nothing when absent."""
    if not is_remote(location):
        path = local_path(location)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
        return
    from pyarrow import fs as pafs

    fs, path = _fs(str(location))
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif kind == pafs.FileType.File:
        fs.delete_file(path)


def upload_dir(local_dir: Path, location: str) -> None:
    """Make the remote folder `location` hold exactly the files of `local_dir` (each file one PUT;
    remote files not in `local_dir` are removed afterwards)."""
    from pyarrow import fs as pafs

    fs, root = _fs(location)
    wanted = {p.relative_to(local_dir).as_posix(): p for p in Path(local_dir).rglob("*") if p.is_file()}
    for rel, path in wanted.items():
        with fs.open_output_stream(f"{root}/{rel}") as out:
            out.write(path.read_bytes())
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True)):
        rel = info.path[len(root) :].lstrip("/")
        if info.type == pafs.FileType.File and rel not in wanted:
            fs.delete_file(info.path)


def download_dir(location: str, local_dir: Path) -> bool:
    """Copy the remote folder `location` into `local_dir` (replacing it); False when it is absent."""
    from pyarrow import fs as pafs

    fs, root = _fs(location)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    files = [i for i in infos if i.type == pafs.FileType.File]
    if not files:
        return False
    Path(local_dir).parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{Path(local_dir).name}.", dir=Path(local_dir).parent))
    for info in files:
        target = staging / info.path[len(root) :].lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(info.path) as src:
            target.write_bytes(src.read())
    swap_dir(staging, Path(local_dir))
    return True


def swap_dir(new: Path, target: Path) -> None:
    """Put the finished folder `new` in the place of `target` (removing the old one): readers see
    the old folder or the new one, never a mix."""
    target = Path(target)
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    Path(new).rename(target)
    shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(target.parent)


@contextlib.contextmanager
def local_copy(location: str | Path) -> Iterator[Path]:
    """A local folder holding the folder `location`: itself when local, else a temporary download."""
    if not is_remote(location):
        yield local_path(location)
        return
    tmp = Path(tempfile.mkdtemp(prefix="embedtune-download-"))
    try:
        download_dir(str(location), tmp / "copy")
        yield tmp / "copy"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
