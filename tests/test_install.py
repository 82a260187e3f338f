"""One install path for every node: the image (cluster/Dockerfile), the `ray up` nodes and `make setup`
all run scripts/install.sh. Here the Dockerfile's own COPY and RUN lines are carried out in a fresh
venv (no Docker needed), and every model every shipped spec names then resolves offline."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from embedtune.specs import load_spec

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent


def _dockerfile_steps() -> list[tuple[str, list[str]]]:
    """(instruction, words) of the Dockerfile's COPY and RUN lines, in order."""
    steps = []
    # Dockerfile logical lines: a trailing backslash continues an instruction on the next line.
    text = re.sub(r"\\\n", " ", (REPO / "cluster" / "Dockerfile").read_text())
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        words = shlex.split(line)
        if words and words[0] in ("COPY", "RUN"):
            steps.append((words[0], [w for w in words[1:] if not w.startswith("--chown")]))
    return steps


def test_the_install_path_is_the_same_everywhere() -> None:
    makefile = (REPO / "Makefile").read_text()
    assert "scripts/install.sh $(PY) dev,cluster --editable" in makefile
    runs = [words for kind, words in _dockerfile_steps() if kind == "RUN"]
    assert runs == [["scripts/install.sh", "python", "cluster"]]
    import yaml

    launcher = yaml.safe_load((REPO / "cluster" / "ray-cluster.yaml").read_text())
    assert any("scripts/install.sh python cluster" in c for c in launcher["setup_commands"])


@pytest.mark.registry
def test_dockerfile_install_in_a_fresh_venv_resolves_every_shipped_model_offline(
    tmp_path: Path, monkeypatch
) -> None:
    # sweeps/cluster-local.yaml has no default tracking server (make cluster-local prints one)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:45678")
    # sweeps/gooaq.yaml and squad.yaml take their bucket from the cluster (no default bucket)
    monkeypatch.setenv("EMBEDTUNE_STORAGE", "s3://site-bucket/sweeps")
    build, venv = tmp_path / "image", tmp_path / "venv"
    build.mkdir()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # PIP_COMPILE=0 (pip's --no-compile): no bytecode written for the ~20,000 installed modules,
    # minutes of CPU on 2 cores; Python compiles what it imports. Nothing checked here depends on it.
    env = {**os.environ, "PATH": f"{venv / 'bin'}:{os.environ['PATH']}", "EMBEDTUNE_HOME": str(tmp_path / "home"),
           "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_COMPILE": "0"}  # fmt: skip
    env.pop("PYTHONPATH", None)
    for kind, words in _dockerfile_steps():
        if kind == "COPY":
            *sources, dest = words
            for src in sources:
                target = build / dest / Path(src).name if dest.endswith("/") else build / dest
                target.parent.mkdir(parents=True, exist_ok=True)
                (shutil.copytree if (REPO / src).is_dir() else shutil.copy)(REPO / src, target)
        else:  # RUN, with the fresh venv's python first on PATH as the image's python
            done = subprocess.run(words, cwd=build, env=env, capture_output=True, text=True, timeout=1800)
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    models = sorted({m for path in (REPO / "sweeps").glob("*.yaml") for m in load_spec(path).models})
    assert {"sentence-transformers/all-mpnet-base-v2", "all-MiniLM-L6-v2"} <= set(models)
    code = (
        "import sys; from embedtune.models import resolve_model\n"
        "for m in sys.argv[1:]: print(m, resolve_model(m))"
    )
    offline = {**env, "EMBEDTUNE_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run([str(venv / "bin" / "python"), "-c", code, *models], cwd=tmp_path, env=offline,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    resolved = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    assert set(resolved) == set(models)
    for path in resolved.values():
        assert Path(path).is_relative_to(tmp_path / "home") and (Path(path) / "modules.json").exists()
    # the package came from the image's copy, not from this checkout
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import embedtune; print(embedtune.__file__)"],
                           cwd=tmp_path, env=offline, capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert str(REPO) not in where
