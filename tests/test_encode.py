"""Encoder backends (embedtune.encode) on a real packaged model and real data: each backend's
embeddings against PyTorch's, the export cache, `auto`, the spec field, OpenVINO telemetry, and
the encode cost that evaluate_models reports."""

from __future__ import annotations

import numpy as np
import pytest

from embedtune.encode import BACKENDS, ONNX_FILE, export_dir, load_encoder, resolve_backend
from embedtune.errors import EmbedtuneError
from embedtune.models import resolve_model

MODEL = "paraphrase-MiniLM-L3-v2"  # the smallest packaged model: exports take seconds


@pytest.fixture(scope="module")
def texts(small_data):
    """Real MedQuAD questions and answers (answers truncated by the model to its 128 tokens)."""
    queries = list(small_data.queries.values())[:60]
    docs = list(small_data.corpus.values())[:240]
    return queries, docs


@pytest.fixture(scope="module")
def torch_vectors(texts):
    enc = load_encoder(resolve_model(MODEL), "torch", device="cpu")
    queries, docs = texts
    return enc.encode(queries), enc.encode(docs)


def _top10(q, d):
    return np.argsort(-(q @ d.T), axis=1)[:, :10]


@pytest.mark.parametrize("backend", ["onnx", "openvino", "onnx-int8", "openvino-int8"])
def test_backend_embeddings_agree_with_torch(backend, texts, torch_vectors):
    enc = load_encoder(resolve_model(MODEL), backend, device="cpu")
    assert enc.backend == backend and enc.dim == 384
    queries, docs = texts
    q, d = enc.encode(queries), enc.encode(docs)
    tq, td = torch_vectors
    assert q.shape == tq.shape and d.shape == td.shape and q.dtype == np.float32
    assert np.allclose(np.linalg.norm(d, axis=1), 1.0, atol=1e-3)  # normalised like ST's output
    cos = np.concatenate([(q * tq).sum(1), (d * td).sum(1)])
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(_top10(q, d), _top10(tq, td), strict=True)])
    if backend.endswith("int8"):
        # int8 weights move embeddings measurably but must keep retrieval nearly the same
        assert cos.min() >= 0.95 and cos.mean() >= 0.98, (cos.min(), cos.mean())
        assert overlap >= 0.8, overlap
    else:
        assert cos.min() >= 0.99, cos.min()  # fp32 graph (onnx) / bf16 arithmetic (openvino)
        assert overlap >= 0.9, overlap
    # the same texts in another order give the same rows (ST's length-sorted batching restores order)
    again = enc.encode(docs[::-1])[::-1]
    assert np.allclose(again, d, atol=2e-2 if backend.startswith("openvino") else 1e-4)


def test_int8_exports_are_smaller_and_agree_with_their_own_fp_export(texts):
    path = resolve_model(MODEL)
    fp, q8 = load_encoder(path, "onnx", "cpu"), load_encoder(path, "onnx-int8", "cpu")
    assert q8.size_bytes < fp.size_bytes / 2  # int8 weights: about a quarter of fp32
    assert 10 * 2**20 < fp.size_bytes < 200 * 2**20


def test_export_is_cached_per_checkpoint(tmp_path, monkeypatch, texts):
    path = resolve_model(MODEL)  # resolved from the shared home before the home moves
    monkeypatch.setenv("EMBEDTUNE_HOME", str(tmp_path / "home"))
    first = load_encoder(path, "onnx", "cpu")
    folder = export_dir(path, "onnx")
    assert first.export_seconds > 0 and (folder / ONNX_FILE).exists()
    assert folder.is_relative_to(tmp_path / "home" / "exports")
    stamp = (folder / ONNX_FILE).stat().st_mtime_ns
    second = load_encoder(path, "onnx", "cpu")
    assert second.export_seconds == 0.0  # reused, not exported again
    assert (folder / ONNX_FILE).stat().st_mtime_ns == stamp
    assert np.allclose(first.encode(texts[0][:5]), second.encode(texts[0][:5]), atol=1e-6)
    # openvino starts from the cached ONNX export: only its own conversion is new
    ov = load_encoder(path, "openvino", "cpu")
    assert ov.export_seconds > 0 and (folder / ONNX_FILE).stat().st_mtime_ns == stamp
    # one folder per checkpoint identity, one subfolder per backend
    assert sorted(p.name for p in folder.parent.iterdir() if not p.name.startswith(".")) == [
        "onnx",
        "openvino",
    ]
    assert sorted(
        p.name for p in (tmp_path / "home" / "exports").iterdir() if not p.name.startswith(".")
    ) == [folder.parent.name]


def test_auto_is_openvino_on_cpu_and_torch_on_gpu():
    assert resolve_backend("auto", "cpu") == "openvino"
    assert resolve_backend("auto", "cuda") == "torch"
    assert set(BACKENDS) == {"torch", "onnx", "onnx-int8", "openvino", "openvino-int8"}
    with pytest.raises(EmbedtuneError, match="final.encode_backend"):
        resolve_backend("tensorrt", "cpu")


def test_a_bad_backend_fails_at_spec_load_naming_the_field():
    from specs import tiny_spec

    from embedtune.specs import parse_spec

    assert parse_spec(tiny_spec("enc")).final.encode_backend == "auto"
    ok = parse_spec(tiny_spec("enc", final={"enabled": False, "encode_backend": "onnx-int8"}))
    assert ok.final.encode_backend == "onnx-int8"
    with pytest.raises(EmbedtuneError, match=r"final\.encode_backend.*'onnx-int16'"):
        parse_spec(tiny_spec("enc", final={"enabled": False, "encode_backend": "onnx-int16"}), "s.yaml")


def test_openvino_telemetry_never_has_consent():
    """NNCF and the OpenVINO converter send usage data when no consent file exists; after an
    OpenVINO int8 export in this process the telemetry's consent check says declined."""
    load_encoder(resolve_model(MODEL), "openvino-int8", "cpu")
    from openvino_telemetry import Telemetry
    from openvino_telemetry.utils.opt_in_checker import ConsentCheckResult, OptInChecker

    assert OptInChecker().check(enable_opt_in_dialog=False) == ConsentCheckResult.DECLINED
    # nncf's instance: created when nncf was imported
    instance = Telemetry._SingletonMetaClass__single_instance
    assert instance is None or instance.consent is False


def test_evaluate_models_reports_encode_cost_and_matches_torch(tmp_path, small_data):
    from embedtune.evaluate import evaluate_models
    from embedtune.index import connect
    from embedtune.records import ENCODE_COST_COLUMNS, ModelEntry
    from embedtune.specs import EvalSpec

    entry = ModelEntry(MODEL, str(resolve_model(MODEL)), MODEL)
    spec = EvalSpec(query_types=["vector"], rerankers=["none"])
    db = str(tmp_path / "db")
    rows = {
        b: evaluate_models([entry], small_data, spec, db, progress=False, encode_backend=b).iloc[0]
        for b in ("torch", "openvino")
    }
    for backend, row in rows.items():
        assert set(ENCODE_COST_COLUMNS) <= set(row.index)
        assert row["encode_backend"] == backend and row["dim"] == 384
        assert 1 < row["docs_per_s"] < 100_000 and 10 < row["size_mb"] < 200
    assert abs(rows["openvino"]["hit_at_10"] - rows["torch"]["hit_at_10"]) <= 0.03
    names = connect(db).list_tables().tables
    assert len(names) == 2 and sum(n.endswith("__bopenvino") for n in names) == 1
    # reused table: the throughput is measured on a corpus sample, still a positive rate
    again = evaluate_models([entry], small_data, spec, db, progress=False, encode_backend="openvino")
    assert again.iloc[0]["docs_per_s"] > 1 and again.iloc[0]["hit_at_10"] == rows["openvino"]["hit_at_10"]
