"""Where question→answer pairs come from and how they are split (a sweep's `datasets:` entry)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from embedtune.specs.base import Strict

# A dataset label: one path component (no '/', '\\', '..', leading '.' or '-').
SAFE_LABEL = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=-]{0,127}")

Format = Literal["auto", "jsonl", "parquet", "csv", "beir", "hf"]


class DataSpec(Strict):
    """Where the pairs come from and how to split them."""

    source: str = Field(description="sample name, local file/folder, or hf:<dataset id>")
    name: str | None = Field(None, description="label in tables and run names (default: derived from source)")
    format: Format = "auto"
    question_column: str = "question"
    answer_column: str = "answer"
    hf_split: str = "train"
    hf_config: str | None = None
    beir_split: str = "test"
    max_pairs: int | None = Field(None, ge=2, description="sample this many pairs (by seed) after cleaning")
    eval_fraction: float = Field(0.2, gt=0, lt=1)
    eval_size: int | None = Field(None, ge=1, description="held-out questions (overrides eval_fraction)")
    max_train_pairs: int | None = Field(None, ge=2)
    corpus_distractors: bool = Field(True, description="keep train answers in the eval corpus")
    seed: int = 42

    @model_validator(mode="after")
    def _check(self) -> DataSpec:
        if not self.source.strip():
            raise ValueError("source must not be empty")
        # The label names files (run dir `data/<label>.json`, the negatives cache, plots): a name
        # like `../../x` would write outside them, so refuse it here, at spec load.
        if self.name is not None and not SAFE_LABEL.fullmatch(self.name):
            raise ValueError(
                f"name {self.name!r} is not a safe file name: use letters, digits and _ . + = - "
                "(a letter, digit or _ first, no '/'), e.g. name: medquad"
            )
        return self

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        base = Path(self.source.removeprefix("hf:")).name
        for suffix in (".gz", ".jsonl", ".json", ".parquet", ".csv"):
            base = base.removesuffix(suffix)
        # one safe path component whatever the source is called (`hf:..`, `my file.csv`)
        return re.sub(r"[^A-Za-z0-9_.+=-]+", "_", base).lstrip(".-+=") or "data"
