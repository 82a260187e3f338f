"""Process-wide environment hygiene (offline hub access, telemetry off, quiet tokenizers), where
shared caches live, and which torch device to use.

`apply` is called by the CLI before heavy imports and by the test suite for every test, so no
process of the project phones home (MLflow telemetry, Ray usage stats, HF hub) where it must not.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

_ALWAYS = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
}
_OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


# Libraries' own chatter, off unless --verbose: transformers' per-load report tables and weight bars,
# the hub's download bars, Lance's Rust-side WARN lines ("No existing dataset" per new table).
# tqdm bars nobody asked for (the miner's, `datasets`' and the model card's "widget examples", in
# the driver and in the trial workers, which inherit this environment) go with TQDM_DISABLE: it sets
# tqdm's default only, so embedtune's own bars (sweep, ingest) pass disable= explicitly and stay.
# Tune prints its configuration box unless the old output engine is asked for with verbose=0.
_QUIET = {
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TQDM_DISABLE": "1",
    "LANCE_LOG": "error",
    "LANCEDB_LOG": "error",
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    "RAY_AIR_NEW_OUTPUT": "0",
}
# Library warnings that say nothing a user can act on here.
_QUIET_WARNINGS = (
    r"lancedb fork support is experimental",  # LanceDB in a forked helper process
    r"'pin_memory' argument is set as true but no accelerator",  # torch's DataLoader on a CPU
)
_QUIET_LOGGERS = ("sentence_transformers", "mlflow", "lancedb")


def set_verbose(verbose: bool) -> None:
    """Record the verbosity for this process and the workers it starts (they inherit the
    environment), and quiet the libraries unless verbose (explicit user settings win)."""
    os.environ["EMBEDTUNE_VERBOSE"] = "1" if verbose else "0"
    if not verbose:
        import logging
        import warnings

        for key, value in _QUIET.items():
            os.environ.setdefault(key, value)
        for pattern in _QUIET_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)
        for name in _QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        with contextlib.suppress(Exception):
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()


def worker_env() -> dict[str, str]:
    """What `set_verbose` gave this process, for processes that do not inherit its environment: the
    trial workers of a joined cluster are started by that cluster's raylets, so without these their
    weight-loading bars and model-card lines fill the job log. Empty before `set_verbose`."""
    if "EMBEDTUNE_VERBOSE" not in os.environ:
        return {}
    out = {"EMBEDTUNE_VERBOSE": os.environ["EMBEDTUNE_VERBOSE"]}
    if not verbose():
        out |= {key: os.environ[key] for key in _QUIET if key in os.environ}
    return out


def verbose() -> bool:
    return os.environ.get("EMBEDTUNE_VERBOSE") == "1"


def offline_requested() -> bool:
    return os.environ.get("EMBEDTUNE_OFFLINE", "").lower() in {"1", "true", "yes"}


def apply(offline: bool | None = None) -> dict[str, str]:
    """Set the hygiene variables (without overriding explicit user choices for the always-on set)
    and, when offline (argument, or EMBEDTUNE_OFFLINE=1), the hub-offline variables so hub calls
    fail at once instead of after a minute of retries. Returns what was set."""
    offline = offline_requested() if offline is None else offline
    wanted = dict(_ALWAYS)
    if offline:
        wanted |= _OFFLINE
        os.environ["EMBEDTUNE_OFFLINE"] = "1"
    for key, value in wanted.items():
        if key in _OFFLINE:
            os.environ[key] = value
        else:
            os.environ.setdefault(key, value)
    return wanted


def home() -> Path:
    """Where embedtune keeps caches shared across runs (materialised models, mined negatives)."""
    path = Path(os.environ.get("EMBEDTUNE_HOME", Path.home() / ".cache" / "embedtune")).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def device() -> str:
    """The torch device for models this process loads: a GPU when it has one, else the CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@contextlib.contextmanager
def patched_environ(values: dict[str, str | None]) -> Iterator[None]:
    """Set (or, for None, unset) environment variables for a block; restore them afterwards, also
    any the block itself changed."""
    old = {k: os.environ.get(k) for k in values}
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
