"""How familiar a dataset already is to a base model ("should you fine-tune?" and "already seen"),
measured with the base model alone: nearest-question similarities, zero-shot hit@10 on train vs eval
questions, near-duplicate eval questions, and the training datasets its model card lists."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

from embedtune.data import PreparedData
from embedtune.records import number
from embedtune.stats import N_BOOT

log = logging.getLogger(__name__)

DUP_THRESHOLD = 0.95  # base-model cosine at or above which an eval question near-duplicates a train question
DUP_POOL = 5000  # train questions encoded for the near-duplicate check at most (exact matches: all of them)
SEEN_DUP_RATE = 0.05  # near-duplicate share of eval questions that counts as "already seen"
# A high zero-shot score on the training questions alone says "easy", not "seen": an unseen easy set
# scores high on both. Memorisation shows as training questions answered *better* than comparable
# held-out ones: the train-minus-eval gap of zero-shot hit@10 with its 95% interval above this.
SEEN_GAP = 0.0


def normalize_question(text: str) -> str:
    """Exact-match key of a question: lowercase, punctuation dropped, whitespace collapsed."""
    import re
    import unicodedata

    text = unicodedata.normalize("NFKC", str(text)).lower()
    return " ".join(re.sub(r"[\W_]+", " ", text).split())


def near_duplicates(
    eval_questions: list[str],
    train_questions: list[str],
    eval_vecs=None,
    train_vecs=None,
    threshold: float = DUP_THRESHOLD,
    examples: int = 3,
) -> dict[str, Any]:
    """How many eval questions already occur among the training questions:
    - `exact_dup_rate`: share whose normalised text (`normalize_question`) equals a train question's;
    - `near_dup_rate`: share that is an exact match or whose nearest train question has cosine >=
      `threshold` (needs unit-normalised `eval_vecs` / `train_vecs` rows aligned with the question
      lists; `train_vecs` may cover only the first rows of `train_questions`).
    `dup_examples`: a few (eval question, train question, cosine) near-duplicates that are not exact."""
    import numpy as np

    keys = {normalize_question(q) for q in train_questions}
    exact = [normalize_question(q) in keys for q in eval_questions]
    near = list(exact)
    found: list[dict[str, Any]] = []
    if eval_vecs is not None and train_vecs is not None and len(eval_vecs) and len(train_vecs):
        sims = np.asarray(eval_vecs) @ np.asarray(train_vecs).T
        best, arg = sims.max(axis=1), sims.argmax(axis=1)
        for i, (s, j) in enumerate(zip(best, arg, strict=True)):
            if s >= threshold:
                near[i] = True
                if not exact[i] and len(found) < examples:
                    found.append(
                        {
                            "eval": eval_questions[i],
                            "train": train_questions[int(j)],
                            "cosine": round(float(s), 4),
                        }
                    )
    n = len(eval_questions)
    return {
        "exact_dup_rate": sum(exact) / n if n else float("nan"),
        "near_dup_rate": sum(near) / n if n else float("nan"),
        "n_exact_dups": int(sum(exact)),
        "n_near_dups": int(sum(near)),
        "dup_threshold": threshold,
        "dup_examples": found,
    }


_GENERIC_WORDS = {"the", "stack", "natural", "simple", "code", "sentence", "common", "wiki", "question",
                  "questions", "answer", "answers", "data", "dataset", "pairs", "sample", "train", "test"}  # fmt: skip


def _name_key(text: str) -> str:
    """Compact comparison key of a dataset name: lowercase alphanumerics, a trailing version dropped
    (`SQuAD2.0`, `squad_v1.1` -> `squad`)."""
    import re

    text = re.sub(r"[\s_-]*(v\d+(\.\d+)*|\d+\.\d+)$", "", str(text).strip().lower())
    return re.sub(r"[^a-z0-9]+", "", text)


def card_datasets(model_dir: str | Path) -> list[str]:
    """Training datasets a model card (`README.md` of the model folder) names: its front matter's
    `datasets:` list and the first-column link texts of its tables (the sentence-transformers cards
    list their training data that way, e.g. `[SQuAD2.0](...)`). Empty without a card."""
    import re

    card = Path(model_dir) / "README.md"
    if not card.is_file():
        return []
    text = card.read_text(encoding="utf-8", errors="replace")
    names: list[str] = []
    front = re.match(r"---\s*\n(.*?)\n---\s*\n", text, re.S)
    if front:
        block = re.search(r"^datasets:\s*\n((?:[ \t]*-[^\n]*\n?)+)", front.group(1) + "\n", re.M)
        if block:
            names += [ln.strip()[1:].strip().strip("'\"") for ln in block.group(1).splitlines() if ln.strip()]
    for row in re.findall(r"^\|\s*\[([^\]]+)\]\([^)]*\)\s*\|", text, re.M):
        if row.strip().lower() not in {"paper", "link", "dataset"}:
            names.append(row.strip())
    return list(dict.fromkeys(n for n in names if n))


def card_matches(card_names: list[str], dataset_names: list[str]) -> list[str]:
    """The card's dataset names that name the fine-tuning data (its label or source: a sample name,
    a path, a hub id). A card name matches on its compact key (`ms_marco` ~ `hf:microsoft/ms_marco`)
    or its first word when that is specific (`SQuAD2.0` ~ `squad-sample`, `GOOAQ: Open ...` ~ `gooaq`)."""
    import re

    tokens: set[str] = set()
    for name in dataset_names:
        for part in re.split(r"[/\\:]+", str(name).lower()):
            for piece in (part, re.sub(r"\.(jsonl|json|parquet|csv|gz)$", "", part)):
                tokens.add(_name_key(piece))
            tokens.update(_name_key(t) for t in re.split(r"[^a-z0-9.]+", part) if t)
    tokens.discard("")
    out, seen = [], set()
    for name in card_names:
        base = re.sub(r"\([^)]*\)", " ", name.split("/")[-1]).split(":")[0]
        keys = {_name_key(base)}
        if _name_key(base) in seen:  # the same dataset named twice (front matter and table)
            continue
        words = [w for w in re.split(r"[^A-Za-z0-9.]+", base) if w]
        if words:
            first = _name_key(words[0])
            if len(first) >= 3 and first not in _GENERIC_WORDS:
                keys.add(first)
        if any(len(k) >= 3 and k in tokens for k in keys):
            out.append(name)
            seen.add(_name_key(base))
    return out


def gap_interval(train_hits, eval_hits, n_boot: int = N_BOOT, seed: int = 0) -> tuple[float, float, float]:
    """Train-minus-eval difference of mean zero-shot hits and its 95% bootstrap interval (the two
    samples are independent questions, so each is resampled on its own)."""
    import numpy as np

    t, e = np.asarray(train_hits, dtype=float), np.asarray(eval_hits, dtype=float)
    if not len(t) or not len(e):
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    diffs = rng.choice(t, (n_boot, len(t))).mean(axis=1) - rng.choice(e, (n_boot, len(e))).mean(axis=1)
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return float(t.mean() - e.mean()), float(lo), float(hi)


def seen_verdict(probe: dict[str, Any] | None) -> str | None:
    """One line: has the base model likely seen the fine-tuning data already? Evidence of
    memorisation only: its model card lists the data, eval questions near-duplicate training
    questions, or the training questions are answered better zero-shot than the eval questions
    beyond noise (the gap's 95% interval above SEEN_GAP). A high score on both is "easy", not seen."""
    if not probe:
        return None
    signs, numbers = [], []
    matched = probe.get("card_matches") or []
    if matched:
        signs.append(f"its model card lists {', '.join(matched)} among its training data")
    train_hit, eval_hit = number(probe.get("train_hit_at_10")), number(probe.get("eval_hit_at_10"))
    if train_hit is not None and eval_hit is not None:
        gap_lo, gap_hi = number(probe.get("gap_lo")), number(probe.get("gap_hi"))
        interval = f", gap 95% interval [{gap_lo:+.2f}, {gap_hi:+.2f}]" if gap_lo is not None else ""
        numbers.append(
            f"zero-shot hit@10 on train questions {train_hit:.2f} vs eval {eval_hit:.2f}{interval}"
        )
        if gap_lo is not None and gap_lo > SEEN_GAP:
            signs.append(
                f"it answers the training questions better than comparable held-out ones "
                f"({train_hit:.2f} vs {eval_hit:.2f}, beyond noise)"
            )
    near, exact = number(probe.get("near_dup_rate")), number(probe.get("exact_dup_rate"))
    if near is not None:
        thr = probe.get("dup_threshold", DUP_THRESHOLD)
        numbers.append(
            f"{near:.1%} of eval questions near-duplicate a train question (cosine >= {thr}; "
            f"{exact or 0:.1%} exact after normalising)"
        )
        if near >= SEEN_DUP_RATE:
            signs.append(f"{near:.0%} of the eval questions near-duplicate training questions")
    if not numbers and not signs:
        return None
    detail = f" ({'; '.join(numbers)})" if numbers else ""
    if signs:
        return f"Already seen: likely — {'; '.join(signs)}{detail}."
    card = "" if probe.get("card_datasets") else "; no model card to check"
    return f"Already seen: no sign of it{card}{detail}."


def fine_tune_probe(
    data: PreparedData,
    model_path: str,
    sample: int = 200,
    corpus_size: int = 1000,
    seed: int = 0,
    dup_threshold: float = DUP_THRESHOLD,
    encode_backend: str = "torch",
) -> dict[str, Any]:
    """How familiar the data already is to a base model, measured with the base model alone:
    - `eval_to_train_sim`: mean cosine similarity of each eval question to its nearest train
      question; `train_to_train_sim`: the same for train questions among themselves (nearest other
      train question). Eval close to train-to-train: the eval questions look like the training
      questions, so what training teaches can carry over; well below: training fits another
      distribution than the one that is evaluated, and gains there need not transfer.
    - `train_hit_at_10` / `eval_hit_at_10`: the base model's zero-shot hit@10 for a sample of train
      and of eval questions, both over the same corpus (their answers plus distractors from the
      eval corpus, `corpus_size` documents at most). A high train score says the base model
      already handles the very pairs fine-tuning would train on: little left to learn there.
    - near-duplicates (`near_duplicates`): the sampled eval questions against the train questions,
      exact after `normalize_question` (all train questions) and by base-model cosine >=
      `dup_threshold` (the first DUP_POOL train questions of a seeded order).
    Everything is encoded on `encode_backend` (`embedtune.encode`; the report passes
    `final.encode_backend`)."""
    import numpy as np

    from embedtune.encode import load_encoder

    rng = random.Random(seed)
    train_q = list(dict.fromkeys(q for q, _ in data.train))
    pool = rng.sample(train_q, min(len(train_q), sample * 3))
    eval_ids = sorted(data.queries)
    eval_ids = rng.sample(eval_ids, min(len(eval_ids), sample))
    encoder = load_encoder(model_path, encode_backend)

    def enc(texts: list[str]):
        return encoder.encode(texts, batch_size=64)

    p = enc(pool)
    e = enc([data.queries[q] for q in eval_ids])
    eval_sim = float((e @ p.T).max(axis=1).mean()) if len(pool) else float("nan")
    sub = min(len(pool), sample)
    tt = p[:sub] @ p.T
    tt[np.arange(sub), np.arange(sub)] = -np.inf  # nearest *other* train question
    train_sim = float(tt.max(axis=1).mean()) if len(pool) > 1 else float("nan")
    in_pool = set(pool)
    rest = [q for q in train_q if q not in in_pool]
    random.Random(seed + 1).shuffle(rest)  # its own generator: the samples below stay as they were
    rest = rest[: max(0, DUP_POOL - len(pool))]
    dup_train = pool + rest
    dup_vecs = np.vstack([p, enc(rest)]) if rest else p
    encoded = set(dup_train)
    not_encoded = [q for q in train_q if q not in encoded]  # exact matches only
    eval_texts = [data.queries[q] for q in eval_ids]
    dups = near_duplicates(eval_texts, dup_train + not_encoded, e, dup_vecs, dup_threshold)

    # zero-shot hit@10 on train vs eval questions over one shared corpus
    answers_of: dict[str, set[str]] = {}
    for q, a in data.train:
        answers_of.setdefault(q, set()).add(a)
    train_s = pool[:sub]
    eval_s = [(data.queries[q], {data.corpus[c] for c in data.relevant.get(q, [])}) for q in eval_ids]
    needed = list(
        dict.fromkeys(
            [a for q in train_s for a in sorted(answers_of[q])] + [a for _, r in eval_s for a in sorted(r)]
        )
    )
    others = [t for t in data.corpus.values() if t not in set(needed)]
    docs = needed + rng.sample(others, max(0, min(len(others), corpus_size - len(needed))))
    index = {t: i for i, t in enumerate(docs)}
    d = enc(docs)

    def hits10(questions: list[str], qvecs, relevant: list[set[str]]) -> list[float]:
        if not questions:
            return []
        top = np.argsort(-(qvecs @ d.T), axis=1)[:, :10]
        return [
            float(bool({index[a] for a in rel} & set(row.tolist())))
            for row, rel in zip(top, relevant, strict=True)
        ]

    train_hits = hits10(train_s, p[:sub], [answers_of[q] for q in train_s])
    eval_hits = hits10([q for q, _ in eval_s], e, [r for _, r in eval_s])
    gap, gap_lo, gap_hi = gap_interval(train_hits, eval_hits, seed=seed)

    return {
        "model_path": str(model_path),
        "eval_to_train_sim": eval_sim,
        "train_to_train_sim": train_sim,
        "train_hit_at_10": float(np.mean(train_hits)) if train_hits else float("nan"),
        "eval_hit_at_10": float(np.mean(eval_hits)) if eval_hits else float("nan"),
        "gap": gap,
        "gap_lo": gap_lo,
        "gap_hi": gap_hi,
        "n_train": sub,
        "n_eval": len(eval_ids),
        "n_docs": len(docs),
        "n_train_questions": len(train_q),
        "n_dup_encoded": len(dup_train),
        "encode_backend": encoder.backend,
        **dups,
    }


def probe_all(
    cache: dict[str, dict],
    board,
    datasets: dict[str, PreparedData],
    probe_size: int,
    sources: dict[str, list[str]],
    encode_backend: str = "torch",
) -> dict[str, dict]:
    """Probe each (dataset, base model) of the leaderboard; `cache` (report/probe.json, by data
    fingerprint and model path) is updated in place. `sources`: dataset label -> its data sources
    (matched against model cards). `encode_backend`: see `fine_tune_probe`."""
    out: dict[str, dict] = {}
    bases = board[board["kind"] == "base"][["dataset", "model", "model_path"]].drop_duplicates(
        ["dataset", "model"]
    )
    for ds, model, path in bases.itertuples(index=False):
        data = datasets.get(ds)
        key = f"{ds}|{model}|{data.fingerprint if data else ''}|{probe_size}|gap"
        have = Path(str(path)).exists()
        if key not in cache and data is not None and probe_size > 0 and have:
            try:
                cache[key] = fine_tune_probe(
                    data, str(path), sample=probe_size, encode_backend=encode_backend
                )
            except Exception as exc:  # a probe failure must not lose the leaderboard
                log.warning("fine-tune probe of %s on %s failed: %s", model, ds, exc)
        if key in cache and have:  # cheap: refresh the card (a stored one survives without the model)
            names = card_datasets(str(path))
            matched = card_matches(names, [ds, *sources.get(ds, [])])
            cache[key] |= {"card_datasets": names, "card_matches": matched}
        if key in cache:
            out[f"{ds}|{model}"] = cache[key]
    return out
