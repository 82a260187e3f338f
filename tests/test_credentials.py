"""The credential pre-check against a real tracking server running MLflow's basic-auth app on
loopback: a wrong password stops `embedtune sweep` in seconds, before any data work, with one line;
the right one passes. (`/health` answers without a login, so it could not tell them apart.)"""

from __future__ import annotations

import os
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


SECRET = "PLANTED-s3cret%2F4242"  # URL-encoded '/' inside, as AWS secret keys often have


def test_s3_keys_in_storage_and_lancedb_uris_move_to_the_environment(monkeypatch) -> None:
    """`s3://KEY:SECRET@bucket/...` in storage_path and final.lancedb_uri (the form pyarrow takes):
    the spec that is stored and hashed keeps `s3://bucket/...`, the key pair is in AWS_ACCESS_KEY_ID
    / AWS_SECRET_ACCESS_KEY (decoded), where pyarrow, Tune and LanceDB read it."""
    from embedtune.specs import parse_spec
    from embedtune.sweep import preflight as pf

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key, raising=False)
    spec = parse_spec({
        "name": "keys", "models": ["paraphrase-MiniLM-L3-v2"], "datasets": [{"source": "medquad-sample"}],
        "storage_path": f"s3://etKEY:{SECRET}@embedtune/sweeps",
        "final": {"lancedb_uri": f"s3://etKEY:{SECRET}@embedtune/lancedb"},
    })  # fmt: skip
    clean = pf.without_secrets(spec)
    assert (
        clean.storage_path == "s3://embedtune/sweeps" and clean.final.lancedb_uri == "s3://embedtune/lancedb"
    )
    assert "PLANTED" not in clean.model_dump_json() and "etKEY" not in clean.model_dump_json()
    assert (
        os.environ["AWS_ACCESS_KEY_ID"] == "etKEY"
        and os.environ["AWS_SECRET_ACCESS_KEY"] == "PLANTED-s3cret/4242"
    )
    assert pf.spec_hash(clean) == pf.spec_hash(pf.without_secrets(clean))  # a resume without the keys matches


@pytest.mark.parametrize(
    "key, value",
    [
        ("storage_path", f"gs://user:{SECRET}@bucket/sweeps"),
        ("storage_path", f"s3://bucket/sweeps?secret_key={SECRET}"),
        ("lancedb_uri", f"s3://embedtune/db?X-Amz-Signature={SECRET}"),
        ("source", f"https://user:{SECRET}@example.org/qa.csv"),
        ("two_logins", None),
    ],
)
def test_credentials_that_cannot_be_moved_stop_the_sweep_in_one_line(
    key: str, value: str | None, tmp_path: Path, capsys
) -> None:
    """Any other credential in storage_path, final.lancedb_uri or a dataset source (a password on
    another scheme, a secret query parameter, a source URL) is refused before anything is written,
    in one line that names the field and never shows the secret."""
    from embedtune.cli import main

    raw = {"name": "creds", "models": ["paraphrase-MiniLM-L3-v2"], "ray": {"num_gpus": 0},
           "datasets": [{"name": "medquad", "source": "medquad-sample", "max_pairs": 60, "eval_size": 10}]}  # fmt: skip
    if key == "storage_path":
        raw["storage_path"] = value
    elif key == "lancedb_uri":
        raw["final"] = {"lancedb_uri": value}
    elif key == "source":
        raw["datasets"][0]["source"] = value
    else:
        raw["storage_path"] = f"s3://one:{SECRET}@embedtune/sweeps"
        raw["final"] = {"lancedb_uri": f"s3://two:{SECRET}@embedtune/db"}
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(raw))
    run_dir = tmp_path / "run"
    assert main(["sweep", str(spec_file), "--run-dir", str(run_dir)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    want = {"storage_path": "storage_path ", "lancedb_uri": "final.lancedb_uri ", "source": "datasets.0.source ",
            "two_logins": "storage_path and final.lancedb_uri carry different S3 keys"}[key]  # fmt: skip
    assert len(err) == 1 and err[0].startswith(f"embedtune: error: {want}"), err
    assert "PLANTED" not in captured.err + captured.out
    assert not run_dir.exists()


@pytest.fixture
def seaweed_s3(tmp_path: Path, monkeypatch):
    """A real S3 (SeaweedFS) on loopback with only its endpoint in this process's environment, not
    its keys; yields (access key, secret key, the S3 server)."""
    from servers import SeaweedS3

    s3 = SeaweedS3(tmp_path / "s3")
    s3.start()
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in s3.env.items():
        if not key.startswith(("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")):
            monkeypatch.setenv(key, value)
    try:
        yield s3.env["AWS_ACCESS_KEY_ID"], s3.env["AWS_SECRET_ACCESS_KEY"], s3
    finally:
        s3.stop()


@pytest.mark.slow
def test_s3_keys_given_in_the_uris_are_nowhere_at_rest(
    seaweed_s3, tmp_path: Path, capfd, monkeypatch
) -> None:
    """A sweep whose only S3 login is the one in `storage_path` / `final.lancedb_uri`
    (`s3://KEY:SECRET@embedtune/...`, real SeaweedFS): it runs (so the keys did reach pyarrow,
    Tune and the trial processes, through the environment), and the secret key is in no object of
    the bucket (spec.json, sweep_state.json, trials.json, Tune's experiment state and pickles,
    checkpoints), no file of the local work folder, and no line of output."""
    import uuid

    from servers import MlflowServer
    from specs import tiny_spec

    from embedtune.rundir import RunDir
    from embedtune.specs import parse_spec
    from embedtune.sweep import default_run_dir, run_sweep
    from embedtune.sweep.preflight import without_secrets

    key, secret, s3_server = seaweed_s3
    prefix = f"creds-{uuid.uuid4().hex[:8]}"
    server = MlflowServer(f"sqlite:///{tmp_path / 'mlflow.db'}", artifacts=tmp_path / "mlflow-artifacts")
    server.start()
    raw = tiny_spec(
        "secret-keys",
        models=["paraphrase-MiniLM-L3-v2"],
        search={"epochs": [1], "batch_size": [16]},
        storage_path=f"s3://{key}:{secret}@embedtune/{prefix}",
        mlflow={"tracking_uri": server.uri, "experiment": prefix},
        final={"enabled": False, "lancedb_uri": f"s3://{key}:{secret}@embedtune/{prefix}-lancedb"},
    )
    try:
        spec = without_secrets(parse_spec(raw))  # as the CLI does, before the run dir is named
        rundir = RunDir(default_run_dir(spec, None))
        result = run_sweep(spec, rundir, final=False)
    finally:
        server.kill()
    assert [t.status for t in result.trials] == ["FINISHED"]
    assert rundir.location == f"s3://embedtune/{prefix}/secret-keys"
    s3 = s3_server.client()
    objects = [o["Key"] for o in s3.list_objects_v2(Bucket="embedtune", Prefix=prefix)["Contents"]]
    names = {k.rsplit("/", 1)[-1] for k in objects}
    assert {"spec.json", "sweep_state.json", "trials.json"} <= names, names
    assert any(n.startswith("experiment_state") for n in names) and any("checkpoint" in k for k in objects)
    leaked = [
        k for k in objects if secret.encode() in s3.get_object(Bucket="embedtune", Key=k)["Body"].read()
    ]
    assert leaked == []
    local = [f for f in rundir.path.rglob("*") if f.is_file()]
    assert local and [f for f in local if secret.encode() in f.read_bytes()] == []
    out = capfd.readouterr()
    assert secret not in out.out + out.err
    import shutil

    shutil.rmtree(rundir.path, ignore_errors=True)  # the local work folder lives under EMBEDTUNE_HOME
