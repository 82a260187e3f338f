"""The tracking server's image (cluster/mlflow.Dockerfile): what it adds to the official MLflow image
is cluster/mlflow-requirements.txt, every package pinned at embedtune's versions and by sha256. The
Dockerfile itself is not built here (no Docker engine); its install step is carried out in a fresh
venv instead."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
REQUIREMENTS = REPO / "cluster" / "mlflow-requirements.txt"
LINE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s]+)((?: --hash=sha256:[0-9a-f]{64})+)$")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements() -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes); fails on any line that is not `name==version --hash=sha256:...`."""
    pins: dict[str, tuple[str, list[str]]] = {}
    for n, line in enumerate(REQUIREMENTS.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        match = LINE.match(line)
        assert match, f"mlflow-requirements.txt:{n}: not `name==version --hash=sha256:...`: {line[:80]!r}"
        name = _norm(match.group(1))
        assert name not in pins, f"mlflow-requirements.txt:{n}: {name} twice"
        pins[name] = (match.group(2), re.findall(r"[0-9a-f]{64}", match.group(3)))
    return pins


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.lstrip().startswith("#"):
            name, version = line.split("#")[0].strip().split("==")
            pins[_norm(name)] = version.split(";")[0].strip()
    return pins


def _dockerfile_run() -> list[str]:
    text = re.sub(r"\\\n", " ", (REPO / "cluster" / "mlflow.Dockerfile").read_text())
    runs = [line for line in text.splitlines() if line.startswith("RUN ")]
    assert len(runs) == 1, runs
    return shlex.split(runs[0].removeprefix("RUN "))


def test_every_requirement_is_pinned_by_hash_at_embedtunes_versions() -> None:
    pins = _requirements()
    # the three the server needs, and their dependencies
    assert {"psycopg2-binary", "boto3", "flask-wtf", "botocore", "s3transfer", "wtforms", "flask"} <= set(
        pins
    )
    constraints = _constraints()
    for package in ("psycopg2-binary", "boto3", "flask-wtf"):
        assert package in constraints, package  # embedtune's `cluster` extra pins them
    mismatched = {
        n: (v, constraints[n]) for n, (v, _) in pins.items() if n in constraints and v != constraints[n]
    }
    assert not mismatched, f"mlflow-requirements.txt vs constraints.txt: {mismatched}"
    pyproject = (REPO / "pyproject.toml").read_text()
    for package in ("psycopg2-binary", "boto3", "Flask-WTF"):
        extra = re.search(rf'"{package}==([^"]+)"', pyproject)
        assert extra and extra.group(1) == pins[_norm(package)][0], package
    assert all(len(set(hashes)) == len(hashes) for _, hashes in pins.values())


def test_the_line_format_check_refuses_an_unhashed_or_loose_pin() -> None:
    assert LINE.match("boto3==1.44.8 --hash=sha256:" + "a" * 64)
    assert not LINE.match("boto3==1.44.8")
    assert not LINE.match("boto3>=1.44 --hash=sha256:" + "a" * 64)
    assert not LINE.match("boto3==1.44.8 --hash=sha256:abc")


def test_the_dockerfile_installs_the_requirements_by_hash_on_the_official_image() -> None:
    text = (REPO / "cluster" / "mlflow.Dockerfile").read_text()
    assert re.search(r"^FROM ghcr\.io/mlflow/mlflow:v3\.17\.2$", text, re.M)
    import mlflow

    assert mlflow.__version__ == "3.17.2"  # the image's MLflow is the one embedtune pins
    run = _dockerfile_run()
    install = run[: run.index("&&")]
    assert install[:3] == ["pip", "install", "--no-cache-dir"] and "--require-hashes" in install
    copied = re.search(r"^COPY (\S+) (\S+)$", text, re.M)
    assert copied and copied.group(1) == "cluster/mlflow-requirements.txt"
    assert install[install.index("-r") + 1] == copied.group(2)


@pytest.mark.registry
@pytest.mark.slow
def test_the_requirements_install_by_hash_into_a_fresh_venv(tmp_path: Path) -> None:
    """The Dockerfile's install step, in a fresh venv with pip from PyPI: every hash must match the
    wheel PyPI serves, every dependency must be listed, and the packages must import."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    install = _dockerfile_run()
    install = install[: install.index("&&")]
    install[install.index("-r") + 1] = str(REQUIREMENTS)
    # PyPI itself (not a local mirror or wheel folder of this machine): the hashes are PyPI's files'
    # (--isolated: no PIP_* settings; the environment's CA settings stay, for a TLS-inspecting proxy)
    env = {**os.environ, "PATH": f"{venv / 'bin'}:{os.environ['PATH']}", "PIP_CONFIG_FILE": os.devnull}
    proc = subprocess.run(
        # --no-compile: no bytecode for the installed modules (CPU time; Python compiles what it imports)
        [python, "-m", *install, "--isolated", "--index-url", "https://pypi.org/simple", "--disable-pip-version-check",
         "--no-compile"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    code = "import psycopg2, boto3, flask_wtf, wtforms; print(psycopg2.__version__.split()[0], boto3.__version__)"
    out = subprocess.run(
        [python, "-c", code], capture_output=True, text=True, env=env, check=True
    ).stdout.split()
    pins = _requirements()
    assert out == [pins["psycopg2-binary"][0], pins["boto3"][0]]
