"""Tune's result files survive a trial restart: the driver's copy is kept, a download that fails
leaves nothing half-written, and the sweep's Tuner uses these loggers instead of Ray's."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import pyarrow.fs
import pytest
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

from embedtune.sweep.loggers import restore_result_file

ROWS = "".join(json.dumps({"epoch": e}) + "\n" for e in (1, 2))


def _trial(tmp_path: Path, fs: pyarrow.fs.FileSystem, remote_dir: str, checkpoint: bool = True):
    local = tmp_path / "driver" / "trial"
    local.mkdir(parents=True)
    storage = SimpleNamespace(trial_fs_path=remote_dir, storage_filesystem=fs)
    return SimpleNamespace(checkpoint=checkpoint, local_path=str(local), storage=storage)


def test_the_drivers_copy_is_kept_over_an_older_stored_one(tmp_path: Path) -> None:
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "result.json").write_text(json.dumps({"epoch": 1}) + "\n")  # synced before epoch 2
    trial = _trial(tmp_path, pyarrow.fs.LocalFileSystem(), str(remote))
    local = Path(trial.local_path, "result.json")
    local.write_text(ROWS)
    assert restore_result_file("result.json", trial) == "kept"
    assert local.read_text() == ROWS


def test_a_new_driver_downloads_the_stored_file(tmp_path: Path) -> None:
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "result.json").write_text(ROWS)
    trial = _trial(tmp_path, pyarrow.fs.LocalFileSystem(), str(remote))
    assert restore_result_file("result.json", trial) == "downloaded"
    assert Path(trial.local_path, "result.json").read_text() == ROWS
    assert sorted(p.name for p in Path(trial.local_path).iterdir()) == ["result.json"]  # no temp left


def test_nothing_to_restore_without_a_checkpoint_or_a_stored_file(tmp_path: Path) -> None:
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "result.json").write_text(ROWS)
    fresh = _trial(tmp_path / "a", pyarrow.fs.LocalFileSystem(), str(remote), checkpoint=False)
    assert restore_result_file("result.json", fresh) == "none"
    assert not Path(fresh.local_path, "result.json").exists()
    missing = _trial(tmp_path / "b", pyarrow.fs.LocalFileSystem(), str(tmp_path / "nowhere"))
    assert restore_result_file("result.json", missing) == "none"
    assert list(Path(missing.local_path).iterdir()) == []


def test_unreachable_storage_is_retried_then_leaves_no_half_written_file(tmp_path: Path, caplog) -> None:
    # A real S3 client pointed at a loopback port nothing listens on: every call is refused.
    s3 = pyarrow.fs.S3FileSystem(
        access_key="k", secret_key="s", endpoint_override="http://127.0.0.1:9", region="us-east-1",
        connect_timeout=1, request_timeout=1,
        retry_strategy=pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=1),
    )  # fmt: skip
    trial = _trial(tmp_path, s3, "bucket/exp/trial")
    started = time.monotonic()
    assert restore_result_file("result.json", trial, attempts=3, backoff_s=0.2) == "failed"
    assert time.monotonic() - started >= 0.2 + 0.4  # two waits between three attempts
    assert list(Path(trial.local_path).iterdir()) == []
    assert "could not restore result.json" in caplog.text


def test_the_sweeps_tuner_replaces_rays_json_and_csv_loggers(tmp_path: Path) -> None:
    from ray.tune.callback import Callback

    from embedtune.specs.load import parse_spec
    from embedtune.sweep.tuner import build_tuner
    from tests.specs import tiny_spec

    spec = parse_spec(tiny_spec("loggers"))
    tuner = build_tuner(spec, lambda config: None, str(tmp_path), Callback(), "exp", configs=[{"lr": 1.0}])
    callbacks = tuner._local_tuner.get_run_config().callbacks
    loggers = [c for c in callbacks if isinstance(c, (JsonLoggerCallback, CSVLoggerCallback))]
    # Tune adds its default loggers only when no callback is an instance of theirs.
    assert sorted(type(c).__name__ for c in loggers) == ["WholeCSVLoggerCallback", "WholeJsonLoggerCallback"]


@pytest.fixture
def s3(tmp_path: Path):
    from servers import SeaweedS3

    server = SeaweedS3(tmp_path / "s3")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _pyarrow_s3(env: dict[str, str]) -> pyarrow.fs.S3FileSystem:
    return pyarrow.fs.S3FileSystem(
        access_key=env["AWS_ACCESS_KEY_ID"], secret_key=env["AWS_SECRET_ACCESS_KEY"],
        endpoint_override=env["AWS_ENDPOINT_URL"], region=env["AWS_REGION"], connect_timeout=2,
        request_timeout=5, retry_strategy=pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=1),
    )  # fmt: skip


def test_a_restoring_trial_waits_out_an_object_store_outage(s3, tmp_path: Path, caplog) -> None:
    """A real checkpoint on a real S3 (SeaweedFS) that is down when the trial restores it and back
    a few seconds later: the copy is retried until it works, whole; with too short a wait it raises
    (Tune then counts a failure) and leaves no partial folder to be used."""
    import threading

    from ray import tune

    from embedtune.sweep.trainable import restore_checkpoint

    src = tmp_path / "ckpt"
    (src / "model").mkdir(parents=True)
    (src / "state.json").write_text('{"epoch": 2}')
    (src / "model" / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    fs = _pyarrow_s3(s3.env)
    pyarrow.fs.copy_files(str(src), "embedtune/ckpt/checkpoint_000001", destination_filesystem=fs)
    checkpoint = tune.Checkpoint(path="embedtune/ckpt/checkpoint_000001", filesystem=fs)

    s3.kill()
    with pytest.raises(OSError):
        restore_checkpoint(checkpoint, tmp_path / "short", wait_s=1)
    assert not any((tmp_path / "short").rglob("*.safetensors"))

    back = threading.Timer(6, s3.start)
    back.start()
    try:
        got = restore_checkpoint(checkpoint, tmp_path / "restored", wait_s=90)
    finally:
        back.join()
    assert (got / "state.json").read_text() == '{"epoch": 2}'
    assert (got / "model" / "model.safetensors").read_bytes() == bytes(range(256)) * 64
    assert "retrying in" in caplog.text  # the outage did hit the copy


def test_a_checkpoint_upload_waits_out_an_object_store_outage(s3, tmp_path: Path, caplog) -> None:
    """What a trial does when S3 goes away as it saves an epoch: the upload is retried until the
    store is back (instead of failing the trial, which Tune restarts at once, into the same outage),
    and arrives whole; a missing source is not waited for, nor is anything once the wait is spent."""
    import threading

    from embedtune.storage import waiting_out_outages

    src = tmp_path / "ckpt"
    (src / "model").mkdir(parents=True)
    (src / "model" / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    fs = _pyarrow_s3(s3.env)
    calls: list[int] = []

    def upload(source: Path = src) -> None:
        calls.append(1)
        pyarrow.fs.copy_files(str(source), "embedtune/up/checkpoint_000000", destination_filesystem=fs)

    s3.kill()
    with pytest.raises(OSError):
        waiting_out_outages(upload, "saving the epoch 1 checkpoint", wait_s=0)
    assert len(calls) == 1
    with pytest.raises(FileNotFoundError):
        waiting_out_outages(lambda: upload(tmp_path / "absent"), "saving", wait_s=90)
    assert len(calls) == 2  # not retried

    back = threading.Timer(6, s3.start)
    back.start()
    try:
        waiting_out_outages(upload, "saving the epoch 1 checkpoint", wait_s=90)
    finally:
        back.join()
    assert len(calls) > 3  # the outage did hit the upload, more than once
    assert "saving the epoch 1 checkpoint failed" in caplog.text and "retrying in" in caplog.text
    with fs.open_input_stream("embedtune/up/checkpoint_000000/model/model.safetensors") as f:
        assert f.read() == bytes(range(256)) * 64
