"""Encoders for every corpus / query pass after training: the final stage's LanceDB ingest and query
encoding (base and tuned models), the do-no-harm check and the familiarity probe. One entry point,
`load_encoder(model_path, backend, device)`; training and trial-time evaluation stay on PyTorch.

Backends (`final.encode_backend`):
- `torch`: the sentence-transformers model as it is (fp32 on CPU).
- `onnx` / `onnx-int8`: the model's transformer exported to ONNX, run by ONNX Runtime; int8 is
  ONNX Runtime's dynamic quantisation (int8 weights, activations quantised per batch).
- `openvino` / `openvino-int8`: the same ONNX graph read by OpenVINO and compiled for the CPU with
  the bf16 inference hint (used where the CPU has bf16 instructions, else OpenVINO runs fp32); int8
  is NNCF's data-free int8 weight compression.
- `auto` (default): `openvino` on a CPU, `torch` on a GPU (measured, see README "Encoder backends").

Why not sentence-transformers' own `backend="onnx"/"openvino"`: they load through Optimum, and no
Optimum release installs next to the pinned transformers 5.24 (optimum-onnx 0.1.0 requires
transformers<4.58, optimum-intel 2.2.0 transformers<5.6; with them absent ST raises "Using the ONNX
backend requires installing Optimum and ONNX Runtime"). So the export is ours and small, and
everything else is still sentence-transformers': the exported graph replaces the Transformer
module's model (as ST's backends do with an Optimum model), so tokenisation, truncation
(`max_seq_length`), length-sorted batching, the model's own Pooling / Dense / Normalize modules and
normalisation are ST's `encode`, unchanged.

Exports are cached per checkpoint under `EMBEDTUNE_HOME/exports/<model identity>/<backend>/`
(`models.model_identity`: content hash of the model folder), built in a temporary folder and
renamed into place (`cache.build_once`); `Encoder.export_seconds` is the time an export took in
this call (0.0 when it was reused).

OpenVINO telemetry: its tools (the model converter, NNCF) send usage data by default when no
consent file (`~/intel/openvino_telemetry`) exists, and openvino-telemetry has no environment
variable to turn that off (only `CI=true`, or the `opt_in_out --opt_out` script, which itself sends
an "opted out" event). `_no_openvino_telemetry` makes the package's consent check answer "declined"
in this process before any OpenVINO / NNCF tool is imported, so nothing is ever sent.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

from embedtune import env
from embedtune.cache import build_once
from embedtune.errors import EmbedtuneError
from embedtune.records import EncodeCost
from embedtune.specs import EncodeBackend

log = logging.getLogger(__name__)

BACKENDS: tuple[str, ...] = tuple(b for b in get_args(EncodeBackend) if b != "auto")
ONNX_FILE = "model.onnx"
OV_FILE = "model.xml"
META_FILE = "export.json"
EXPORT_FORMAT = 1  # bump when an export's content changes, so old exports are not reused
_OPSET = 17


def resolve_backend(backend: str, device: str | None = None) -> str:
    """The backend `auto` stands for on `device` (default: env.device()): `openvino` on a CPU (with
    OpenVINO installed), `torch` on a GPU. Other names are checked and returned."""
    if backend == "auto":
        device = device or env.device()
        if device != "cpu":
            return "torch"
        try:
            import openvino  # noqa: F401
        except ImportError:
            log.warning("encode backend auto: OpenVINO is not installed, using torch (run `make setup`)")
            return "torch"
        return "openvino"
    if backend not in BACKENDS:
        raise EmbedtuneError(
            f"final.encode_backend: unknown backend {backend!r}; use one of auto, {', '.join(BACKENDS)}"
        )
    return backend


# ---------------------------------------------------------------- OpenVINO telemetry off


def _no_openvino_telemetry() -> None:
    """Make openvino-telemetry's consent check answer "declined" in this process (see the module
    docstring): every Telemetry object then has consent False and sends nothing."""
    try:
        from openvino_telemetry.utils import opt_in_checker
    except ImportError:
        return
    checker = opt_in_checker.OptInChecker
    if getattr(checker.check, "_embedtune_declined", False):
        return

    def declined(self, enable_opt_in_dialog: bool = True, disable_in_ci: bool = False):
        return opt_in_checker.ConsentCheckResult.DECLINED

    declined._embedtune_declined = True  # type: ignore[attr-defined]
    checker.check = declined
    # A Telemetry singleton created before the patch (nncf creates one at import) is switched off too.
    try:
        from openvino_telemetry import Telemetry

        instance = getattr(Telemetry, "_SingletonMetaClass__single_instance", None)
        if instance is not None:
            instance.consent = False
    except ImportError:
        pass


# ---------------------------------------------------------------- export


def _model_inputs(st) -> list[str]:
    """The tokenizer outputs the transformer takes (input_ids, attention_mask, token_type_ids, ...)."""
    import inspect

    features = st.preprocess(["a b"])
    params = set(inspect.signature(st[0].model.forward).parameters)
    return [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in features and k in params]


def _export_onnx(st, dest: Path) -> None:
    """torch.onnx.export of the ST model's transformer (eager attention: SDPA does not trace into
    a graph with dynamic shapes) with dynamic batch and sequence axes; output last_hidden_state."""
    import torch

    model = st[0].model
    names = _model_inputs(st)
    old_attn = getattr(model.config, "_attn_implementation", None)
    model.set_attn_implementation("eager")
    features = st.preprocess(["an example sentence to trace", "a second one"])
    args = tuple(features[n].to("cpu") for n in names)

    class _Wrapped(torch.nn.Module):
        def __init__(self, inner) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *inputs):
            return self.inner(**dict(zip(names, inputs, strict=True)), return_dict=True).last_hidden_state

    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    axes["last_hidden_state"] = {0: "batch", 1: "sequence"}
    try:
        model.to("cpu").eval()
        with torch.no_grad(), warnings.catch_warnings():
            # The tracer warns about shape checks in transformers' mask code that are constant for an
            # encoder (no cache); the tests check the graph on other batch sizes and lengths.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message="Exporting aten::index", category=UserWarning)
            torch.onnx.export(
                _Wrapped(model),
                args,
                str(dest / ONNX_FILE),
                input_names=names,
                output_names=["last_hidden_state"],
                dynamic_axes=axes,
                opset_version=_OPSET,
                dynamo=False,
            )
    finally:
        if old_attn:
            model.set_attn_implementation(old_attn)


def _quantize_onnx(src: Path, dest: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Per-channel weights: per-tensor int8 bends MiniLM's embeddings to cosine 0.93 of fp32, per
    # channel keeps them at >= 0.98 (measured on 200 sentences).
    quantize_dynamic(
        str(src / ONNX_FILE), str(dest / ONNX_FILE), weight_type=QuantType.QInt8, per_channel=True
    )


def _export_openvino(src: Path, dest: Path, int8: bool) -> None:
    _no_openvino_telemetry()
    import openvino as ov

    model = ov.Core().read_model(str(src / ONNX_FILE))
    if int8:
        import nncf

        _no_openvino_telemetry()  # nncf creates its Telemetry at import
        model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    ov.save_model(model, str(dest / OV_FILE), compress_to_fp16=False)


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "onnx", "onnxruntime", "openvino", "nncf", "transformers", "sentence-transformers"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def exports_root() -> Path:
    return env.home() / "exports"


def export_dir(model_path: str | Path, backend: str) -> Path:
    from embedtune.models import model_identity

    return exports_root() / f"{model_identity(model_path)}-v{EXPORT_FORMAT}" / backend


def ensure_export(st, model_path: str | Path, backend: str) -> tuple[Path, float]:
    """The export folder of `backend` for the model at `model_path` (`st` is that model, loaded),
    built once; returns (folder, seconds spent exporting in this call, 0.0 when reused). The int8
    and OpenVINO exports start from the fp32 ONNX export (built too, if missing)."""
    if backend == "torch":
        raise ValueError("the torch backend has no export")
    start = time.perf_counter()
    target = export_dir(model_path, backend)

    def build(tmp: Path) -> None:
        if backend == "onnx":
            _export_onnx(st, tmp)
        else:
            onnx_dir, _ = ensure_export(st, model_path, "onnx")
            if backend == "onnx-int8":
                _quantize_onnx(onnx_dir, tmp)
            else:
                _export_openvino(onnx_dir, tmp, int8=backend == "openvino-int8")
        meta = {
            "backend": backend,
            "model_path": str(model_path),
            "seconds": round(time.perf_counter() - start, 3),
            "versions": _versions(),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))

    path, built = build_once(target, build)
    seconds = time.perf_counter() - start if built else 0.0
    if built:
        log.debug("exported %s for %s in %.1f s -> %s", backend, model_path, seconds, path)
    return path, seconds


# ---------------------------------------------------------------- runtime models


class _Output(dict):
    """What ST's Transformer module reads from a model call (`output["last_hidden_state"]`)."""

    @property
    def last_hidden_state(self):
        return self["last_hidden_state"]


def _runtime_module(run, config, names: list[str]):
    """A torch Module that stands in for the transformer inside ST's Transformer module: takes the
    tokenizer's tensors, runs `run({name: int64 array})` (ONNX Runtime / OpenVINO) and returns the
    token embeddings as a float32 tensor."""
    import numpy as np
    import torch

    class RuntimeModel(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = config

        def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, **_: Any) -> _Output:
            given = {
                "input_ids": input_ids,
                "attention_mask": attention_mask,
                "token_type_ids": token_type_ids,
            }
            feed = {}
            for n in names:
                t = given[n]
                if t is None and n == "token_type_ids":
                    t = torch.zeros_like(input_ids)
                feed[n] = np.ascontiguousarray(t.detach().cpu().numpy().astype(np.int64))
            hidden = run(feed)
            return _Output(last_hidden_state=torch.from_numpy(np.asarray(hidden, dtype=np.float32)))

    return RuntimeModel()


def _onnx_runner(folder: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(folder / ONNX_FILE), opts, providers=["CPUExecutionProvider"])
    return lambda feed: session.run(None, feed)[0]


def _openvino_runner(folder: Path, bf16: bool):
    _no_openvino_telemetry()
    import openvino as ov

    core = ov.Core()
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
    if bf16:
        config["INFERENCE_PRECISION_HINT"] = "bf16"
    compiled = core.compile_model(core.read_model(str(folder / OV_FILE)), "CPU", config)
    request = compiled.create_infer_request()
    out = compiled.output(0)
    return lambda feed: request.infer(feed)[out]


# ---------------------------------------------------------------- the encoder


@dataclass
class Encoder:
    """A sentence-transformers model whose transformer runs on `backend`. `encode` returns
    unit-normalised float32 rows (ST's `encode`: length-sorted batches, the model's own pooling);
    `docs` / `seconds` count what it encoded, so a caller can report throughput."""

    model: Any  # the SentenceTransformer (its transformer swapped for the backend's runtime)
    backend: str
    path: Path
    device: str
    export_seconds: float = 0.0
    size_bytes: int = 0  # on disk: the model folder (torch) or the export the backend runs
    docs: int = field(default=0, init=False)
    seconds: float = field(default=0.0, init=False)

    @property
    def dim(self) -> int:
        get = (
            getattr(self.model, "get_embedding_dimension", None)
            or self.model.get_sentence_embedding_dimension
        )
        return int(get() or len(self.encode(["x"])[0]))

    @property
    def max_seq_length(self) -> int | None:
        return self.model.max_seq_length

    def truncate(self, max_seq_length: int | None) -> None:
        from embedtune.models import truncate

        truncate(self.model, max_seq_length)

    def encode(self, texts: Sequence[str], batch_size: int = 64):
        import numpy as np

        start = time.perf_counter()
        vecs = self.model.encode(
            list(texts),
            batch_size=batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        self.seconds += time.perf_counter() - start
        self.docs += len(texts)
        return np.asarray(vecs, dtype=np.float32)

    def docs_per_s(self, texts: Sequence[str], batch_size: int = 64, sample: int = 96) -> float:
        """Throughput on (up to `sample` of) `texts`, after a warm-up on a few of them."""
        import random

        texts = list(texts)
        if len(texts) > sample:
            texts = random.Random(0).sample(texts, sample)
        self.model.encode(texts[:8], batch_size=batch_size, show_progress_bar=False)  # threads, caches
        start = time.perf_counter()
        self.model.encode(texts, batch_size=batch_size, show_progress_bar=False)
        return len(texts) / max(time.perf_counter() - start, 1e-9)

    def cost(self, docs_per_s: float) -> EncodeCost:
        return EncodeCost(
            encode_backend=self.backend,
            docs_per_s=round(float(docs_per_s), 2),
            dim=self.dim,
            size_mb=round(self.size_bytes / 2**20, 2),
            export_s=round(self.export_seconds, 2),
        )


def as_encoder(model: Any, model_path: str | Path) -> Encoder:
    """`model` as an Encoder: an Encoder as it is, a loaded SentenceTransformer as the torch backend."""
    if isinstance(model, Encoder):
        return model
    path = Path(model_path)
    return Encoder(model, "torch", path, str(model.device), size_bytes=_model_size(path))


def _model_size(path: Path) -> int:
    """Bytes of a model folder as a deployment ships it (no trainer checkpoints, no hidden files)."""
    total = 0
    for p in path.rglob("*"):
        rel = p.relative_to(path).as_posix()
        if p.is_file() and not rel.startswith(("checkpoint-", "runs/", ".")) and "/." not in rel:
            total += p.stat().st_size
    return total


def load_encoder(model_path: str | Path, backend: str = "auto", device: str | None = None) -> Encoder:
    """An `Encoder` for the sentence-transformers folder at `model_path` on `backend` (see the
    module docstring; `auto`: openvino on a CPU, torch on a GPU). Non-torch backends run on the CPU
    (a GPU machine gets a warning); their export is made once per checkpoint and cached."""
    from embedtune.models import check_model, load_model

    device = device or env.device()
    backend = resolve_backend(backend, device)
    path = check_model(model_path)
    if backend == "torch":
        st = load_model(path, device=device)
        return Encoder(st, backend, path, device, size_bytes=_model_size(path))
    if device != "cpu":
        log.warning("encode backend %s runs on the CPU; on a GPU machine use torch (or auto)", backend)
    st = load_model(path, device="cpu")
    names = _model_inputs(st)
    folder, seconds = ensure_export(st, path, backend)
    if backend.startswith("onnx"):
        run = _onnx_runner(folder)
    else:
        run = _openvino_runner(folder, bf16=backend == "openvino")
    st[0].model = _runtime_module(run, st[0].model.config, names)  # the torch weights are freed
    size = sum(p.stat().st_size for p in folder.iterdir() if p.name != META_FILE and p.is_file())
    return Encoder(st, backend, path, "cpu", export_seconds=seconds, size_bytes=size)
