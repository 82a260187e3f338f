"""Small real sweep specs shared by the tests (MedQuAD sample, tiny model budget)."""

from __future__ import annotations

TINY_DATA = {
    "name": "medquad",
    "source": "medquad-sample",
    "max_pairs": 200,
    "eval_size": 30,
    "max_train_pairs": 48,
}


# A final stage reduced to vector search on the datasets themselves: no cross-encoder, registry,
# probe or runners-up (what a test of the trials' side of a sweep needs).
VECTOR_ONLY_FINAL = {
    "cross_encoder": None,
    "registry": False,
    "probe_size": 0,
    "top_k": 0,
    "eval": {"query_types": ["vector"], "rerankers": ["none"]},
}


def tiny_spec(name: str, **overrides) -> dict:
    raw = {
        "name": name,
        "datasets": [TINY_DATA],
        "models": ["all-MiniLM-L6-v2", "paraphrase-MiniLM-L3-v2"],
        "search": {"epochs": [1, 2], "batch_size": [16], "lr": [5e-5]},
        "train": {"max_seq_length": 48},
        "scheduler": {"type": "none"},
        "max_concurrent_trials": 2,
        "checkpoints": {"keep": 1},
        "final": {"enabled": False},
    }
    raw.update(overrides)
    if isinstance(raw.get("search"), dict):  # the full small grid unless a test names its mode
        raw["search"] = {"mode": "grid", **raw["search"]}
    return raw


def trial_record(trial_id: str, **fields):
    """A `TrialRecord` for tests of the driver's and the final stage's own logic: a finished 1-epoch
    trial of paraphrase-MiniLM-L3-v2 on medquad unless `fields` say otherwise."""
    from embedtune.records import TrialRecord

    values = {
        "trial_id": trial_id,
        "config_hash": f"h-{trial_id}",
        "model": "paraphrase-MiniLM-L3-v2",
        "model_label": "paraphrase-MiniLM-L3-v2",
        "dataset": "medquad",
        "epochs": 1,
        "lr": 5e-5,
        "batch_size": 16,
        "warmup_ratio": 0.1,
        "seed": 42,
        "status": "FINISHED",
    }
    return TrialRecord(**{**values, **fields})
