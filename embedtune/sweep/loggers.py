"""Tune's per-trial result files (result.json, progress.csv) kept whole across trial restarts.

When Tune restarts a trial from a checkpoint, its JSON and CSV logger callbacks first copy the
trial's file back from storage over the driver's own copy. Two ways that loses epochs, both seen
on the cluster stand-in: the copy runs while object storage is down (a trial that failed because
S3 went away is retried at once), truncating the local file and leaving it with only the epochs
reported afterwards; and the copy in storage lags the driver's (it is synced every few seconds),
so a retry inside the same driver rolls the file back. Ray's own loggers are kept; only their
restore step is replaced: the driver's copy wins when it has one (it is never older than what it
synced up), and otherwise the stored file is downloaded with retries into a temporary file that
replaces nothing until it is whole.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

log = logging.getLogger(__name__)

ATTEMPTS = 5
BACKOFF_S = 2.0


def restore_result_file(file_name: str, trial, attempts: int = ATTEMPTS, backoff_s: float = BACKOFF_S) -> str:
    """Bring `trial`'s `file_name` back into its driver-side folder: 'kept' (the driver's copy),
    'downloaded', 'none' (nothing to restore) or 'failed' (storage unreachable; a warning)."""
    import pyarrow.fs

    if not trial.checkpoint:  # a trial starting from scratch has no earlier results
        return "none"
    local = Path(trial.local_path, file_name)
    if local.exists() and local.stat().st_size > 0:
        return "kept"
    remote = Path(trial.storage.trial_fs_path, file_name).as_posix()
    for attempt in range(1, attempts + 1):
        fd, tmp = tempfile.mkstemp(prefix=f".{file_name}.", dir=local.parent)
        os.close(fd)
        try:
            pyarrow.fs.copy_files(remote, tmp, source_filesystem=trial.storage.storage_filesystem)
            os.replace(tmp, local)
            return "downloaded"
        except FileNotFoundError:
            return "none"
        except Exception as exc:  # noqa: BLE001 - pyarrow raises OSError subclasses and ArrowException
            if attempt == attempts:
                log.warning("could not restore %s of trial %s from %s: %s", file_name, trial, remote, exc)
                return "failed"
            time.sleep(backoff_s * attempt)
        finally:
            Path(tmp).unlink(missing_ok=True)
    return "failed"


class WholeJsonLoggerCallback(JsonLoggerCallback):
    """Ray's result.json logger whose restore step never loses rows (see the module docstring)."""

    def _restore_from_remote(self, file_name: str, trial) -> None:
        restore_result_file(file_name, trial)


class WholeCSVLoggerCallback(CSVLoggerCallback):
    """Ray's progress.csv logger whose restore step never loses rows (see the module docstring)."""

    def _restore_from_remote(self, file_name: str, trial) -> None:
        restore_result_file(file_name, trial)


def result_loggers() -> list:
    """The callbacks that replace Tune's default JSON and CSV loggers (Tune adds its own only when
    no callback of that type is given)."""
    return [WholeJsonLoggerCallback(), WholeCSVLoggerCallback()]
