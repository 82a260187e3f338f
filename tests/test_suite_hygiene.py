"""The test suite's own rules (tests/conftest.py): skips are counted with their reasons at the end,
and in CI (EMBEDTUNE_CI=1) a skip whose reason is not allowed fails the session."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from paths import REPO

DEMO = """
import pytest

def test_runs():
    pass

def test_without_gpu():
    pytest.skip("no GPU on this machine")

def test_without_data():
    pytest.skip("shared data missing")
"""


def _run(tmp_path: Path, ci: str) -> subprocess.CompletedProcess:
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_demo.py").write_text(DEMO)
    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "EMBEDTUNE_CI": ci, "PYTHONPATH": str(repo)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_demo.py"]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_skips_are_counted_and_only_allowed_ones_pass_ci(tmp_path: Path) -> None:
    local = _run(tmp_path, "0")
    assert local.returncode == 0, local.stdout[-2000:]
    assert "2 test(s) skipped" in local.stdout
    assert (
        "1 skipped: no GPU on this machine" in local.stdout
        and "1 skipped: shared data missing" in local.stdout
    )
    ci = _run(tmp_path, "1")
    assert ci.returncode == 1, ci.stdout[-2000:]
    assert "skip not allowed (shared data missing): test_demo.py::test_without_data" in ci.stdout
    assert "no GPU on this machine): " not in ci.stdout  # an allowed reason


PROBE = """
import os, socket, subprocess, sys
server = socket.create_server(("127.0.0.1", 0))
port = server.getsockname()[1]
child = "import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3); print('ok')"
def connect(host, port):
    done = subprocess.run([sys.executable, "-c", child, host, str(port)], capture_output=True, text=True)
    return done.stdout.strip() or done.stderr.strip().splitlines()[-1]
print("inside:", os.environ.get("EMBEDTUNE_NETNS"))
print("loopback:", connect("127.0.0.1", port))
print("off-box:", connect("192.0.2.1", 80))
"""


def test_netns_lets_every_process_reach_loopback_only(tmp_path: Path) -> None:
    """`make test` runs the suite through scripts/netns.sh: a child process (no audit hook there)
    reaches a loopback server, and the kernel refuses it anything off loopback at once."""
    import pytest

    script = Path(__file__).resolve().parent.parent / "scripts" / "netns.sh"
    done = subprocess.run(
        [str(script), sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120
    )
    if "inside: 1" not in done.stdout:
        assert "unshare --net is not allowed here" in done.stderr, done.stderr
        pytest.skip("unshare --net is not allowed here (scripts/netns.sh ran the command without it)")
    assert "loopback: ok" in done.stdout, done.stdout + done.stderr
    assert "off-box: OSError: [Errno 101] Network is unreachable" in done.stdout, done.stdout


def test_every_test_the_docs_name_exists() -> None:
    """The README and docs name the test that shows each behaviour (`test_x.py::test_y`): a test
    renamed or merged must take its mentions along, or a reader looks for a test that is gone."""
    docs = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    named = {m for doc in docs for m in re.findall(r"(test_\w+\.py)::(test_\w+)", doc.read_text())}
    assert len(named) > 20  # the README's fault list alone names more
    missing = [
        f"{module}::{name}"
        for module, name in sorted(named)
        if not (REPO / "tests" / module).exists()
        or not re.search(rf"^def {name}\(", (REPO / "tests" / module).read_text(), re.M)
    ]
    assert not missing, f"named in the docs but not in tests/: {missing}"
