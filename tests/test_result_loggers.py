"""Tune's result files survive a trial restart: the driver's copy is kept, a download that fails
leaves nothing half-written, and the sweep's Tuner uses these loggers instead of Ray's."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import pyarrow.fs
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
