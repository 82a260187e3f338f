"""The winner, served: each dataset's served table (LanceDB, its own embedding function), searched by
text from a fresh process, `embedtune search`, and the data lineage of trial runs in MLflow."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from embedtune.records import TrialRecord
from embedtune.rundir import RunDir
from embedtune.specs import DataSpec, EvalSpec, FinalSpec

REPO = Path(__file__).resolve().parent.parent
SEARCH = REPO / "tests" / "served_search.py"


def fresh_search(uri: str, table: str, questions: list[str], tmp: Path, env=None, only_ids=None) -> dict:
    """tests/served_search.py in a new process (see there): top-10 ids per question and more."""
    qfile = tmp / f"questions-{table}.json"
    qfile.write_text(json.dumps({"questions": questions, "only_ids": only_ids}))
    out = subprocess.run(
        [sys.executable, str(SEARCH), uri, table, str(qfile)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def hits_at_10(ranked: list[list[str]], relevant: list[list[str]]) -> list[float]:
    return [1.0 if set(r[:10]) & set(rel) else 0.0 for r, rel in zip(ranked, relevant, strict=True)]


# ---------------------------------------------------------------- lineage (unit, real MLflow store)


def test_trial_runs_log_their_train_and_eval_data_once(tmp_path):
    from mlflow import MlflowClient

    from embedtune.tracking.lineage import data_lineage, log_data_inputs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("lineage")).info.run_id
    specs = [DataSpec(source="medquad-sample", name="medquad"), DataSpec(source="hf:org/qa", name="qa")]
    lineage = data_lineage(specs, {"medquad": "fp-medquad-1", "qa": "fp-qa-2"})
    for _ in range(2):  # a replayed op logs nothing new
        log_data_inputs(uri, run, "medquad", lineage["medquad"])
    inputs = client.get_run(run).inputs.dataset_inputs
    got = {i.dataset.name: (i.dataset.digest, i.tags[0].value, i.dataset.source_type) for i in inputs}
    assert got == {
        "medquad/train": ("fp-medquad-1", "training", "local"),
        "medquad/eval": ("fp-medquad-1", "evaluation", "local"),
    }
    assert all(json.loads(i.dataset.source)["uri"].endswith("medquad_sample.jsonl.gz") for i in inputs)
    assert lineage["qa"]["format"] == "hf" and lineage["qa"]["source"] == "org/qa"


# ---------------------------------------------------------------- the whole corpus


def test_the_whole_corpus_keeps_the_eval_ids_and_adds_every_other_answer():
    from embedtune.data import load_pairs, prepare
    from embedtune.serve import whole_corpus

    spec = DataSpec(source="medquad-sample", name="medquad", max_pairs=120, eval_size=20)
    data = prepare(spec)
    whole = whole_corpus(data, spec)
    assert {k: whole[k] for k in data.corpus} == data.corpus  # eval relevance still points right
    everything = {a for _, a in load_pairs(spec.model_copy(update={"max_pairs": None}))[0]}
    assert set(whole.values()) == everything | set(data.corpus.values())
    assert len(whole) == len(set(whole.values())) > len(data.corpus)
    assert whole_corpus(data, None) == data.corpus


# ---------------------------------------------------------------- the embedding function


def test_import_embedtune_registers_the_function_without_importing_lancedb():
    code = (
        "import sys, embedtune; assert 'lancedb' not in sys.modules, 'import embedtune pulled in LanceDB'; "
        "from lancedb.embeddings import get_registry; print(get_registry().get('embedtune').__module__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "embedtune.lance_function"


def test_a_registry_model_needs_a_tracking_uri_and_a_seeded_one_needs_none(tmp_path, monkeypatch):
    from embedtune.errors import EmbedtuneError
    from embedtune.lance_function import resolve_served_model, seed_cache
    from embedtune.models import resolve_model

    monkeypatch.setenv("EMBEDTUNE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(EmbedtuneError, match="set MLFLOW_TRACKING_URI"):
        resolve_served_model("models:/m/1")
    stored = "sqlite:////somewhere/mlflow.db"
    seeded = seed_cache("models:/m/1", stored, resolve_model("paraphrase-MiniLM-L3-v2"))
    assert resolve_served_model("models:/m/1", stored) == seeded and (seeded / "modules.json").exists()
    with pytest.raises(EmbedtuneError, match="cannot load models:/m/2 from the MLflow registry"):
        resolve_served_model("models:/m/2", f"sqlite:///{tmp_path / 'empty.db'}")


# ---------------------------------------------------------------- table versions


def test_a_new_model_writes_a_new_table_version_and_the_old_one_stays_readable(tmp_path):
    import lancedb

    from embedtune.serve import build_served_table, open_served, search, table_meta

    corpus = {
        "a": "Glaucoma is treated with eye drops, laser treatment or surgery to lower eye pressure.",
        "b": "Paris is the capital and largest city of France.",
        "c": "Anemia is caused by a lack of healthy red blood cells.",
    }
    db = str(tmp_path / "lancedb" / "serve")
    kw = {"tracking_uri": None, "backend": "torch", "max_seq_length": None}
    first = build_served_table(db, "medquad", corpus, model="paraphrase-MiniLM-L3-v2", meta={"n": 1}, **kw)
    again = build_served_table(db, "medquad", corpus, model="paraphrase-MiniLM-L3-v2", meta={"n": 1}, **kw)
    assert again.reused and again.version == first.version
    second = build_served_table(db, "medquad", corpus, model="all-MiniLM-L6-v2", meta={"n": 2}, **kw)
    assert not second.reused and second.version > first.version
    tbl = open_served(str(tmp_path))  # the run dir: its lancedb/serve
    assert table_meta(tbl)["model"] == "all-MiniLM-L6-v2"
    assert search(tbl, "how is glaucoma treated?", k=1)[0]["id"] == "a"
    old = lancedb.connect(db).open_table("medquad")
    old.checkout(first.version)
    assert table_meta(old)["model"] == "paraphrase-MiniLM-L3-v2"
    assert old.search("what causes anemia?").limit(1).to_list()[0]["id"] == "c"
    assert [h["id"] for h in search(tbl, "capital of France", k=2, hybrid=True)][0] == "b"


# ---------------------------------------------------------------- end to end: final stage -> served table


def _qa_file(tmp_path: Path, n: int = 360) -> Path:
    """The first `n` MedQuAD sample pairs as a file: no max_pairs, so the whole corpus is the eval corpus."""
    sample = REPO / "embedtune" / "samples" / "medquad_sample.jsonl.gz"
    rows = [json.loads(line) for line in gzip.open(sample, "rt")][:n]
    path = tmp_path / "medquad-head.jsonl"
    path.write_text(
        "".join(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n" for r in rows)
    )
    return path


def _tuned_trial(dataset: str, base: str, checkpoint: Path) -> TrialRecord:
    m = "ir_mrr_at_10"
    hist = [{"epoch": 0, "metrics": {m: 0.5}}, {"epoch": 1, "metrics": {m: 0.9}}]
    return TrialRecord.from_dict(
        {
            "trial_id": "t1",
            "config_hash": "h-t1",
            "model": base,
            "model_label": base,
            "dataset": dataset,
            "epochs": 1,
            "lr": 2e-5,
            "batch_size": 32,
            "warmup_ratio": 0.1,
            "seed": 42,
            "status": "FINISHED",
            "duration_s": 10.0,
            "gpu_seconds": None,
            "epochs_done": 1,
            "history": hist,
            "best_epoch": 1,
            "best_metrics": hist[1]["metrics"],
            "best_checkpoint": str(checkpoint),
            "mlflow_run_id": None,
        }
    )


@pytest.mark.slow
def test_served_winner_is_searched_from_a_fresh_process_with_the_leaderboards_hit_at_10(tmp_path):
    """run_final_stage (no Ray) on a trial whose checkpoint is a genuinely better model than its base
    (all-MiniLM-L6-v2's weights as a 'fine-tune' of paraphrase-MiniLM-L3-v2), so the verdict is to
    fine-tune and the winner is registered and served as `models:/...`. Leaderboard and served table
    both encode with torch (`final.encode_backend: torch`): one encoder, so the same number."""
    from mlflow import MlflowClient

    from embedtune.data import prepare
    from embedtune.final import run_final_stage
    from embedtune.models import resolve_model

    spec_data = DataSpec(source=str(_qa_file(tmp_path)), name="medquad", eval_size=160)
    data = prepare(spec_data)
    store = tmp_path / "store"
    store.mkdir()
    uri = f"sqlite:///{store / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("serve", artifact_location=(store / "mlartifacts").as_uri())
    parent = client.create_run(exp, run_name="sweep").info.run_id
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "spec.json").write_text(json.dumps({"datasets": [spec_data.model_dump()]}))
    ckpt = tmp_path / "ckpt" / "model"
    shutil.copytree(resolve_model("all-MiniLM-L6-v2"), ckpt)
    base = "paraphrase-MiniLM-L3-v2"
    spec = FinalSpec(
        eval=EvalSpec(query_types=["vector"], rerankers=["none"]),
        cross_encoder=None,
        register_name="embedtune-serve-test",
        probe_size=20,
        encode_backend="torch",
    )
    result = run_final_stage(RunDir(run_dir), [_tuned_trial("medquad", base, ckpt)], {"medquad": data}, {},
                             [base], spec, parent, uri, max_seq_length=128)  # fmt: skip
    assert result.verdicts["medquad"]["verdict"].startswith("Fine-tune"), result.verdicts["medquad"]
    winner = result.dataset_winners["medquad"]
    board = result.leaderboard
    row = board[(board["model"] == winner["model"]) & (board["query_type"] == "vector")].iloc[0]

    served = result.served["medquad"]
    assert served.meta["model"] == "models:/embedtune-serve-test/1" and served.meta["kind"] == "tuned"
    assert served.meta["data_fingerprint"] == data.fingerprint and served.meta["metric"] == "mrr_at_10"
    assert served.rows == len(data.corpus)  # the spec's whole corpus is its eval corpus
    mv = client.get_model_version("embedtune-serve-test", "1")
    assert mv.tags["dataset"] == "medquad" and mv.tags["base_model"] == base
    assert mv.tags["metric"] == "mrr_at_10" and float(mv.tags["gain"]) > 0.03
    assert float(mv.tags["p_value"]) < 0.05 and mv.tags["report"] == str(run_dir / "report")
    assert mv.tags["data_fingerprint"] == data.fingerprint

    # Only the LanceDB files remain: the run dir and the MLflow store are gone.
    db = tmp_path / "elsewhere" / "serve"
    shutil.copytree(run_dir / "lancedb" / "serve", db)
    shutil.rmtree(run_dir)
    shutil.rmtree(store)
    qids = list(data.queries)
    got = fresh_search(str(db), "medquad", [data.queries[q] for q in qids], tmp_path)
    (fn,) = got["functions"]
    assert fn["name"] == "embedtune" and fn["model"]["model"] == "models:/embedtune-serve-test/1"
    assert fn["model"]["backend"] == "torch"
    hits = hits_at_10(got["ranked"], [data.relevant[q] for q in qids])
    assert sum(hits) / len(hits) == row["hit_at_10"]  # the same number, not close
    assert len(got["hybrid"]) == 5 and got["rows"] == len(data.corpus)

    # `embedtune search`: ranked answers with scores; one line for an unknown dataset or no table.
    cli = [sys.executable, "-m", "embedtune.cli", "search"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([*cli, str(db), data.queries[qids[0]], "-k", "3", "--json"], capture_output=True,
                         text=True, env=env, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout)
    assert [h["rank"] for h in found["hits"]] == [1, 2, 3]
    assert [h["id"] for h in found["hits"]] == got["ranked"][0][:3]
    assert found["hits"][0]["score"] >= found["hits"][1]["score"] > 0
    bad = subprocess.run([*cli, str(db), "q", "--dataset", "nope"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "unknown dataset 'nope'" in bad.stderr
    (tmp_path / "empty").mkdir()
    none = subprocess.run([*cli, str(tmp_path / "empty"), "q"], capture_output=True, text=True, env=env)
    assert none.returncode == 2 and none.stderr.count("\n") == 1 and "no served table" in none.stderr
