"""The base of every spec: unknown keys are errors (a misspelt key must not be ignored); how a
model reference becomes the label its results are filed under."""

from __future__ import annotations

import re
from pathlib import PurePosixPath

from pydantic import BaseModel, ConfigDict


def model_label(ref: str) -> str:
    """A short, filesystem-safe label for a model reference (run names, table rows, result keys):
    the last part of its path or hub id, so `sentence-transformers/all-MiniLM-L6-v2` and
    `all-MiniLM-L6-v2` share one, and so do two folders both named `model`."""
    name = PurePosixPath(ref.rstrip("/")).name or ref
    return re.sub(r"[^\w.-]+", "_", name)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")
