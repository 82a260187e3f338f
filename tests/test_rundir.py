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


def _spec_file(tmp_path: Path) -> Path:
    import yaml
    from specs import tiny_spec

    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(tiny_spec("lock")))
    return path


def _held(run: Path, tmp_path: Path):
    """A process holding `run`'s lock (a sweep running into it) and its ready-file."""
    ready = tmp_path / "ready"
    holder = multiprocessing.get_context("spawn").Process(target=_hold, args=(str(run), str(ready)))
    holder.start()
    deadline = time.time() + 60
    while not ready.exists() and time.time() < deadline:
        time.sleep(0.1)
    assert ready.exists()
    return holder


def _guard_rmtree(monkeypatch, *keep: Path) -> None:
    """Make a regression of these tests harmless: removing any of `keep` (or a folder holding one)
    raises instead of deleting (an unguarded `--fresh` once ran shutil.rmtree on whatever it got)."""
    import shutil

    real = shutil.rmtree
    kept = [Path(k).resolve() for k in keep]

    def guarded(path, *args, **kwargs):
        p = Path(path).resolve()
        hit = [k for k in kept if p == k or p in k.parents]
        if hit:
            raise AssertionError(f"test guard: refused to delete {p} (holds {hit[0]})")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", guarded)


def test_a_second_sweep_into_a_run_dir_in_use_gets_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    """`embedtune sweep` takes the run dir's lock before anything else: a second sweep into the dir
    of a running one stops at once, touching nothing (its state, journal, MLflow runs)."""
    from embedtune.cli import main

    run = tmp_path / "run"
    RunDir(run).create()
    RunDir(run).write_json(STATE, {"parent_run_id": "first"})
    _guard_rmtree(monkeypatch, run / STATE)
    holder = _held(run, tmp_path)
    try:
        for extra in ([], ["--fresh"]):  # --fresh must not delete a run dir under a running sweep
            assert main(["sweep", str(_spec_file(tmp_path)), "--run-dir", str(run), *extra]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and f"in use by pid {holder.pid}" in err[0], err
            assert json.loads((run / STATE).read_text()) == {"parent_run_id": "first"}
    finally:
        holder.kill()
        holder.join(10)


@pytest.mark.parametrize("where", ["not-a-run-dir", "home", "checkout", "root", "parent-of-home"])
def test_fresh_deletes_only_an_embedtune_run_dir(where: str, tmp_path: Path, monkeypatch, capsys) -> None:
    from embedtune.cli import main

    home = tmp_path / "home" / "me"
    (home / "thesis").mkdir(parents=True)
    (home / "thesis" / "draft.tex").write_text("years of work")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    (data / "corpus.jsonl").write_text("{}")
    target = {
        "not-a-run-dir": data,
        "home": home,
        "checkout": Path(__file__).resolve().parent.parent,
        "root": Path("/"),
        "parent-of-home": home.parent,
    }[where]
    _guard_rmtree(monkeypatch, target, home / "thesis", data)
    (target / ".embedtune-run").write_text("{}") if where in ("home", "parent-of-home") else None
    assert main(["sweep", str(_spec_file(tmp_path)), "--run-dir", str(target), "--fresh"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--fresh" in err[0], err
    assert (home / "thesis" / "draft.tex").read_text() == "years of work"
    assert (data / "corpus.jsonl").exists() and (Path(__file__)).exists()


def test_fresh_empties_a_run_dir_it_made(tmp_path: Path) -> None:
    rd = RunDir(tmp_path / "run")
    rd.create()
    rd.write_json(STATE, {"a": 1})
    (rd.path / "tune" / "trial").mkdir(parents=True)
    rd.clear_for_fresh()
    assert rd.path.is_dir() and not [p for p in rd.path.iterdir() if p.name != ".lock"]
    RunDir(tmp_path / "never-made").clear_for_fresh()  # nothing there: nothing to do


@pytest.mark.slow
def test_the_lease_on_s3_outlives_an_object_store_outage(tmp_path: Path, monkeypatch, caplog) -> None:
    """A sweep's lease on its S3 run dir while the object store (real SeaweedFS) is down for two
    heartbeats: each failed PUT is logged (naming the lease and the error), the heartbeat goes on,
    and once S3 is back the lease is fresh again and a second sweep is still refused."""
    import logging
    import time

    from servers import SeaweedS3

    from embedtune import rundir as rd
    from embedtune import storage

    s3 = SeaweedS3(tmp_path / "s3")
    s3.start()
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(rd, "LEASE_TTL_S", 6.0)  # a beat every 2 s
    caplog.set_level(logging.WARNING, logger="embedtune.rundir")
    run = rd.RunDir("s3://embedtune/lease-outage", work=tmp_path / "work")
    try:
        with run.lock():
            s3.kill()

            def failed() -> list[str]:
                return [
                    r.getMessage() for r in caplog.records if "could not refresh the lease" in r.getMessage()
                ]

            deadline = time.time() + 90
            while len(failed()) < 2 and time.time() < deadline:  # two beats or more fail
                time.sleep(0.5)
            assert len(failed()) >= 2, failed()
            assert failed()[0].startswith(
                "object store: could not refresh the lease s3://embedtune/lease-outage/lock.json ("
            ), failed()
            s3.start()
            deadline = time.time() + 90
            while time.time() < deadline:  # a beat after the restart: the heartbeat survived the outage
                beat = storage.read_json(run.uri(rd.LEASE))
                if time.time() - beat["beat"] < 3:
                    break
                time.sleep(0.5)
            assert time.time() - beat["beat"] < 3, beat
            with pytest.raises(EmbedtuneError, match="is in use"):
                with rd.RunDir("s3://embedtune/lease-outage", work=tmp_path / "work2").lock():
                    pass
        assert storage.read_json(run.uri(rd.LEASE)) is None
    finally:
        s3.stop()
