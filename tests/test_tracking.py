"""MLflow tracking: secrets kept out, the fluent URI restored, and the trial callback's child runs
(status, one run per trial and per config, records kept through a server outage and replayed)."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow import MlflowClient
from mlflow.entities import ViewType
from servers import MlflowServer

from embedtune.records import ModelData
from embedtune.rundir import JOURNAL, RunDir
from embedtune.tracking import client as mlc
from embedtune.tracking.callback import MlflowTrialCallback, _error_line
from embedtune.tracking.journal import Journal
from embedtune.tracking.trial_runs import TrialRuns


def _children(client: MlflowClient, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    return [r for r in runs if r.data.tags.get(mlc.KIND_TAG) == "trial"]


def _store(tmp_path: Path, name: str, uri: str | None = None):
    uri = uri or f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = mlc.ensure_experiment(uri, name, tmp_path / "art")
    return uri, exp, mlc.start_parent_run(uri, exp, None, "p")


def _callback(uri, exp, parent, base=None, skip=(), rundir=None, retry_every_s=10.0, log_models=False):
    runs = TrialRuns(uri, exp, parent, base or {}, "ir_recall_at_10", log_models=log_models)
    return MlflowTrialCallback(runs, Journal(rundir), skip, retry_every_s)


def _trial(tid: str, epochs: int, done: int, **config):
    return SimpleNamespace(
        trial_id=tid,
        config={"model": "m", "dataset": "d", "epochs": epochs, "lr": 1e-5, **config},
        last_result={"epoch": done, "time_total_s": 3.0},
        checkpoint=None,
        error_file=None,
    )


def test_fluent_uri_leaves_no_tracking_uri_behind(tmp_path: Path, monkeypatch) -> None:
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI, which a later sweep (or a child
    process) would take as its store."""
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'a.db'}"
    with mlc.fluent_uri(uri, registry=True):
        assert mlflow.get_tracking_uri() == uri and os.environ["MLFLOW_TRACKING_URI"] == uri
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    with mlc.fluent_uri(uri):
        pass
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:1"


def test_callback_marks_scheduler_stops_killed_and_errors_failed(tmp_path: Path) -> None:
    """The driver-side callback's status logic on a real SQLite store (fake trial objects)."""
    uri, exp, parent = _store(tmp_path, "cb")
    cb = _callback(uri, exp, parent, {ModelData("m", "d"): {"ir_recall_at_10": 0.5}})
    stopped, finished, crashed = _trial("a", 3, 1), _trial("b", 2, 2), _trial("c", 2, 1)
    for t in (stopped, finished, crashed):
        cb.on_trial_start(0, [], t)
        cb.on_trial_result(0, [], t, {"epoch": 1, "ir_recall_at_10": 0.6, "training_iteration": 1})
    cb.on_trial_complete(0, [], stopped)
    cb.on_trial_complete(0, [], finished)
    cb.on_trial_error(0, [], crashed)
    client = MlflowClient(uri)
    runs = [r for r in client.search_runs([exp]) if mlc.TRIAL_TAG in r.data.tags]
    status = {r.data.tags[mlc.TRIAL_TAG]: r.info.status for r in runs}
    assert status == {"a": "KILLED", "b": "FINISHED", "c": "FAILED"}
    history = client.get_metric_history(cb.run_ids["a"], "ir_recall_at_10")
    assert sorted((m.step, m.value) for m in history) == [(0, 0.5), (1, 0.6)]  # base model = step 0
    # a resumed driver reuses the run of a trial instead of opening a second one
    cb2 = _callback(uri, exp, parent)
    assert cb2.runs.run_id("a", stopped.config) == cb.run_ids["a"]
    assert len(client.search_runs([exp])) == 4  # the parent + one run per trial


def test_callback_keeps_records_through_a_server_outage_and_replays_them(
    tmp_path: Path, mlflow_server, capsys
) -> None:
    """The tracking server dies between two epochs of a trial: the callback keeps the records (in
    memory and in its journal), says so once, and replays them in order when the server is back."""
    from embedtune.cli import configure_logging

    configure_logging()
    uri, exp, parent = _store(tmp_path, "outage", mlflow_server.uri)
    rundir = RunDir(tmp_path / "run")
    journal = rundir.path / JOURNAL
    cb = _callback(
        uri, exp, parent, {ModelData("m", "d"): {"ir_recall_at_10": 0.5}}, rundir=rundir, retry_every_s=0
    )
    t = _trial("t1", 3, 3)
    cb.on_trial_start(0, [], t)
    cb.on_trial_result(0, [], t, {"epoch": 1, "ir_recall_at_10": 0.6})
    assert not journal.exists()

    mlflow_server.kill()
    cb.on_trial_result(0, [], t, {"epoch": 2, "ir_recall_at_10": 0.7})  # no exception: training goes on
    cb.on_trial_result(0, [], t, {"epoch": 3, "ir_recall_at_10": 0.8})
    out = capsys.readouterr().out
    assert out.count("WARNING: MLflow at") == 1 and "training goes on" in out and str(journal) in out
    assert [op["epoch"] for op in json.loads(journal.read_text())] == [2, 3]  # kept on disk, in order

    mlflow_server.start()
    cb.on_trial_complete(0, [], t)  # the server answers again: the kept records go first
    assert "replayed 2 kept record(s)" in capsys.readouterr().out
    assert not journal.exists() and cb.pending == []
    client = MlflowClient(uri)
    run = client.get_run(cb.run_ids["t1"])
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "ir_recall_at_10")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [
        (0, 0.5),
        (1, 0.6),
        (2, 0.7),
        (3, 0.8),
    ]
    # (An outage that outlasts the trials: test_sweep.py::test_sweep_against_a_tracking_server_that_goes_away.)


def _kill_at(monkeypatch, server: MlflowServer, name: str, when=lambda *a, **k: True) -> None:
    """The real server dies just before the first call of our `mlc.<name>` that matches `when`, so
    the MLflow call in it fails for real (connection refused), at exactly that point of a trial."""
    real, fired = getattr(mlc, name), []

    def dying(*args, **kwargs):
        if not fired and when(*args, **kwargs):
            fired.append(name)
            server.kill()
        return real(*args, **kwargs)

    monkeypatch.setattr(mlc, name, dying)


@pytest.mark.slow
@pytest.mark.parametrize("point", ["before_create", "after_create", "mid_epoch", "model_logging"])
def test_replay_after_an_outage_at_each_point_of_a_trial(
    point: str, tmp_path: Path, mlflow_server, monkeypatch
) -> None:
    """The tracking server dies at one point of a trial's records; the driver goes too, and the next
    one replays the journal: the trial's one run ends complete (params, step 0 = the base model,
    every epoch once, its model once). Replaying the same records again changes nothing."""
    from embedtune.models import resolve_model
    from embedtune.tracking.callback import replay_journal

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the outage is found at once
    uri, exp, parent = _store(tmp_path, f"replay-{point}", mlflow_server.uri)
    rundir = RunDir(tmp_path / "run")
    base = {ModelData("m", "d"): {"ir_recall_at_10": 0.5, "ir_mrr_at_10": 0.4}}
    log_models = point == "model_logging"
    t = _trial("t1", 3, 3)
    if log_models:
        ckpt = tmp_path / "checkpoint_000002"
        ckpt.mkdir()
        (ckpt / "model").symlink_to(resolve_model("paraphrase-MiniLM-L3-v2"))
        t.checkpoint = SimpleNamespace(path=str(ckpt), filesystem=None)
    if point == "before_create":
        mlflow_server.kill()
    elif point == "after_create":  # the run exists, its params and step 0 do not
        _kill_at(monkeypatch, mlflow_server, "log_params")
    elif point == "mid_epoch":
        _kill_at(monkeypatch, mlflow_server, "log_metrics", lambda *a, step, **k: step == 2)
    else:
        _kill_at(monkeypatch, mlflow_server, "log_sentence_transformer")
    cb = _callback(uri, exp, parent, base, rundir=rundir, retry_every_s=3600, log_models=log_models)
    cb.on_trial_start(0, [], t)
    for epoch, value in ((1, 0.6), (2, 0.7), (3, 0.8)):
        cb.on_trial_result(0, [], t, {"epoch": epoch, "ir_recall_at_10": value})
    cb.on_trial_complete(0, [], t)
    kept = Journal(rundir).load()
    assert kept and kept[-1]["op"] == "close"  # the outage kept the records; the driver goes now
    monkeypatch.undo()  # (the MLflow calls are the real ones again)

    mlflow_server.start()
    client = MlflowClient(uri)

    def check() -> None:
        children = _children(client, f"replay-{point}")
        assert len(children) == 1, [c.info.run_id for c in children]
        run = client.get_run(children[0].info.run_id)
        assert run.info.status == "FINISHED"
        assert {k: run.data.params.get(k) for k in ("model", "dataset", "epochs")} == {
            "model": "m",
            "dataset": "d",
            "epochs": "3",
        }
        recall = client.get_metric_history(run.info.run_id, "ir_recall_at_10")
        assert sorted((m.step, m.value) for m in recall) == [(0, 0.5), (1, 0.6), (2, 0.7), (3, 0.8)]
        assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "ir_mrr_at_10")] == [
            (0, 0.4)
        ]
        assert run.data.metrics["epochs_done"] == 3
        models = client.search_logged_models([exp], filter_string=f"source_run_id = '{run.info.run_id}'")
        assert len(models) == (1 if log_models else 0), models
        if log_models:
            assert run.data.tags["embedtune.model_uri"] == f"models:/{models[0].model_id}"

    assert replay_journal(_callback(uri, exp, parent, base, rundir=rundir, log_models=log_models)) == len(
        kept
    )
    assert not rundir.has(JOURNAL)
    check()
    Journal(rundir).save(kept)  # the same records once more (a replay cut short, a copied journal)
    assert replay_journal(_callback(uri, exp, parent, base, rundir=rundir, log_models=log_models)) == len(
        kept
    )
    check()


def test_callback_replaces_the_stale_run_of_a_rerun_config(tmp_path: Path) -> None:
    """A config that runs again (its earlier trial FAILED) ends with one child run: the new one."""
    uri, exp, parent = _store(tmp_path, "stale")

    def trial(tid: str, digest: str):
        return _trial(tid, 1, 1, config_hash=digest)

    first = _callback(uri, exp, parent)
    for t in (trial("a", "h1"), trial("b", "h2")):
        first.on_trial_start(0, [], t)
    first.on_trial_error(0, [], trial("a", "h1"))
    first.on_trial_complete(0, [], trial("b", "h2"))
    second = _callback(uri, exp, parent, skip={"h2"})
    second.on_trial_start(0, [], trial("c", "h1"))
    second.on_trial_complete(0, [], trial("c", "h1"))
    second.on_trial_start(0, [], trial("d", "h2"))  # a sampled draw of a done config: no run
    second.on_trial_complete(0, [], trial("d", "h2"))
    children = _children(MlflowClient(uri), "stale")
    assert sorted(
        (c.data.tags[mlc.CONFIG_TAG], c.data.tags[mlc.TRIAL_TAG], c.info.status) for c in children
    ) == [("h1", "c", "FINISHED"), ("h2", "b", "FINISHED")]


def test_child_runs_are_all_found_past_one_page(tmp_path: Path, monkeypatch) -> None:
    """MLflow returns one page of runs per search (1,000 by default): the children of a sweep with
    more trials than a page are all found, and closing the open ones reaches every one of them."""
    uri, exp, parent = _store(tmp_path, "paged")
    client = MlflowClient(uri)
    ids = [
        client.create_run(
            exp, tags={mlc.PARENT_TAG: parent, mlc.KIND_TAG: "trial"}, run_name=f"t{i}"
        ).info.run_id
        for i in range(7)
    ]
    assert sorted(
        r.info.run_id for r in mlc.all_runs(uri, exp, f"tags.`{mlc.PARENT_TAG}` = '{parent}'", page_size=3)
    ) == sorted(ids)
    real, searches = mlc.all_runs, []

    def in_pages_of_two(*a, **k):
        searches.append(a)
        return real(*a, **{**k, "page_size": 2})

    monkeypatch.setattr(mlc, "all_runs", in_pages_of_two)
    assert len(mlc.child_runs(uri, exp, parent)) == 7
    assert mlc.close_open_children(uri, exp, parent) == 7
    assert len(searches) == 2  # both went through the paging search
    assert {client.get_run(i).info.status for i in ids} == {"KILLED"}


def test_redact_hides_uri_credentials() -> None:
    redact = mlc.redact
    assert redact("http://alice:hunter2@127.0.0.1:5000") == "http://alice:***@127.0.0.1:5000"
    assert (
        redact('{"uri": "https://u:p%40ss@mlflow.example.com/x"}')
        == '{"uri": "https://u:***@mlflow.example.com/x"}'
    )
    signed = "https://bucket.s3.amazonaws.com/k?X-Amz-Credential=AKIA1&X-Amz-Signature=abc123&x=1"
    assert redact(signed) == "https://bucket.s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Signature=***&x=1"
    assert redact("http://h/api?token=t0k3n&api_key=k") == "http://h/api?token=***&api_key=***"
    for clean in (
        "sqlite:////tmp/run/mlflow.db",
        "s3://bucket/sweeps",
        "http://127.0.0.1:5000",
        "ray://10.0.0.1:10001",
    ):
        assert redact(clean) == clean


def test_error_line_is_the_exception_of_a_trial_error_file(tmp_path: Path) -> None:
    err = tmp_path / "error.txt"
    err.write_text(
        "Failure # 1 (occurred at 2026-11-30)\nray::ImplicitFunc.train() (pid=1, ip=127.0.0.1)\n"
        '  File "train.py", line 3, in on_evaluate\n'
        "embedtune.errors.EmbedtuneError: training loss went nan by epoch 1 (lr 5e-05): the run diverged\n"
    )
    assert _error_line(str(err)).endswith("the run diverged")
    assert _error_line(str(tmp_path / "missing.txt")) is None


def test_answers_is_false_only_for_a_store_that_is_away(tmp_path: Path, monkeypatch) -> None:
    """`TrialRuns.answers` says "away" for a server nobody listens on and "here" for a live store; a
    bug behind the call (not an outage) raises instead of passing for an outage."""
    from servers import free_port

    uri, exp, parent = _store(tmp_path, "answers")
    assert TrialRuns(uri, exp, parent, {}, "ir_recall_at_10").answers()
    away = TrialRuns(f"http://127.0.0.1:{free_port()}", "0", "p", {}, "ir_recall_at_10")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    assert away.answers() is False

    def broken(_uri):
        raise TypeError("a bug, not an outage")

    monkeypatch.setattr(mlc, "client", broken)
    with pytest.raises(TypeError, match="a bug"):
        away.answers()


def test_resume_without_its_parent_run_is_one_line(tmp_path: Path) -> None:
    """A resume names the parent run the tracking database no longer has (a deleted run, a lost
    database) in one EmbedtuneError, before any `update_run` on it: on a tracking server (the
    cluster's case: MLflow's REST errors) and on SQLite."""
    from embedtune.errors import EmbedtuneError

    server = MlflowServer(f"sqlite:///{tmp_path / 'server.db'}", artifacts=tmp_path / "server-artifacts")
    server.start(timeout=300)
    try:
        uri, exp, parent = _store(tmp_path, "gone", server.uri)
        assert mlc.start_parent_run(uri, exp, parent, "p") == parent  # present: reopened
        MlflowClient(uri).delete_run(parent)
        with pytest.raises(EmbedtuneError, match=f"parent run {parent} is not in {uri} .*--fresh"):
            mlc.start_parent_run(uri, exp, parent, "p")
    finally:
        server.kill()
    sqlite = f"sqlite:///{tmp_path / 'new.db'}"  # a database that never had it
    exp2 = mlc.ensure_experiment(sqlite, "gone", tmp_path / "art2")
    with pytest.raises(EmbedtuneError, match=f"parent run {parent} is not in") as err:
        mlc.start_parent_run(sqlite, exp2, parent, "p")
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_resume_after_the_tracking_database_is_lost_ends_with_one_line(sweep_command) -> None:
    """The CLI: a finished sweep, its tracking database gone (a head's SQLite lost with the head),
    the same command again: exit 2 and one line naming the parent run, no traceback."""
    import subprocess

    from specs import tiny_spec

    raw = tiny_spec(
        "lostdb", models=["paraphrase-MiniLM-L3-v2"], search={"epochs": [1], "batch_size": [16], "lr": [5e-5]}
    )
    cmd, run_dir = sweep_command(raw)
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    parent = json.loads((run_dir / "sweep_state.json").read_text())["parent_run_id"]
    (run_dir / "mlflow.db").unlink()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert again.returncode == 2, again.stderr[-3000:]
    assert f"parent run {parent} is not in" in again.stderr and "Traceback" not in again.stderr
    assert len([line for line in again.stderr.splitlines() if line.startswith("embedtune: error:")]) == 1


class ReplyDroppingProxy:
    """A loopback HTTP proxy in front of a real tracking server that, for the first `drops` requests
    whose path contains `path`, forwards the request, reads the server's whole answer (so the server
    has committed the write) and then closes the client's connection without sending it: the reply
    lost on the way back. Everything else is passed through unchanged."""

    def __init__(self, upstream_port: int, path: str, drops: int = 1) -> None:
        import socket
        import threading

        self.upstream_port, self.path, self.drops = upstream_port, path, drops
        self.dropped: list[str] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.uri = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        import threading

        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    @staticmethod
    def _read_request(conn) -> bytes | None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return None
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == b"content-length":
                length = int(value.strip())
        while len(body) < length:
            body += conn.recv(65536)
        return head + b"\r\n\r\n" + body

    def _handle(self, conn) -> None:
        import http.client

        with conn:
            while True:
                raw = self._read_request(conn)
                if raw is None:
                    return
                head, _, body = raw.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
                headers.pop("Connection", None)
                upstream = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=60)
                upstream.request(method, target, body=body, headers=headers)
                resp = upstream.getresponse()
                payload = resp.read()  # the server has answered: the write is committed
                upstream.close()
                if self.path in target and len(self.dropped) < self.drops:
                    self.dropped.append(target)
                    return  # the reply never reaches the client
                out = [f"HTTP/1.1 {resp.status} {resp.reason}"]
                out += [
                    f"{k}: {v}"
                    for k, v in resp.getheaders()
                    if k.lower() not in {"transfer-encoding", "content-length", "connection"}
                ]
                out += [f"Content-Length: {len(payload)}", "Connection: keep-alive"]
                conn.sendall(("\r\n".join(out) + "\r\n\r\n").encode("latin-1") + payload)

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("retries", ["2", "0"])
def test_a_lost_create_run_reply_leaves_one_run_per_trial(
    retries: str, tmp_path: Path, mlflow_server, monkeypatch
) -> None:
    """The tracking server commits a trial's run but its reply is lost (a real server behind a proxy
    that drops the connection after the server answered create_run). With MLflow's own retries the
    client sends create_run again (a second run, same trial tag); without them the op is kept and
    replayed later. Either way the trial ends with exactly one run, holding all its records."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", retries)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    _, exp, parent = _store(tmp_path, f"lost-reply-{retries}", mlflow_server.uri)
    proxy = ReplyDroppingProxy(mlflow_server.port, "/runs/create")
    try:
        rundir = RunDir(tmp_path / "run")
        cb = _callback(
            proxy.uri, exp, parent, {ModelData("m", "d"): {"ir_recall_at_10": 0.5}}, rundir=rundir,
            retry_every_s=0,
        )  # fmt: skip
        t = _trial("t1", 2, 2, config_hash="h1")
        cb.on_trial_start(0, [], t)
        for epoch, value in ((1, 0.6), (2, 0.7)):
            cb.on_trial_result(0, [], t, {"epoch": epoch, "ir_recall_at_10": value})
        cb.on_trial_complete(0, [], t)
        assert proxy.dropped and "/runs/create" in proxy.dropped[0]  # the fault hit create_run
        assert cb.pending == [] and not rundir.has(JOURNAL)
    finally:
        proxy.close()
    client = MlflowClient(mlflow_server.uri)
    children = _children(client, f"lost-reply-{retries}")
    assert len(children) == 1, [(c.info.run_id, c.info.status) for c in children]
    run = client.get_run(children[0].info.run_id)
    assert run.info.status == "FINISHED" and run.data.tags[mlc.TRIAL_TAG] == "t1"
    history = client.get_metric_history(run.info.run_id, "ir_recall_at_10")
    assert sorted((m.step, m.value) for m in history) == [(0, 0.5), (1, 0.6), (2, 0.7)]


@pytest.mark.parametrize("retries", ["2", "0"])
def test_a_lost_create_run_reply_leaves_one_parent_run(retries: str, mlflow_server, monkeypatch) -> None:
    """The parent run's create_run is committed but its reply lost: sent again by MLflow's retries
    (two runs, one deleted) or raised (the committed run found by its token). One parent run, live."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", retries)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    client = MlflowClient(mlflow_server.uri)
    exp = client.create_experiment(f"lost-parent-{retries}-{uuid.uuid4().hex[:6]}")
    proxy = ReplyDroppingProxy(mlflow_server.port, "/runs/create")
    try:
        parent = mlc.start_parent_run(proxy.uri, exp, None, "sweep")
        assert proxy.dropped and "/runs/create" in proxy.dropped[0]  # the fault hit create_run
    finally:
        proxy.close()
    runs = client.search_runs([exp])
    assert [r.info.run_id for r in runs] == [parent]
    assert runs[0].info.lifecycle_stage == "active" and runs[0].data.tags[mlc.KIND_TAG] == "sweep"
    deleted = client.search_runs([exp], run_view_type=ViewType.DELETED_ONLY)
    assert len(deleted) == (1 if retries == "2" else 0)  # MLflow's retry did create a second one
