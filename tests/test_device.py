"""Base-model scoring (driver step 2) and the final stage's encoding use the driver's GPU when it
has one, the CPU otherwise: both load their models through `models.load_model`, whose default is
`env.device()`. Without a GPU here, CUDA is reported available and the real loader then tries to
move the model to it: this CPU build of torch refuses, and the refusal names CUDA."""

from __future__ import annotations

import pytest
import torch

from embedtune import env
from embedtune.errors import EmbedtuneError

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="GPU present: checks the choice on a machine without CUDA"
)

CUDA_REFUSED = r"(?i)failed to load .*(cuda|nvidia)"


@pytest.fixture
def cuda_reported(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def test_device_is_the_gpu_when_there_is_one(monkeypatch) -> None:
    assert env.device() == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert env.device() == "cuda"


def test_base_scoring_loads_the_model_on_the_gpu(cuda_reported, small_data, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("EMBEDTUNE_HOME", str(tmp_path / "home"))  # no base score kept from another test
    from embedtune.rundir import RunDir
    from embedtune.specs import parse_spec
    from embedtune.sweep.inputs import base_metrics

    spec = parse_spec(
        {"name": "d", "datasets": [{"source": "medquad-sample"}], "models": ["paraphrase-MiniLM-L3-v2"]}
    )
    with pytest.raises(EmbedtuneError, match=CUDA_REFUSED):
        base_metrics(spec, {small_data.label: small_data}, {}, RunDir(tmp_path / "run"))


def test_final_stage_encoding_loads_the_model_on_the_gpu(cuda_reported, small_data, tmp_path) -> None:
    from embedtune.index import build_table
    from embedtune.models import resolve_model

    with pytest.raises(EmbedtuneError, match=CUDA_REFUSED):
        build_table(
            resolve_model("paraphrase-MiniLM-L3-v2"), small_data, tmp_path / "lancedb", progress=False
        )
