"""The journal: MLflow records a tracking server that was away did not take yet, kept in order in
the run dir (`mlflow_pending.json`) so that no record is silently lost, even across a killed driver."""

from __future__ import annotations

from typing import Any

from embedtune.rundir import JOURNAL, RunDir


class Journal:
    """The kept records (ops) of one run dir; None as run dir keeps nothing on disk."""

    def __init__(self, rundir: RunDir | None) -> None:
        self.rundir = rundir

    @property
    def location(self) -> str | None:
        return self.rundir.uri(JOURNAL) if self.rundir else None

    def load(self) -> list[dict[str, Any]]:
        return list(self.rundir.read_json(JOURNAL, []) or []) if self.rundir else []

    def save(self, ops: list[dict[str, Any]]) -> None:
        """Keep `ops` (all of them, in order), or remove the journal when none is left."""
        if self.rundir is None:
            return
        if ops:
            self.rundir.write_json(JOURNAL, ops)
        elif self.rundir.has(JOURNAL):
            self.rundir.delete(JOURNAL)
