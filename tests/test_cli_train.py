"""`embedtune train` through the real command line: bad input fails fast with one clear line and
exit code 2, leaving nothing in --out; a real run prints per-epoch metrics and writes a loadable
model. Also the offline hygiene the CLI and the test suite rely on."""

from __future__ import annotations

import gzip
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from embedtune import env

# Runs the CLI and reports whether torch got imported (i.e. whether a model could have been loaded).
_PROBE = (
    "import sys; from embedtune.cli import main; rc = main(sys.argv[1:]); "
    "print('TORCH_IMPORTED' if 'torch' in sys.modules else 'TORCH_NOT_IMPORTED'); sys.exit(rc)"
)


def _cli(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _PROBE, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=os.environ.copy(),
    )


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory) -> dict[str, tuple[list[str], str]]:
    """name -> (extra CLI args, text the one error line must contain)."""
    d = tmp_path_factory.mktemp("bad-inputs")
    sample = [
        json.loads(line)
        for line in gzip.open(Path(env.__file__).parent / "samples" / "medquad_sample.jsonl.gz", "rt")
    ]
    good = _write_jsonl(d / "good.jsonl", [{"q": r["question"], "a": r["answer"]} for r in sample[:40]])
    (d / "empty.jsonl").write_text("")
    (d / "latin1.csv").write_bytes("question,answer\ncaf\xe9 au lait?,a drink\n".encode("latin-1"))
    (d / "garbage.parquet").write_bytes(os.urandom(256))
    tiny = _write_jsonl(
        d / "tiny.jsonl", [{"question": f"question {i}?", "answer": f"answer {i}"} for i in range(4)]
    )
    return {
        "missing column": (["--data", str(good)], "column 'question', 'answer' not found"),
        "misspelled column": (
            ["--data", str(good), "--question-column", "q", "--answer-column", "aa"],
            "did you mean 'a'",
        ),
        "misspelled column in data settings": (
            [f"--data={good}?question_column=qq&answer_column=a"],
            "column 'qq'",
        ),
        "empty file": (["--data", str(d / "empty.jsonl")], "has no rows"),
        "file not found": (["--data", str(d / "nope.jsonl")], "data file not found"),
        "unknown sample name": (["--data", "medquad-sampel"], "data file not found"),
        "unknown model": (
            ["--data", "medquad-sample", "--model", "all-MiniLM-L6-v3"],
            "unknown model 'all-MiniLM-L6-v3'",
        ),
        "model path missing": (
            ["--data", "medquad-sample", "--model", str(d / "no-model")],
            "does not exist",
        ),
        "model path not a model": (
            ["--data", "medquad-sample", "--model", str(d)],
            "not a sentence-transformers model",
        ),
        "unknown miner": (["--data", "medquad-sample", "--miner", "MiniLM"], "unknown model 'MiniLM'"),
        "non-UTF-8 data": (["--data", str(d / "latin1.csv")], "not UTF-8"),
        "unreadable data": (["--data", str(d / "garbage.parquet")], "cannot read"),
        "max seq length above the model's limit": (
            ["--data", "medquad-sample", "--max-seq-length", "1024"],
            "--max-seq-length: 1024 is above the position limit of model 'all-MiniLM-L6-v2' (512 tokens",
        ),
        "epochs < 1": (["--data", "medquad-sample", "--epochs", "0"], "--epochs"),
        "batch size < 2": (["--data", "medquad-sample", "--batch-size", "1"], "--batch-size"),
        "bad eval size": (["--data", "medquad-sample", "--eval-size", "0"], "eval_size"),
        "too small for the split": (
            ["--data", str(tiny), "--eval-size", "4"],
            "too small for the split asked",
        ),
        "too small, whole sample": (
            ["--data", "medquad-sample", "--eval-size", "5000"],
            "too small for the split asked",
        ),
    }


BAD = [
    "missing column",
    "misspelled column",
    "misspelled column in data settings",
    "empty file",
    "file not found",
    "unknown sample name",
    "unknown model",
    "model path missing",
    "model path not a model",
    "unknown miner",
    "non-UTF-8 data",
    "unreadable data",
    "max seq length above the model's limit",
    "epochs < 1",
    "batch size < 2",
    "bad eval size",
    "too small for the split",
    "too small, whole sample",
]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_fails_fast_with_one_line(case, bad_inputs, tmp_path):
    args, expected = bad_inputs[case]
    out = tmp_path / "out"
    started = time.time()
    proc = _cli("--offline", "train", *args, "--out", str(out))
    elapsed = time.time() - started
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("embedtune: error: ") and expected in lines[0], lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "TORCH_NOT_IMPORTED" in proc.stdout  # failed before any model was loaded
    assert elapsed < 60
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_unreadable_file_permissions(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads files whatever their permissions")
    path = _write_jsonl(tmp_path / "locked.jsonl", [{"question": "q", "answer": "a"}])
    path.chmod(0)
    proc = _cli("train", "--data", str(path), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and "Permission denied" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_out_must_be_new_or_empty(tmp_path):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    proc = _cli("train", "--data", "medquad-sample", "--out", str(occupied))
    assert proc.returncode == 2 and "--out" in proc.stderr and "--overwrite" in proc.stderr
    assert (occupied / "keep.txt").read_text() == "mine"
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    proc = _cli("train", "--data", "medquad-sample", "--out", str(a_file))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"embedtune: error: --out {a_file} is a file, not a directory; pick a new directory"
    ]


@pytest.mark.parametrize("where", ["user-folder", "dot-dot", "home", "checkout"])
def test_overwrite_replaces_only_what_train_wrote(where, tmp_path, monkeypatch, capsys):
    """`--out X --overwrite` deletes X before writing the model: refused, in one line and before any
    data work, for a folder `embedtune train` did not write (no marker) and, marker or not, for
    `/`, $HOME, the checkout, the working directory and their parents (`--out ..`)."""
    from embedtune.cli import main
    from embedtune.rundir import TRAIN_MARKER

    home = tmp_path / "home" / "me"
    projects = home / "projects"
    (projects / "thesis").mkdir(parents=True)
    (projects / "thesis" / "draft.tex").write_text("years of work")
    monkeypatch.setenv("HOME", str(home))
    work = projects / "work"
    work.mkdir()
    monkeypatch.chdir(work if where == "dot-dot" else tmp_path)
    target, said = {
        "user-folder": (projects, f"no {TRAIN_MARKER} in it"),
        "dot-dot": (Path(".."), "it is the working directory or holds it"),
        "home": (home, "it is $HOME"),
        "checkout": (Path(__file__).resolve().parent.parent, "it is the embedtune checkout"),
    }[where]
    if where in ("dot-dot", "home"):  # even a folder marked as train output is kept when it is one of these
        (target / TRAIN_MARKER).write_text("planted")
    assert main(["train", "--data", "medquad-sample", "--out", str(target), "--overwrite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("embedtune: error: --overwrite: ") and said in err[0], err
    assert (projects / "thesis" / "draft.tex").read_text() == "years of work" and Path(__file__).exists()


def test_overwrite_passes_a_folder_train_wrote(tmp_path, capsys):
    """The guard lets through what `embedtune train` wrote (the next check, an unknown model, stops
    this run before anything is deleted or trained)."""
    from embedtune.cli import main
    from embedtune.rundir import TRAIN_MARKER

    earlier = tmp_path / "tuned"
    earlier.mkdir()
    (earlier / TRAIN_MARKER).write_text("written by embedtune train")
    (earlier / "metrics.json").write_text("{}")
    args = ["train", "--model", "no-such-model-xyz", "--data", "medquad-sample", "--out", str(earlier)]
    assert main([*args, "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" not in err and "no-such-model-xyz" in err, err
    assert (earlier / "metrics.json").read_text() == "{}"


def test_usage_errors_exit_2():
    proc = _cli("train", "--out", "x")  # --data missing: argparse's own usage error
    assert proc.returncode == 2 and "--data" in proc.stderr
    proc = _cli("train", "--data", "medquad-sample", "--out", "x", "--epochs", "one")
    assert proc.returncode == 2 and "--epochs" in proc.stderr


@pytest.mark.slow
def test_cli_train_end_to_end(tmp_path):
    out = tmp_path / "tuned"
    args = [
        "-m",
        "embedtune.cli",
        "--offline",
        "train",
        "--model",
        "all-MiniLM-L6-v2",
        "--data",
        "medquad-sample",
        "--max-pairs",
        "200",
        "--eval-size",
        "30",
        "--max-train-pairs",
        "64",
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--max-seq-length",
        "64",
        "--out",
        str(out),
        "--json",
    ]
    env_vars = {**os.environ, "EMBEDTUNE_HOME": os.environ["EMBEDTUNE_HOME"]}
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600, env=env_vars)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert any(line.startswith("[embedtune] data medquad-sample") for line in lines)
    assert any(line.startswith("[embedtune] hard negatives") for line in lines)
    epoch_lines = [line for line in lines if line.startswith("[embedtune]") and "recall_at_10=" in line]
    assert len(epoch_lines) == 2 and "base" in epoch_lines[0] and "epoch 1" in epoch_lines[1], epoch_lines
    assert "train_loss=" in epoch_lines[1] and "triplet_accuracy=" in epoch_lines[1]
    assert any(line.startswith(f"[embedtune] wrote {out}") for line in lines)
    result = json.loads(lines[-1])
    assert [h["epoch"] for h in result["history"]] == [0, 1]

    assert json.loads((out / "metrics.json").read_text())["history"] == result["history"]
    from sentence_transformers import SentenceTransformer

    emb = SentenceTransformer(str(out), device="cpu").encode(["What are the symptoms of asthma ?"])
    assert emb.shape == (1, 384)


# ------------------------------------------------------------------ offline hygiene


def test_socket_audit_hook_blocks_off_loopback_connections():
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(1)
    try:
        with pytest.raises(AssertionError, match="off loopback"):
            sock.connect(("10.255.255.1", 9))
    finally:
        sock.close()


def test_loopback_connections_stay_allowed():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        client.connect(server.getsockname())
    finally:
        client.close()
        server.close()


def test_env_apply_offline_sets_the_hub_and_telemetry_variables(monkeypatch):
    names = [
        "HF_HUB_OFFLINE",
        "HF_DATASETS_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "MLFLOW_DISABLE_TELEMETRY",
        "EMBEDTUNE_OFFLINE",
    ]
    for name in names:
        monkeypatch.delenv(name, raising=False)
    env.apply(offline=False)
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert "HF_HUB_OFFLINE" not in os.environ
    wanted = env.apply(offline=True)
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        assert os.environ[name] == "1" == wanted[name]
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert os.environ["EMBEDTUNE_OFFLINE"] == "1"
    assert os.environ["RAY_USAGE_STATS_ENABLED"] == "0" and os.environ["TOKENIZERS_PARALLELISM"] == "false"


def test_env_apply_reads_embedtune_offline(monkeypatch):
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("EMBEDTUNE_OFFLINE", "true")
    env.apply()
    assert (
        os.environ["HF_HUB_OFFLINE"]
        == os.environ["HF_DATASETS_OFFLINE"]
        == os.environ["TRANSFORMERS_OFFLINE"]
        == "1"
    )


def test_cli_offline_flag_sets_the_variables_in_its_process(tmp_path):
    code = (
        "import os, sys; from embedtune.cli import main; rc = main(sys.argv[1:]); "
        "print([os.environ.get(k) for k in ('HF_HUB_OFFLINE', 'HF_DATASETS_OFFLINE', 'TRANSFORMERS_OFFLINE', "
        "'MLFLOW_DISABLE_TELEMETRY')])"
    )
    clean = {
        k: v for k, v in os.environ.items() if not k.endswith("OFFLINE") and k != "MLFLOW_DISABLE_TELEMETRY"
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "--offline",
            "train",
            "--data",
            str(tmp_path / "x.jsonl"),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        env=clean,
        timeout=120,
    )
    assert "['1', '1', '1', 'true']" in proc.stdout, proc.stdout + proc.stderr
