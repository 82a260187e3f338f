"""Sweeps through real Ray Tune with real MLflow stores (SQLite and a loopback tracking server)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from filelock import FileLock
from mlflow import MlflowClient
from specs import VECTOR_ONLY_FINAL, tiny_spec

from embedtune import ray_env
from embedtune.errors import EmbedtuneError
from embedtune.specs import SweepSpec, parse_spec
from embedtune.sweep import run_sweep
from embedtune.tracking import client as mlc


def _children(client: MlflowClient, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("embedtune.kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("embedtune.kind") == "trial"]
    return parents, children


@pytest.mark.slow
def test_two_by_two_sweep_sqlite(grid_sweep) -> None:
    spec, result, run_dir = grid_sweep.spec, grid_sweep.result, grid_sweep.run_dir
    # The private Ray it started is gone with its temp dir, HOME and the trials' scratch.
    import ray

    assert not ray.is_initialized()
    assert grid_sweep.leftovers_after <= grid_sweep.leftovers_before

    trials = json.loads((run_dir / "trials.json").read_text())
    assert len(trials) == 4 == len(result.trials)
    # a finished trial's process took the next one: four trials, two at a time, in two processes
    pids = {
        json.loads(line)["pid"]
        for path in (run_dir / "tune").glob("*/result.json")
        for line in path.read_text().splitlines()
        if line.strip()
    }
    assert len(pids) == spec.max_concurrent_trials == 2, pids
    assert {(t["model_label"], t["epochs"]) for t in trials} == {
        (m, e) for m in ("all-MiniLM-L6-v2", "paraphrase-MiniLM-L3-v2") for e in (1, 2)
    }
    base = {
        (b["model"], b["dataset"]): b["metrics"]
        for b in json.loads((run_dir / "base_metrics.json").read_text())
    }
    for t in trials:
        assert t["status"] == "FINISHED", t
        assert [h["epoch"] for h in t["history"]] == list(range(t["epochs"] + 1))
        # epoch 0 is the base model's own score on this dataset; the trained epochs moved off it
        zero = t["history"][0]["metrics"]["ir_recall_at_10"]
        assert zero == base[(t["model"], t["dataset"])]["ir_recall_at_10"]
        assert all(h["metrics"] != t["history"][0]["metrics"] for h in t["history"][1:]), t["history"]
        assert t["best_epoch"] in range(1, t["epochs"] + 1)
        best = max(t["history"][1:], key=lambda h: h["metrics"]["ir_recall_at_10"])
        assert t["best_metrics"]["ir_recall_at_10"] == best["metrics"]["ir_recall_at_10"]
        ckpt = Path(t["best_checkpoint"])
        assert (ckpt / "model.safetensors").exists()
        # at most `keep` checkpoints stay per trial
        trial_dir = ckpt.parent.parent
        assert len(list(trial_dir.glob("checkpoint_*"))) <= spec.checkpoints.keep

    client = MlflowClient(result.tracking_uri)
    assert result.tracking_uri.startswith("sqlite:///") and (run_dir / "mlflow.db").exists()
    parents, children = _children(client, spec.experiment)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.params["git_commit"]
    assert any(k.startswith("fingerprint.") for k in parents[0].data.params)
    assert len(children) == 4
    logged = {m.source_run_id: m for m in client.search_logged_models([parents[0].info.experiment_id])}
    by_trial = {c.data.tags[mlc.TRIAL_TAG]: c for c in children}
    for t in trials:
        run = by_trial[t["trial_id"]]
        assert run.data.tags[mlc.PARENT_TAG] == parents[0].info.run_id
        assert run.info.status == "FINISHED"
        assert float(run.data.params["epochs"]) == t["epochs"]
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "ir_recall_at_10")]
        assert sorted(steps) == list(range(t["epochs"] + 1))  # epoch 0 = base model, then every epoch
        # What the scheduler ranks on: each epoch's gain over the trial's own base model, on the
        # headline metric (MRR@10 by default).
        gains = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "ir_mrr_at_10_gain")}
        base_score = t["history"][0]["metrics"]["ir_mrr_at_10"]
        assert sorted(gains) == list(range(1, t["epochs"] + 1))
        for h in t["history"][1:]:
            assert gains[h["epoch"]] == pytest.approx(h["metrics"]["ir_mrr_at_10"] - base_score, abs=1e-6)
        # Every trained epoch's peak host memory (reset per epoch), for sizing trials (README).
        peaks = client.get_metric_history(run.info.run_id, "system/peak_rss_mb")
        assert sorted(m.step for m in peaks) == list(range(1, t["epochs"] + 1))
        assert all(m.value > 50 for m in peaks)
        assert run.data.metrics["trial_duration_s"] > 0
        assert run.data.tags["embedtune.model_uri"].startswith("models:/")
        model = logged[run.info.run_id]  # the trial's model, logged from its last checkpoint
        assert run.data.tags["embedtune.model_uri"] == f"models:/{model.model_id}"
        assert "model.sentence_transformer" in {
            a.path for a in client.list_logged_model_artifacts(model.model_id)
        }


@pytest.mark.slow
def test_sweep_against_a_tracking_server_that_goes_away(
    tmp_path: Path, mlflow_server, capfd, monkeypatch
) -> None:
    """A sweep logs to a loopback tracking server through a URI carrying a password. The server is
    killed mid-training: training goes on, the sweep ends with an error naming the kept records;
    run again with the server back, it replays them (the model artifact too), reruns no trial, and
    every epoch is there. The password reaches no MLflow param or tag, no output, and no file of
    the run dir or the Tune storage (spec.json, sweep_state.json, Tune's pickled callback): it is
    taken from $MLFLOW_TRACKING_PASSWORD at run time, so resuming from the stored spec needs it."""
    monkeypatch.setenv("TUNE_GLOBAL_CHECKPOINT_S", "1")  # results reach the run dir within a second
    uri, artifacts = mlflow_server.uri, mlflow_server.artifacts
    secret = "PLANTED-s3cret-4242"
    uri_with_secret = uri.replace("http://", f"http://embedtune:{secret}@")
    raw = tiny_spec(
        "remote",
        models=["paraphrase-MiniLM-L3-v2"],
        search={"epochs": [3], "batch_size": [16]},
        mlflow={"tracking_uri": uri_with_secret, "experiment": "embedtune-remote-test", "outage_wait_s": 2},
        storage_path=str(tmp_path / "storage"),
    )
    spec = parse_spec(raw)
    run_dir = tmp_path / "run"
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)  # restored after the test

    def kill_server_once_training() -> None:
        deadline = time.time() + 300
        while time.time() < deadline:
            if any(f.stat().st_size for f in tmp_path.glob("storage/remote/tune/*/result.json")):
                mlflow_server.kill()
                return
            time.sleep(0.2)

    watcher = threading.Thread(target=kill_server_once_training, daemon=True)
    watcher.start()
    with pytest.raises(
        EmbedtuneError, match=r"record\(s\) of finished trials are kept in .*mlflow_pending\.json"
    ):
        run_sweep(spec, run_dir, final=False)
    watcher.join(10)
    first = capfd.readouterr()
    assert "training goes on" in first.out
    trials = json.loads((run_dir / "trials.json").read_text())
    assert [t["status"] for t in trials] == ["FINISHED"] and trials[0]["epochs_done"] == 3  # training went on
    kept = json.loads((run_dir / "mlflow_pending.json").read_text())
    assert kept[-1]["op"] == "close" and kept[-1]["checkpoint"]  # the model is among the kept records

    mlflow_server.start()
    # Resume from what the run dir stores: its URI has no password, which comes from the environment.
    stored = SweepSpec.model_validate(json.loads((run_dir / "spec.json").read_text()))
    assert stored.mlflow.tracking_uri == uri.replace("http://", "http://embedtune:***@")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    with pytest.raises(EmbedtuneError, match="set MLFLOW_TRACKING_PASSWORD"):
        run_sweep(stored, run_dir, final=False)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", secret)
    result = run_sweep(stored, run_dir, final=False)
    assert result.resumed and result.tracking_uri == stored.mlflow.tracking_uri
    assert not (run_dir / "mlflow_pending.json").exists()
    assert result.trials[0].duration_s == trials[0]["duration_s"]  # no trial reran
    assert not (run_dir / "mlflow.db").exists()  # nothing went to a local store
    parents, children = _children(MlflowClient(uri), "embedtune-remote-test")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 1 and children[0].info.status == "FINISHED"
    steps = sorted(
        m.step for m in MlflowClient(uri).get_metric_history(children[0].info.run_id, "ir_recall_at_10")
    )
    assert steps == [0, 1, 2, 3]  # nothing lost, nothing twice
    assert any(artifacts.rglob("model.safetensors"))  # the model went through the server's artifact store
    assert "embedtune:***@" in parents[0].data.params["spec"]  # the spec is logged, redacted
    for run in [*parents, *children]:
        assert secret not in json.dumps([run.data.params, run.data.tags])
    second = capfd.readouterr()
    for text in (first.out, first.err, second.out, second.err):
        assert secret not in text
    # at rest: not in any file of the run dir or the Tune storage (pickles included)
    files = [f for root in (run_dir, tmp_path / "storage") for f in root.rglob("*") if f.is_file()]
    assert any(f.name.startswith("experiment_state") for f in files) and (run_dir / "spec.json") in files
    assert [f for f in files if secret.encode() in f.read_bytes()] == []


def _epochs_reported(trial_dir: Path) -> list[int]:
    path = trial_dir / "result.json"
    text = path.read_text() if path.exists() else ""
    return [json.loads(line)["epoch"] for line in text.splitlines() if line.strip()]


def _ray_processes_of(temp_dir: Path) -> list:
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any(str(temp_dir) in part for part in proc.info["cmdline"] or []):
                found.append(proc)
    return found


@pytest.mark.slow
def test_interrupted_and_killed_sweep_resumes_without_duplicates(tmp_path: Path, sweep_command) -> None:
    """SIGTERM to the whole process group (what `timeout` and CI runners send; the CLI treats it as
    Ctrl-C), then SIGKILL of the resumed driver, then the same command once more: finished trials
    are not rerun, the unfinished one continues from its kept checkpoint, MLflow has one run per
    trial with the right status, and the killed driver's Ray leaves nothing behind."""
    raw = tiny_spec(
        "resume",
        models=["paraphrase-MiniLM-L3-v2"],
        max_concurrent_trials=1,
        search={"epochs": [1, 5], "batch_size": [16], "epochs_mode": "separate"},  # two Tune trials
    )
    cmd, run_dir = sweep_command(raw, "resume")
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1"}

    def run_until(name: str, ready, sig: int) -> subprocess.Popen:
        log = open(tmp_path / f"{name}.log", "w")
        # its own process group, as under `timeout`: a group signal reaches Ray's processes too
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            deadline = time.time() + 300
            while time.time() < deadline and proc.poll() is None and not ready():
                time.sleep(0.3)
            assert proc.poll() is None, (tmp_path / f"{name}.log").read_text()[-3000:]
            os.killpg(proc.pid, sig)
            assert proc.wait(timeout=120) != 0
        finally:
            if proc.poll() is None:
                proc.kill()
        return proc

    def long_trial() -> Path | None:
        return next(iter((run_dir / "tune").glob("*epochs=5*")), None)

    def reported(at_least: int):
        """The 5-epoch trial has `at_least` epochs (and their checkpoints) in the storage path.
        Tune copies results there with each snapshot of its experiment state (every second here:
        TUNE_GLOBAL_CHECKPOINT_S), so what is there is what a killed driver's restore sees."""
        return lambda: (t := long_trial()) is not None and len(_epochs_reported(t)) >= at_least

    # 1. SIGTERM once the 5-epoch trial has reported (and checkpointed) its first epoch: handled
    # as Ctrl-C (not by Ray's own handlers, which exit without cleanup and print stack lines).
    first = run_until("first", reported(1), signal.SIGTERM)
    first_log = (tmp_path / "first.log").read_text()
    assert first.returncode == 130, first_log[-3000:]
    assert "embedtune: interrupted" in first_log and "SIGTERM received" not in first_log, first_log[-3000:]
    after_first = len(_epochs_reported(long_trial()))
    assert after_first < 3  # room for two more epochs before the SIGKILL
    state = json.loads((run_dir / "sweep_state.json").read_text())
    assert state["finished"] is False
    client = MlflowClient(state["tracking_uri"])
    parents, children = _children(client, "embedtune-resume")
    assert [p.info.status for p in parents] == ["KILLED"]
    long_run = [c for c in children if c.data.params.get("epochs") == "5"]
    assert [c.info.status for c in long_run] == ["KILLED"]  # the running trial's run is closed
    assert all(c.info.status in ("FINISHED", "KILLED") for c in children)
    assert not (run_dir / "lock.json").exists()  # the lock's owner record is gone ...
    free = FileLock(str(run_dir / ".lock"), timeout=0)
    free.acquire()  # ... and the lock is free (raises Timeout while a process holds it)
    free.release()

    # 2. The same command resumes; SIGKILL it (no cleanup at all) after two more epochs.
    second = run_until("second", reported(after_first + 2), signal.SIGKILL)
    assert second.returncode == -signal.SIGKILL
    assert "resuming sweep" in (tmp_path / "second.log").read_text()
    owned = [
        d
        for d in Path("/tmp").glob("etray-*")
        if (d / ray_env.OWNER_FILE).exists()
        and (d / ray_env.OWNER_FILE).read_text().split()[0] == str(second.pid)
    ]
    assert len(owned) == 1  # the killed driver's local Ray: its processes die with it ...
    deadline = time.time() + 60
    while _ray_processes_of(owned[0]) and time.time() < deadline:
        time.sleep(0.5)
    assert not _ray_processes_of(owned[0])
    kept = sorted(long_trial().glob("checkpoint_*"))
    assert kept and all((c / "model" / "model.safetensors").exists() for c in kept)  # checkpoints intact

    # 3. Once more, as `--resume RUN_DIR` (the spec read from the run dir): it finishes, and removes
    # the killed run's leftovers.
    resume_cmd = [*cmd[: cmd.index("sweep") + 1], "--resume", str(run_dir), "--no-final"]
    third = subprocess.run(resume_cmd, capture_output=True, text=True, timeout=600, env=env)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    assert "resuming sweep" in third.stdout
    # the sweep's last lines: where its time went, then (no final stage here) the MLflow run
    *_, last, tracking = third.stdout.strip().splitlines()
    assert last.startswith("[embedtune] time: ") and ", trials " in last, last
    assert tracking.startswith("[embedtune] MLflow: "), tracking
    assert last.endswith("skipped: final stage (--no-final)"), last
    assert not owned[0].exists()  # ... and its files go at the next start
    trials = json.loads((run_dir / "trials.json").read_text())
    assert [t["status"] for t in trials] == ["FINISHED", "FINISHED"]
    parents, children = _children(client, "embedtune-resume")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)  # one run per trial
    for t in trials:
        (trial_dir,) = (run_dir / "tune").glob(f"*{t['trial_id']}*")
        # the finished trial was not rerun; the unfinished one continued from its checkpoints
        assert _epochs_reported(trial_dir) == list(range(1, t["epochs"] + 1)), t["trial_id"]
        run = next(c for c in children if c.data.tags[mlc.TRIAL_TAG] == t["trial_id"])
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "ir_recall_at_10"))
        assert steps == list(range(t["epochs"] + 1))


@pytest.mark.slow
def test_poisoned_trial_fails_alone_and_failed_final_stage_is_redone(tmp_path: Path, monkeypatch) -> None:
    """One trial's loss really goes NaN (its model's weights poisoned as it loads for training):
    that trial is FAILED in trials.json and MLflow with the reason, the other finishes. With
    max_failures: 2 the diverged trial still runs once (a loss that goes NaN goes NaN again; Tune
    retries infrastructure failures only: tests/test_cluster_local.py's killed worker node). Then
    the final stage fails: the sweep's run is closed FAILED, and the same command redoes only what
    is not done (the failed config is tried again, and fails again) and the final stage ranks the
    rest."""
    import embedtune.final
    from embedtune.train import FAULT_ENV

    monkeypatch.setenv(FAULT_ENV, "all-MiniLM-L6-v2")  # the local Ray's trial processes inherit it
    raw = tiny_spec(
        "finalfail",
        search={"epochs": [1], "batch_size": [16]},
        max_failures=2,
        final=VECTOR_ONLY_FINAL,
    )
    spec = parse_spec(raw)
    real_final = embedtune.final.run_final_stage

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(embedtune.final, "run_final_stage", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        run_sweep(spec, tmp_path / "run")
    client = MlflowClient(f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}")
    parents, children = _children(client, spec.experiment)
    assert [p.info.status for p in parents] == ["FAILED"]
    status = {c.data.params["model"]: c for c in children}
    assert {m: c.info.status for m, c in status.items()} == {
        "all-MiniLM-L6-v2": "FAILED",
        "paraphrase-MiniLM-L3-v2": "FINISHED",
    }
    assert "loss went nan" in status["all-MiniLM-L6-v2"].data.tags["embedtune.error"]
    trials = {t["model"]: t for t in json.loads((tmp_path / "run" / "trials.json").read_text())}
    assert (
        trials["all-MiniLM-L6-v2"]["status"] == "FAILED" and "diverged" in trials["all-MiniLM-L6-v2"]["error"]
    )
    assert trials["all-MiniLM-L6-v2"]["best_checkpoint"] is None
    assert [h["epoch"] for h in trials["all-MiniLM-L6-v2"]["history"]] == [0]
    (state,) = (tmp_path / "run" / "tune").glob("experiment_state*.json")
    failures = {
        json.loads(meta)["trial_id"]: json.loads(runtime)["num_failures"]
        for meta, runtime in json.loads(state.read_text())["trial_data"]
    }
    assert failures == {t["trial_id"]: 0 for t in trials.values()}  # never retried
    poisoned_steps = client.get_metric_history(status["all-MiniLM-L6-v2"].info.run_id, "ir_recall_at_10")
    assert [m.step for m in poisoned_steps] == [0]  # its steps are its epochs: the base model's only
    duration = trials["paraphrase-MiniLM-L3-v2"]["duration_s"]

    monkeypatch.setattr(embedtune.final, "run_final_stage", real_final)
    started = time.perf_counter()
    result = run_sweep(spec, tmp_path / "run")
    wall = time.perf_counter() - started
    assert result.resumed and result.final is not None and result.final.files["leaderboard_md"].exists()
    by_model = {t.model: t for t in result.trials}
    assert by_model["paraphrase-MiniLM-L3-v2"].duration_s == duration  # the finished trial was not rerun
    assert by_model["all-MiniLM-L6-v2"].status == "FAILED"  # tried again: still poisoned
    import pandas as pd

    board = pd.read_csv(result.final.files["leaderboard_csv"])
    tuned = board[board["kind"] == "tuned"]
    assert len(tuned) and set(tuned["model"].str.startswith("paraphrase-MiniLM-L3-v2")) == {True}
    assert set(board[board["kind"] == "base"]["model"]) == {"all-MiniLM-L6-v2", "paraphrase-MiniLM-L3-v2"}
    parents, children = _children(client, spec.experiment)
    assert [p.info.status for p in parents] == ["FINISHED"] and len(children) == 2  # one run per config
    _check_timings(result, parents[0], client, wall, tmp_path)


def _check_timings(result, parent, client: MlflowClient, wall: float, tmp_path: Path) -> None:
    """Where the time went: every stage in meta.json and on the parent run, measured wall time that
    adds up to (most of) the run's total, which is the run's own wall time; the summary says it."""
    from embedtune.clock import time_line

    timings = json.loads(result.final.files["meta"].read_text())["timings"]
    stages, total = timings["stages"], timings["total_s"]
    top = {"preflight", "data", "mining", "base_scores", "tracking", "trials", "final"}
    parts = {"final/cross_encoder", "final/scoring/medquad", "final/epochs", "final/harm", "final/report"}
    assert set(stages) == top | parts | {"final/registry", "final/served"}
    assert all(isinstance(v, float) and v >= 0 for v in stages.values()), stages
    # What did not run says why (0 s); what ran took time. A measure of only part of the run (or of
    # a stage counted twice) fails the sums: the stages cover at least 80% of the total, never more.
    assert timings["skipped"] == {
        "final/cross_encoder": "none trained",
        "final/epochs": "no other epoch count",
        "final/harm": "no final.ood",
        "final/registry": "final.registry off",
    }
    assert all(stages[k] == 0 for k in timings["skipped"])
    assert all(stages[k] > 0 for k in set(stages) - set(timings["skipped"]))
    assert 0.8 * total <= sum(stages[k] for k in top) <= total <= wall
    assert total >= 0.85 * wall  # the total is the run's, not one stage's
    final_parts = sum(v for k, v in stages.items() if k.startswith("final/"))
    assert 0.8 * stages["final"] <= final_parts <= stages["final"]
    assert stages["trials"] > stages["final/report"]  # a trial trained: the slowest stage here
    metrics = client.get_run(parent.info.run_id).data.metrics
    for k, v in stages.items():
        assert metrics[f"time/{k}_s"] == pytest.approx(v), k
    assert metrics["time/total_s"] == pytest.approx(total, abs=5.0)
    assert result.timings["trials_s"] == stages["trials"] and result.timings["final_s"] == stages["final"]
    # The summary's line, at the top of both pages and in the parent run's copy of the report.
    line = f"**Time:** {time_line(timings)}"
    md = result.final.files["leaderboard_md"].read_text().splitlines()
    assert md[md.index("## Summary") + 2] == line
    assert "skipped: cross-encoder (none trained)" in line and "final stage" in line
    html = result.final.files["leaderboard_html"].read_text()
    assert "<p><b>Time:</b> " + time_line(timings) + "</p>" in html
    logged = Path(client.download_artifacts(parent.info.run_id, "report/leaderboard.md", str(tmp_path)))
    assert line in logged.read_text().splitlines()


# ---------------------------------------------------------------- idempotent sweeps


@pytest.mark.slow
def test_grown_grid_runs_only_new_configs_and_rerun_runs_none(tmp_path: Path) -> None:
    from embedtune.errors import EmbedtuneError

    def spec(lrs):
        raw = tiny_spec(
            "grow",
            models=["paraphrase-MiniLM-L3-v2"],
            mlflow={"log_models": False},
            search={"epochs": [1], "batch_size": [16], "lr": lrs},
        )
        return parse_spec(raw)

    run = tmp_path / "run"
    first = run_sweep(spec([5e-5, 1e-4]), run, final=False)
    assert first.launched == 2 and first.experiments == ["tune"]
    before = {t["config_hash"]: t for t in json.loads((run / "trials.json").read_text())}
    assert len(before) == 2

    grown = spec([5e-5, 1e-4, 2e-4])
    second = run_sweep(grown, run, final=False)
    assert second.launched == 1 and second.experiments == ["tune", "tune-2"]
    assert len([p for p in (run / "tune-2").iterdir() if (p / "result.json").exists()]) == 1  # one Tune trial
    trials = json.loads((run / "trials.json").read_text())
    assert len(trials) == 3 == len({t["config_hash"] for t in trials})
    assert sorted(t["lr"] for t in trials) == [5e-5, 1e-4, 2e-4]
    for t in trials:
        assert t["status"] == "FINISHED"
        if t["config_hash"] in before:
            assert t == before[t["config_hash"]]  # the earlier records are untouched
    client = MlflowClient(second.tracking_uri)
    parents, children = _children(client, grown.experiment)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(c.data.tags[mlc.CONFIG_TAG] for c in children) == sorted(t["config_hash"] for t in trials)
    assert {c.info.run_id for c in children} == {t["mlflow_run_id"] for t in trials}

    third = run_sweep(grown, run, final=False)  # the same grown spec again: nothing to run
    assert third.launched == 0 and third.experiments == ["tune", "tune-2"]
    assert third.clock.skipped == {"trials": "all done before", "final": "--no-final"}
    assert third.timings["trials_s"] == 0 == third.timings["final_s"] and third.timings["data_s"] > 0
    assert "skipped: trials (all done before), final stage (--no-final)" in third.clock.line()
    assert not (run / "tune-3").exists()
    assert json.loads((run / "trials.json").read_text()) == trials
    assert len(_children(client, grown.experiment)[1]) == 3

    # anything but growth (here a train setting) is another sweep
    other = spec([5e-5]).model_copy(update={"train": grown.train.model_copy(update={"max_seq_length": 64})})
    with pytest.raises(EmbedtuneError, match="train changed"):
        run_sweep(other, run, final=False)


@pytest.mark.slow
def test_sampled_sweep_counts_done_trials_and_skips_done_draws(tmp_path: Path) -> None:
    """Random mode cannot list its configs: a rerun with more samples draws only the difference,
    and a draw of an already done config returns without training (no record, no MLflow run)."""

    def spec(n):
        raw = tiny_spec(
            "sampled",
            models=["paraphrase-MiniLM-L3-v2"],
            mlflow={"log_models": False},
            search={"mode": "random", "num_samples": n, "epochs": [1], "batch_size": [16], "lr": [5e-5]},
        )
        return parse_spec(raw)

    run = tmp_path / "run"
    first = run_sweep(spec(1), run, final=False)
    assert first.launched == 1 and len(first.trials) == 1
    again = run_sweep(spec(1), run, final=False)
    assert again.launched == 0 and again.experiments == ["tune"]
    more = run_sweep(spec(2), run, final=False)  # one more draw: the only config there is, already done
    assert more.experiments == ["tune", "tune-2"] and more.launched == 0
    assert more.trials == first.trials
    _, children = _children(MlflowClient(first.tracking_uri), "embedtune-sampled")
    assert len(children) == 1 and children[0].data.tags[mlc.CONFIG_TAG] == first.trials[0].config_hash


@pytest.mark.slow
def test_branch_sweep_records_each_epoch_count_from_one_run_and_rerun_runs_none(tmp_path: Path) -> None:
    """search.epochs_mode: branch (the default): epochs [1, 2] are ONE Tune trial trained to 2 epochs,
    checkpointed at both; trials.json holds one record per epoch count, each with its own checkpoint
    (kept although checkpoints.keep is 1) and its metrics at exactly that count; MLflow holds one
    run with a step per epoch; the same command again runs nothing."""
    raw = tiny_spec(
        "branch", models=["paraphrase-MiniLM-L3-v2"], search={"epochs": [1, 2], "batch_size": [16]}
    )
    spec = parse_spec(raw)
    assert spec.search.epochs_mode == "branch" and spec.checkpoints.keep == 1
    run = tmp_path / "run"
    first = run_sweep(spec, run, final=False)
    assert first.launched == 1
    trials = sorted(json.loads((run / "trials.json").read_text()), key=lambda t: t["epochs"])
    assert [(t["epochs"], t["status"], t["best_epoch"], t["epochs_done"]) for t in trials] == [
        (1, "FINISHED", 1, 1),
        (2, "FINISHED", 2, 2),
    ]
    one, two = trials
    assert (
        one["tune_trial_id"] == two["tune_trial_id"] == two["trial_id"] == one["trial_id"].removesuffix("-e1")
    )
    assert one["config_hash"] != two["config_hash"] and {t["lr_schedule"] for t in trials} == {
        "constant_with_warmup"
    }
    assert [h["epoch"] for h in one["history"]] == [0, 1] and [h["epoch"] for h in two["history"]] == [
        0,
        1,
        2,
    ]
    assert one["history"][1] == two["history"][1]  # the same run's epoch 1
    assert (
        one["best_metrics"] == one["history"][1]["metrics"]
        and two["best_metrics"] == two["history"][2]["metrics"]
    )
    assert 0 < one["duration_s"] < two["duration_s"]
    weights = [Path(t["best_checkpoint"]) / "model.safetensors" for t in trials]
    assert weights[0].parent != weights[1].parent and all(w.exists() for w in weights)
    assert weights[0].read_bytes() != weights[1].read_bytes()
    (trial_dir,) = [p for p in (run / "tune").iterdir() if (p / "result.json").exists()]
    assert sorted(p.name for p in trial_dir.glob("checkpoint_*")) == [
        Path(t["best_checkpoint"]).parent.name for t in trials
    ]

    client = MlflowClient(first.tracking_uri)
    _, children = _children(client, spec.experiment)
    assert len(children) == 1 and {t["mlflow_run_id"] for t in trials} == {children[0].info.run_id}
    run_data = children[0].data
    assert (
        run_data.params["branch_epochs"] == "1,2" and run_data.params["lr_schedule"] == "constant_with_warmup"
    )
    steps = client.get_metric_history(children[0].info.run_id, "ir_recall_at_10")
    assert {m.step: m.value for m in steps} == {
        h["epoch"]: h["metrics"]["ir_recall_at_10"] for h in two["history"]
    }

    again = run_sweep(spec, run, final=False)  # both epoch counts are done: nothing runs
    assert again.launched == 0 and again.experiments == ["tune"]
    assert sorted(json.loads((run / "trials.json").read_text()), key=lambda t: t["epochs"]) == trials


@pytest.mark.slow
def test_a_damaged_checkpoint_met_on_resume_fails_its_trial_in_one_line(
    tmp_path: Path, sweep_command
) -> None:
    """A sweep stopped mid-trial (SIGTERM) whose kept checkpoint is then truncated (a partial copy):
    the resumed trial ends FAILED at once, not retried (max_failures: 2), with one line naming the
    checkpoint in trials.json and MLflow and no traceback; the same command once more trains that
    config from the start."""
    raw = tiny_spec(
        "damaged",
        models=["paraphrase-MiniLM-L3-v2"],
        search={"epochs": [2], "batch_size": [16], "epochs_mode": "separate"},
        max_failures=2,
    )
    cmd, run_dir = sweep_command(raw, "damaged")
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and first.poll() is None:
            trial = next(iter((run_dir / "tune").glob("*epochs=2*")), None)
            if (
                trial is not None
                and _epochs_reported(trial)
                and list(trial.glob("checkpoint_*/model/*.safetensors"))
            ):
                break
            time.sleep(0.3)
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=120) == 130, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
    # checkpoints.keep: 1, but a SIGTERM between a checkpoint's save and the old one's deletion
    # leaves two: damage each, so whichever Tune restores from is damaged
    ckpts = sorted(trial.glob("checkpoint_*"))
    assert ckpts
    for ckpt in ckpts:
        weights = ckpt / "model" / "model.safetensors"
        with weights.open("r+b") as f:
            f.truncate(weights.stat().st_size // 3)

    second = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    out = second.stdout + second.stderr
    assert "resuming sweep" in out and "Traceback" not in out, out[-3000:]
    (record,) = json.loads((run_dir / "trials.json").read_text())
    assert record["status"] == "FAILED", record
    assert any(
        record["error"].startswith(f"checkpoint {ckpt} is damaged (model.safetensors is ") for ckpt in ckpts
    ), record["error"]
    assert "\n" not in record["error"]
    # the resumed session's experiment state (one file per session): the trial was never retried
    state = max((run_dir / "tune").glob("experiment_state*.json"), key=lambda p: p.stat().st_mtime)
    (saved,) = json.loads(state.read_text())["trial_data"]
    assert json.loads(saved[1])["num_failures"] == 0  # ended by embedtune, not retried by Tune
    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    _, (child,) = _children(client, "embedtune-damaged")
    assert record["error"].endswith("rerun the same command to train this config from the start")  # whole
    assert child.info.status == "FAILED" and child.data.tags["embedtune.error"] == record["error"]

    third = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    (record,) = json.loads((run_dir / "trials.json").read_text())
    assert record["status"] == "FINISHED" and [h["epoch"] for h in record["history"]] == [0, 1, 2]
    (rerun,) = (run_dir / "tune-2").glob("*epochs=2*")
    assert _epochs_reported(rerun) == [1, 2]  # from the start, not from the damaged checkpoint
