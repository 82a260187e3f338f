"""A real small disk for the full-disk tests: a tmpfs of a few MiB mounted (as root) in a private
mount namespace (`unshare --mount`), so it vanishes with the command and no one else sees it.
Where a container forbids the namespace the test skips with a reason CI allows ("unshare --")."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def on_small_disk(
    mountpoint: Path, size: str, script: str, args: list[str] = (), timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """Run the shell `script` (with `args` as "$@") with a `size` tmpfs mounted at `mountpoint`.
    `fill_to_brim` and `leave_free` are shell functions it can call."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    mount = f"mount -t tmpfs -o size={size} tmpfs {mountpoint}"
    probe = subprocess.run(["unshare", "--mount", "sh", "-c", mount], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"unshare --mount is not allowed here ({probe.stderr.strip()[:100]})")
    helpers = (
        # every free byte taken (dd stops at ENOSPC), then give back `$2` bytes
        f"fill_to_brim() {{ dd if=/dev/zero of={mountpoint}/.filler bs=64k 2>/dev/null; sync; }}\n"
        f'leave_free() {{ fill_to_brim; truncate -s -"$1" {mountpoint}/.filler; }}\n'
    )
    return subprocess.run(
        ["unshare", "--mount", "sh", "-c", f"{mount} && {helpers}{script}", "sh", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
