"""The run directory: layout, JSON state written atomically, the report replaced as a whole, and
one sweep at a time per run dir (tests/test_sweep.py runs two real sweeps into one)."""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

import pytest

from embedtune.errors import EmbedtuneError
from embedtune.rundir import JOURNAL, REPORT, STATE, RunDir


def test_layout_of_a_local_run_dir(tmp_path: Path) -> None:
    rd = RunDir(tmp_path / "run")
    assert not rd.remote and rd.path == (tmp_path / "run").resolve() and rd.location == str(rd.path)
    assert rd.default_lancedb == str(rd.path / "lancedb")
    assert rd.sqlite_tracking_uri() == f"sqlite:///{rd.path / 'mlflow.db'}"
    assert rd.tune_storage(None, "x") == rd.location
    assert rd.tune_storage("s3://bucket/sweeps", "gooaq") == "s3://bucket/sweeps/gooaq"
    assert not rd.exists()
    rd.create()
    assert rd.exists() and (rd.path / ".embedtune-run").exists()


def test_remote_run_dir_keeps_a_local_work_folder(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("EMBEDTUNE_HOME", str(tmp_path / "home"))
    rd = RunDir("s3://bucket/sweeps/gooaq/")
    assert rd.remote and rd.location == "s3://bucket/sweeps/gooaq"
    assert rd.uri(STATE) == "s3://bucket/sweeps/gooaq/sweep_state.json"
    assert rd.path.parent == tmp_path / "home" / "runs"
    assert rd.default_lancedb == "s3://bucket/sweeps/gooaq/lancedb"
    with pytest.raises(EmbedtuneError, match="SQLite MLflow store cannot live"):
        rd.sqlite_tracking_uri()


def test_state_round_trips_and_journal_goes_when_empty(tmp_path: Path) -> None:
    rd = RunDir(tmp_path / "run")
    rd.write_json(STATE, {"a": 1})
    assert rd.read_json(STATE) == {"a": 1} and rd.has(STATE)
    rd.write_json(JOURNAL, [{"op": "start"}])
    rd.delete(JOURNAL)
    assert not rd.has(JOURNAL) and rd.read_json(JOURNAL, []) == []
    (rd.path / STATE).write_text("{not json")
    with pytest.raises(EmbedtuneError, match="not valid JSON"):
        rd.read_json(STATE)


def test_report_is_replaced_whole_and_a_failed_build_keeps_the_old(tmp_path: Path) -> None:
    rd = RunDir(tmp_path / "run")
    rd.write_report(lambda d: [(d / "leaderboard.md").write_text("v1"), (d / "old.png").write_text("x")])
    with pytest.raises(RuntimeError):
        rd.write_report(lambda d: [(d / "leaderboard.md").write_text("half"), _raise()])
    assert (rd.report_dir / "leaderboard.md").read_text() == "v1"  # the old report, untouched
    rd.write_report(lambda d: (d / "leaderboard.md").write_text("v2"))
    assert sorted(p.name for p in rd.report_dir.iterdir()) == ["leaderboard.md"]  # no stale plot
    assert sorted(p.name for p in rd.path.iterdir() if p.name.startswith(f".{REPORT}")) == []


def _raise():
    raise RuntimeError("plotting failed")


def _hold(path: str, ready: str) -> None:
    with RunDir(path).lock():
        Path(ready).write_text("locked")
        time.sleep(120)  # until the test kills it


def test_one_sweep_at_a_time_and_a_dead_holder_frees_the_lock(tmp_path: Path) -> None:
    run, ready = tmp_path / "run", tmp_path / "ready"
    holder = multiprocessing.get_context("spawn").Process(target=_hold, args=(str(run), str(ready)))
    holder.start()
    try:
        deadline = time.time() + 60
        while not ready.exists() and time.time() < deadline:
            time.sleep(0.1)
        assert ready.exists()
        with pytest.raises(EmbedtuneError, match=rf"in use by pid {holder.pid}"), RunDir(run).lock():
            pass
        holder.kill()  # SIGKILL: no cleanup; the kernel drops its lock
        holder.join(30)
        with RunDir(run).lock():
            owner = json.loads((run / "lock.json").read_text())
            assert owner["pid"] != holder.pid
    finally:
        if holder.is_alive():
            holder.kill()
            holder.join(5)


def test_a_refused_sweep_leaves_no_folder(tmp_path: Path) -> None:
    run = tmp_path / "new" / "run"
    with pytest.raises(ValueError), RunDir(run).lock():
        raise ValueError("bad spec")
    assert not (tmp_path / "new").exists()
