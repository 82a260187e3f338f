"""Process-wide environment hygiene: offline hub access, telemetry off, quiet tokenizers.

Called by the CLI before heavy imports and by the test suite for every test, so no process of
the project phones home (MLflow telemetry, Ray usage stats, HF hub) where it must not.
"""

from __future__ import annotations

import os
from pathlib import Path

_ALWAYS = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
}
_OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


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
