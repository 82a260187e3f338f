"""Where the tests find the project's real data: `../shared/data` beside the checkout (where CI
puts it), never an absolute path."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_data(relative: str) -> Path:
    """A path in the shared data. Missing data fails the tests that need it (at collection): such
    a test must run in CI, never skip."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.fail(f"shared data {path} is missing (CI puts ../shared beside the checkout)", pytrace=False)
    return path
