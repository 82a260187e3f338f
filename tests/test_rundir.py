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


def test_typed_state_round_trips(tmp_path: Path, small_data) -> None:
    """The run dir's typed accessors: what is saved comes back as the same typed value, absent
    state is empty/None, and a stored spec that does not validate is one line naming the file."""
    from specs import tiny_spec

    from embedtune.records import EpochPoint, TrialRecord
    from embedtune.rundir import SPEC, TRIALS
    from embedtune.specs import SweepSpec

    rd = RunDir(tmp_path / "run")
    assert rd.trials() == [] and rd.spec() is None and rd.data(small_data.label) is None
    record = TrialRecord(
        trial_id="t1", config_hash="h1", model="m", model_label="m", dataset="d", epochs=2, lr=1e-4,
        batch_size=16, warmup_ratio=0.1, seed=1, status="FINISHED", history=[EpochPoint(0, {"ir_mrr_at_10": 0.5}), EpochPoint(1, {"ir_mrr_at_10": 0.6})],
    )  # fmt: skip
    rd.save_trials([record])
    assert rd.trials() == [record] and json.loads((rd.path / TRIALS).read_text())[0]["trial_id"] == "t1"
    spec = SweepSpec.model_validate(tiny_spec("typed"))
    rd.save_spec(spec)
    assert rd.spec() == spec
    rd.save_data(small_data)
    assert Path(rd.data_file(small_data.label)).is_file() and rd.data(small_data.label) == small_data
    (rd.path / SPEC).write_text(json.dumps({**tiny_spec("typed"), "models": []}))
    with pytest.raises(EmbedtuneError, match=r"spec.json: models: "):
        rd.spec()


def test_typed_report_store_and_stored_inputs(tmp_path: Path) -> None:
    """The report's stored inputs and the spec's parts read through RunDir: absent ones are empty or
    one line naming the file; what the report store wrote comes back typed; a stored dataset entry
    that no longer validates is skipped, the others still served."""
    import pandas as pd
    from specs import tiny_spec

    from embedtune import report_store as store
    from embedtune.records import HarmCheck
    from embedtune.rundir import SPEC

    rd = RunDir(tmp_path / "run")
    assert rd.report_meta() == {} and rd.probe_cache() == {} and rd.harm() == HarmCheck()
    assert rd.base_metrics() == {} and rd.dataset_specs() == {} and rd.lancedb_uri() is None
    with pytest.raises(EmbedtuneError, match=r"report/results\.csv is missing"):
        rd.results()

    metrics = {("m", "d", "fp1"): {"ir_mrr_at_10": 0.5}, ("m", "e", "fp2"): {"ir_mrr_at_10": 0.25}}
    rd.save_base_metrics(metrics)
    assert rd.base_metrics() == metrics

    rows = pd.DataFrame(
        [{"dataset": "d", "model": "m", "query_type": "vector", "reranker": "none", "trial_id": "t1",
          "mrr_at_10": 0.5, "per_query": {"mrr_at_10": [1.0, 0.0]}}]
    )  # fmt: skip
    store.save_results(rd.report_dir, rows)
    store.write_json(rd.report_dir / store.META_FILE, {"metric": "mrr_at_10", "probe_size": 50})
    back = rd.results()
    assert back.loc[0, "trial_id"] == "t1" and list(back.loc[0, "per_query"]["mrr_at_10"]) == [1.0, 0.0]
    assert rd.report_meta() == {"metric": "mrr_at_10", "probe_size": 50}

    raw = tiny_spec("typed")
    raw["datasets"] = [*raw["datasets"], {"name": "broken", "source": "x.jsonl", "eval_size": "many"}]
    raw["final"] = {**raw.get("final", {}), "lancedb_uri": "s3://bucket/lance"}
    (rd.path / SPEC).write_text(json.dumps(raw))
    assert sorted(rd.dataset_specs()) == sorted(d["name"] for d in tiny_spec("typed")["datasets"])
    assert rd.lancedb_uri() == "s3://bucket/lance"


def _stored_sweep(tmp_path: Path, **edit) -> Path:
    """A run dir as a sweep leaves it (spec.json, sweep_state.json), its spec edited by `edit`."""
    from specs import tiny_spec

    from embedtune.specs import parse_spec

    run = tmp_path / "run"
    rd = RunDir(run)
    rd.create()
    raw = parse_spec(tiny_spec("stored")).model_dump(mode="json")
    for path, value in edit.items():
        *parents, key = path.split("__")
        node = raw
        for part in parents:
            node = node[part]
        node[key] = value
    rd.write_json("spec.json", raw)
    rd.write_json(STATE, {"spec_hash": "x", "parent_run_id": "p"})
    return run


@pytest.mark.parametrize(
    ("edit", "names"),
    [
        ({"search__epochs": [0]}, "search.epochs: Value error, epochs must be a non-empty list"),
        ({"train__old_setting": True}, "train.old_setting: unknown key"),  # a spec.json of another version
    ],
)
def test_resume_with_a_bad_stored_spec_is_one_line(edit, names, tmp_path: Path, capsys) -> None:
    from embedtune.cli import main

    run = _stored_sweep(tmp_path, **edit)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert main(["sweep", "--resume", str(run), "--no-final"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{run / 'spec.json'}: {names}" in err[0], err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".lock"} == {
        k: v for k, v in before.items() if k != ".lock"
    }


def test_resume_with_fresh_is_refused_and_deletes_nothing(tmp_path: Path, capsys) -> None:
    from embedtune.cli import main

    run = _stored_sweep(tmp_path)
    before = sorted(p.name for p in run.iterdir())
    assert main(["sweep", "--resume", str(run), "--fresh", "--no-final"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--resume and --fresh contradict each other" in err[0], err
    assert sorted(p.name for p in run.iterdir()) == before and (run / "spec.json").exists()
