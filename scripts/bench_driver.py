"""`make bench`'s bookkeeping part: the driver's cost per trial result at 100 and at 2,000 trials.

A study-scale sweep has thousands of trials, and everything the driver does per result (the Tune
callback that turns results into MLflow ops, the trial runs' writes to a real tracking server, the
journal, the progress bar) must cost the same per result whether the sweep has a hundred trials or
thousands: no file rewritten whole per result, no list scanned per result. This feeds the driver's
real callbacks (`MlflowTrialCallback` over `TrialRuns` and a `Journal` in a run dir, `SweepProgress`)
with synthetic Tune trials against a real `mlflow server` on loopback (its own SQL store), then
writes the sweep's trial records (`trials.json`) once, as the driver does at the end, and reports
microseconds per result, the end-of-sweep write included.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

EPOCHS = 3  # results per trial: one per epoch
METRIC = "eval_mrr_at_10"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def tracking_server(work: Path) -> Iterator[str]:
    """A real `mlflow server` on a free loopback port, SQLite store in `work`; stopped at exit."""
    port = _free_port()
    work.mkdir(parents=True, exist_ok=True)
    log = open(work / "mlflow-server.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{(work / 'mlflow.db').resolve()}",
            "--artifacts-destination",
            (work / "artifacts").resolve().as_uri(),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(
                        f"mlflow server did not start: see {work / 'mlflow-server.log'}"
                    ) from None
                time.sleep(0.5)
        yield uri
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)
        log.close()


def _trial(i: int) -> SimpleNamespace:
    """What the callbacks read of a Tune trial."""
    config = {
        "model": "all-MiniLM-L6-v2",
        "dataset": "medquad",
        "epochs": EPOCHS,
        "lr": 2e-5 * (1 + i % 7),
        "batch_size": 32,
        "seed": i,
        "config_hash": f"{i:016x}",
    }
    return SimpleNamespace(
        trial_id=f"t{i:05d}",
        config=config,
        last_result={},
        checkpoint=None,
        metric_analysis={},
        error_file=None,
    )


def _record(trial: SimpleNamespace, run_id: str | None):
    from embedtune.records import EpochPoint, TrialRecord

    history = [EpochPoint(e, {METRIC: 0.5 + 0.01 * e}) for e in range(EPOCHS + 1)]
    cfg = trial.config
    return TrialRecord(
        trial_id=trial.trial_id,
        config_hash=cfg["config_hash"],
        model=cfg["model"],
        model_label=cfg["model"],
        dataset=cfg["dataset"],
        epochs=EPOCHS,
        lr=cfg["lr"],
        batch_size=cfg["batch_size"],
        warmup_ratio=0.1,
        seed=cfg["seed"],
        mlflow_run_id=run_id,
        status="FINISHED",
        duration_s=1.0,
        epochs_done=EPOCHS,
        history=history,
        best_epoch=EPOCHS,
        best_metrics=history[-1].metrics,
    )


def driver_cost(n_trials: int, tracking_uri: str, work: Path) -> dict[str, Any]:
    """Microseconds of driver work per trial result for a sweep of `n_trials` (a fresh experiment)."""
    from embedtune.records import dump_trials
    from embedtune.rundir import TRIALS, RunDir
    from embedtune.sweep.progress import SweepProgress
    from embedtune.tracking import client as mlc
    from embedtune.tracking.callback import MlflowTrialCallback
    from embedtune.tracking.journal import Journal
    from embedtune.tracking.trial_runs import TrialRuns

    rundir = RunDir(work / f"run-{n_trials}")
    rundir.create()
    experiment = mlc.ensure_experiment(tracking_uri, f"bench-driver-{n_trials}-{time.time_ns()}", None)
    parent = mlc.start_parent_run(tracking_uri, experiment, None, f"bench-{n_trials}")
    runs = TrialRuns(tracking_uri, experiment, parent, base_metrics={}, epoch_metric=METRIC, log_models=False)
    callback = MlflowTrialCallback(runs, Journal(rundir))
    progress = SweepProgress(n_trials, METRIC)
    hooks = [callback, progress]
    trials = [_trial(i) for i in range(n_trials)]
    started = time.perf_counter()
    for trial in trials:
        for hook in hooks:
            hook.on_trial_start(0, trials, trial)
        for epoch in range(1, EPOCHS + 1):
            result = {
                "epoch": epoch,
                METRIC: 0.5 + 0.01 * epoch,
                "eval_hit_at_10": 0.9,
                "time_total_s": epoch,
            }
            trial.last_result = result
            for hook in hooks:
                hook.on_trial_result(0, trials, trial, result)
        for hook in hooks:
            hook.on_trial_complete(0, trials, trial)
    progress.on_experiment_end(trials)
    rundir.write_json(TRIALS, dump_trials([_record(t, callback.run_ids.get(t.trial_id)) for t in trials]))
    seconds = time.perf_counter() - started
    if callback.pending:
        raise RuntimeError(f"{len(callback.pending)} op(s) not taken by the tracking server")
    logged = mlc.child_runs(tracking_uri, experiment, parent, "attributes.status = 'FINISHED'")
    if len(logged) != n_trials:  # the bench measures real writes, not skipped ones
        raise RuntimeError(f"{len(logged)} finished trial runs in MLflow, expected {n_trials}")
    n_results = n_trials * EPOCHS
    return {"seconds": seconds, "results": n_results, "us_per_result": seconds / n_results * 1e6}


def bench_driver(work: Path, sizes: tuple[int, int] = (100, 2000)) -> dict[str, Any]:
    """`driver_us_per_result_<n>` for each size and their ratio (the larger over the smaller)."""
    out: dict[str, Any] = {}
    with tracking_server(work / "mlflow") as uri:
        for n in sizes:
            cost = driver_cost(n, uri, work)
            out[f"driver_us_per_result_{n}"] = cost["us_per_result"]
            out[f"driver_seconds_{n}"] = cost["seconds"]
            print(f"[bench] driver: {n} trials, {cost['us_per_result']:.0f} us per result", flush=True)
    small, large = sizes
    out["driver_cost_ratio"] = out[f"driver_us_per_result_{large}"] / out[f"driver_us_per_result_{small}"]
    return out
