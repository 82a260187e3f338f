"""The credential pre-check against a real tracking server running MLflow's basic-auth app on
loopback: a wrong password stops `embedtune sweep` in seconds, before any data work, with one line;
the right one passes. (`/health` answers without a login, so it could not tell them apart.)"""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from servers import MlflowServer

from embedtune.errors import EmbedtuneError
from embedtune.tracking import client as mlc

ADMIN = ("admin", "right-Passw0rd-for-tests")


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    where = tmp_path_factory.mktemp("mlflow-auth")
    server = MlflowServer(f"sqlite:///{where / 'server.db'}", artifacts=where / "artifacts",
                          log=where / "server.log", auth=ADMIN, auth_dir=where)  # fmt: skip
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _login(monkeypatch, user: str | None, password: str | None) -> None:
    for key, value in (("MLFLOW_TRACKING_USERNAME", user), ("MLFLOW_TRACKING_PASSWORD", password)):
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    monkeypatch.delenv("MLFLOW_TRACKING_TOKEN", raising=False)


def test_health_answers_without_a_login(auth_server) -> None:
    """Why /health is no credential check: the auth app leaves it open."""
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with direct.open(f"{auth_server.uri}/health", timeout=10) as resp:
        assert resp.status == 200


def test_wrong_password_stops_the_sweep_in_seconds_before_any_data_work(
    auth_server, tmp_path: Path, monkeypatch, capsys
) -> None:
    from embedtune.cli import main

    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump({
        "name": "login", "models": ["paraphrase-MiniLM-L3-v2"], "ray": {"num_gpus": 0},
        "datasets": [{"name": "medquad", "source": "medquad-sample", "max_pairs": 60, "eval_size": 10}],
        "mlflow": {"tracking_uri": auth_server.uri},
    }))  # fmt: skip
    run_dir = tmp_path / "run"
    for user, password in ((ADMIN[0], "wrong"), ("nobody", ADMIN[1]), (None, None)):
        _login(monkeypatch, user, password)
        started = time.time()
        assert main(["sweep", str(spec_file), "--run-dir", str(run_dir)]) == 2
        assert time.time() - started < 30
        captured = capsys.readouterr()
        err = captured.err.strip().splitlines()
        assert (
            len(err) == 1 and "refused the credentials" in err[0] and "MLFLOW_TRACKING_USERNAME" in err[0]
        ), err
        assert ADMIN[1] not in captured.err + captured.out
        assert not run_dir.exists() and "data medquad" not in captured.out + captured.err


def test_right_password_passes_the_check(auth_server, monkeypatch) -> None:
    _login(monkeypatch, *ADMIN)
    mlc.check_access(auth_server.uri)  # no error
    names = [e.name for e in mlc.client(auth_server.uri).search_experiments()]
    assert "Default" in names  # the authenticated client reads the server's experiments
    _login(monkeypatch, ADMIN[0], "wrong")
    with pytest.raises(EmbedtuneError, match="refused the credentials"):
        mlc.check_access(auth_server.uri)
