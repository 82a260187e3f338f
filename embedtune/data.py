"""Question→answer pairs: load, map columns, clean, de-duplicate, split leak-free, fingerprint.

Sources: a packaged sample name (`medquad-sample`, `squad-sample`), a local JSONL(.gz) /
Parquet / CSV file, a BEIR folder (corpus.jsonl[.gz], queries.jsonl, qrels/<split>.tsv), or a
Hugging Face dataset (`hf:org/name`, or `format: hf`) loaded with `datasets.load_dataset`, or a
folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk` (`hf:<dir>`).

The split is leak-free by construction: pairs are grouped into connected components over shared
text (union-find; a text links pairs whether it is a question or an answer), and whole components
go to eval or train. So no eval question, and no answer of an eval question, ever appears in
training, on either side of a pair. Eval for
retrieval = the held-out questions + a corpus of distinct answers (train answers stay in the
corpus as distractors unless told otherwise); a question is relevant to every answer it was
paired with.
"""

from __future__ import annotations

import csv
import gzip
import itertools
import json
import random
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

from embedtune.cache import stable_hash
from embedtune.errors import EmbedtuneError
from embedtune.specs import DataSpec

SAMPLES = {
    "medquad-sample": "medquad_sample.jsonl.gz",
    "squad-sample": "squad_sample.jsonl.gz",
    # 1,000 SQuAD train paragraphs, one question each: an out-of-domain set (final.ood) with the
    # power to see a 1-point loss (the SQuAD sample's 1,203 questions share 216 paragraphs)
    "squad-paragraphs-sample": "squad_paragraphs_sample.jsonl.gz",
    "scifact-sample": "scifact_sample",  # a BEIR folder: out-of-domain checks (final.ood)
}
# Bump when the split or corpus construction changes, so every derived artefact is re-made.
SPLIT_VERSION = 2


@dataclass
class PreparedData:
    """A split dataset: train pairs, held-out eval pairs, and the retrieval view of eval."""

    fingerprint: str
    label: str
    train: list[tuple[str, str]]
    eval_pairs: list[tuple[str, str]]
    queries: dict[str, str]  # qid -> question (held out)
    corpus: dict[str, str]  # cid -> distinct answer text
    relevant: dict[str, list[str]]  # qid -> cids of its answers
    counts: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> PreparedData:
        raw = dict(raw)
        raw["train"] = [tuple(p) for p in raw["train"]]
        raw["eval_pairs"] = [tuple(p) for p in raw["eval_pairs"]]
        return cls(**raw)


# ---------------------------------------------------------------- loading


def resolve_source(spec: DataSpec) -> tuple[Path | str, str]:
    """Return (path or hub id, format)."""
    src = spec.source.strip()
    if src in SAMPLES:
        path = Path(str(resources.files("embedtune") / "samples" / SAMPLES[src]))
        return path, "beir" if path.is_dir() else "jsonl"
    if src.startswith("hf:") or spec.format == "hf":
        return src.removeprefix("hf:"), "hf"
    path = Path(src).expanduser()
    if not path.exists():
        raise EmbedtuneError(
            f"data file not found: {src} (pass an existing file, a sample name "
            f"({', '.join(SAMPLES)}), or hf:<dataset id>)"
        )
    fmt = spec.format
    if fmt == "auto":
        name = path.name.lower()
        if path.is_dir():
            fmt = "beir" if (path / "qrels").is_dir() else "hf"
        elif name.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz")):
            fmt = "jsonl"
        elif name.endswith(".parquet"):
            fmt = "parquet"
        elif name.endswith((".csv", ".csv.gz")):
            fmt = "csv"
        else:
            raise EmbedtuneError(
                f"cannot tell the format of {src}: use .jsonl[.gz], .parquet or .csv, or set format"
            )
    return path, fmt


def _open_text(path: Path):
    return (
        gzip.open(path, "rt", encoding="utf-8") if path.name.endswith(".gz") else open(path, encoding="utf-8")
    )


def _read_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    rows: list[dict] = []
    with _open_text(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            if limit is not None and len(rows) >= limit:
                break
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise EmbedtuneError(
                    f"{path}:{lineno}: not valid JSON ({exc.msg}); expected one object per line"
                ) from exc
    return rows


def _read_rows(target: Path | str, fmt: str, spec: DataSpec, limit: int | None = None) -> list[dict]:
    """Every row (or the first `limit`, with every column: what `sample_rows` shows)."""
    try:
        if fmt == "jsonl":
            return _read_jsonl(Path(target), limit)
        if fmt == "csv":
            with _open_text(Path(target)) as fh:
                return list(itertools.islice(csv.DictReader(fh), limit))
        if fmt == "parquet":
            import pyarrow.parquet as pq

            if limit is None:
                return pq.read_table(target).to_pylist()
            first = next(pq.ParquetFile(target).iter_batches(batch_size=limit), None)
            return first.to_pylist() if first is not None else []
        if fmt == "hf":
            return _read_hf(str(target), spec, limit)
    except UnicodeDecodeError as exc:
        raise EmbedtuneError(
            f"{target} is not UTF-8 text ({exc.reason} at byte {exc.start}); re-encode it as UTF-8"
        ) from exc
    except EmbedtuneError:
        raise
    except Exception as exc:  # pyarrow / csv parse errors
        raise EmbedtuneError(
            f"cannot read {target} as {fmt}: {type(exc).__name__}: {exc}".splitlines()[0]
        ) from exc
    raise EmbedtuneError(f"unsupported format {fmt!r}")


def _read_hf(dataset_id: str, spec: DataSpec, limit: int | None = None) -> list[dict]:
    import datasets

    saved = Path(dataset_id)
    try:
        if saved.is_dir() and any((saved / f).exists() for f in ("dataset_info.json", "dataset_dict.json")):
            ds = datasets.load_from_disk(dataset_id)  # a `save_to_disk` folder (Dataset or DatasetDict)
            if isinstance(ds, datasets.DatasetDict):
                if spec.hf_split not in ds:
                    raise EmbedtuneError(
                        f"split {spec.hf_split!r} not in {dataset_id}; available splits: {', '.join(ds)} (set hf_split)"
                    )
                ds = ds[spec.hf_split]
        else:
            ds = datasets.load_dataset(dataset_id, spec.hf_config, split=spec.hf_split)
    except EmbedtuneError:
        raise
    except Exception as exc:
        raise EmbedtuneError(
            f"Hugging Face dataset {dataset_id!r} (split {spec.hf_split!r}) could not be loaded: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
            "(offline? set HF_DATASETS_OFFLINE=0 with internet, or use a local file)"
        ) from exc
    if limit is not None:
        return ds.select(range(min(limit, len(ds)))).to_list()
    missing = [c for c in (spec.question_column, spec.answer_column) if c not in ds.column_names]
    if missing:
        raise _column_error(missing, ds.column_names, dataset_id)
    return ds.select_columns([spec.question_column, spec.answer_column]).to_list()


def _column_error(missing: list[str], available: list[str], where: str) -> EmbedtuneError:
    import difflib

    close = [c for m in missing for c in difflib.get_close_matches(m, available, n=1)]
    hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
    return EmbedtuneError(
        f"column {', '.join(repr(m) for m in missing)} not found in {where}; {hint}available columns: "
        f"{', '.join(available)} (set question_column / answer_column to map them)"
    )


def _read_beir(folder: Path, spec: DataSpec) -> tuple[list[tuple[str, str]], list[str]]:
    """BEIR layout → (question, document) pairs from qrels (score > 0), plus every corpus document."""

    def first(*names: str) -> Path:
        for n in names:
            if (folder / n).exists():
                return folder / n
        raise EmbedtuneError(f"BEIR folder {folder} has none of {', '.join(names)}")

    corpus = {}
    for row in _read_jsonl(first("corpus.jsonl", "corpus.jsonl.gz")):
        text = " ".join(s for s in (row.get("title", ""), row.get("text", "")) if s).strip()
        corpus[str(row["_id"])] = text
    queries = {str(r["_id"]): r["text"] for r in _read_jsonl(first("queries.jsonl", "queries.jsonl.gz"))}
    qrels = first(f"qrels/{spec.beir_split}.tsv")
    pairs = []
    with open(qrels, encoding="utf-8") as fh:
        for row in csv.reader(fh, delimiter="\t"):
            if len(row) < 3 or row[0] == "query-id" or float(row[2]) <= 0:
                continue
            if row[0] in queries and row[1] in corpus:
                pairs.append((queries[row[0]], corpus[row[1]]))
    return pairs, list(corpus.values())


def sample_rows(spec: DataSpec, n: int = 100) -> list[dict] | None:
    """The first `n` raw rows of a pair source with every column (what a column mapping is chosen
    from: the loader checks its columns on the first 100 rows too); None for a BEIR folder, whose
    queries and documents need no mapping."""
    target, fmt = resolve_source(spec)
    return None if fmt == "beir" else _read_rows(target, fmt, spec, limit=n)


def load_pairs(spec: DataSpec) -> tuple[list[tuple[str, str]], list[str]]:
    """Load and clean (question, answer) pairs; returns (pairs, extra corpus documents).
    Cleaning: strip whitespace, drop rows with an empty side, drop exact duplicate pairs."""
    target, fmt = resolve_source(spec)
    extra: list[str] = []
    if fmt == "beir":
        try:
            raw_pairs, extra = _read_beir(Path(target), spec)
        except UnicodeDecodeError as exc:
            raise EmbedtuneError(
                f"BEIR folder {target} has a file that is not UTF-8 text ({exc.reason})"
            ) from exc
        except (KeyError, ValueError) as exc:  # a row without _id / text, a bad qrels score
            raise EmbedtuneError(f"BEIR folder {target} is malformed: {type(exc).__name__}: {exc}") from exc
    else:
        rows = _read_rows(target, fmt, spec)
        if not rows:
            raise EmbedtuneError(f"{target} has no rows; point at a file with (question, answer) pairs")
        cols = set().union(*(r.keys() for r in rows[:100]))
        missing = [c for c in (spec.question_column, spec.answer_column) if c not in cols]
        if missing:
            raise _column_error(missing, sorted(cols), str(target))
        raw_pairs = [(r.get(spec.question_column), r.get(spec.answer_column)) for r in rows]
    seen: set[tuple[str, str]] = set()
    pairs = []
    for q, a in raw_pairs:
        q, a = (str(q).strip() if q is not None else ""), (str(a).strip() if a is not None else "")
        if q and a and (q, a) not in seen:
            seen.add((q, a))
            pairs.append((q, a))
    if not pairs:
        raise EmbedtuneError(f"{spec.source} has no non-empty (question, answer) pairs after cleaning")
    if len(pairs) == 1 and len(raw_pairs) > 1:
        raise EmbedtuneError(
            f"{spec.source}: all {len(raw_pairs)} rows are one (question, answer) pair after dropping duplicate "
            "and empty rows; point at data with distinct pairs"
        )
    if spec.max_pairs and len(pairs) > spec.max_pairs:
        pairs = sample_by_group(pairs, spec.max_pairs, spec.seed)
    return pairs, [d.strip() for d in extra if d and d.strip()]


# ---------------------------------------------------------------- splitting


def _components(pairs: list[tuple[str, str]]) -> list[list[int]]:
    """Group pair indices into connected components linked by shared text: an equal question, an
    equal answer, or a text that is one pair's question and another's answer (paraphrase data)."""
    parent = list(range(len(pairs)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_seen: dict[str, int] = {}
    for i, pair in enumerate(pairs):
        for text in pair:
            j = first_seen.setdefault(text, i)
            parent[find(i)] = find(j)
    groups: dict[int, list[int]] = defaultdict(list)
    for i in range(len(pairs)):
        groups[find(i)].append(i)
    return sorted(groups.values(), key=lambda g: g[0])


def sample_by_group(pairs: list[tuple[str, str]], n: int, seed: int) -> list[tuple[str, str]]:
    """About `n` pairs in whole groups (`_components`), seeded: what `max_pairs` keeps."""
    comps = _components(pairs)
    random.Random(seed).shuffle(comps)
    chosen: list[int] = []
    for comp in comps:
        if len(chosen) >= n:
            break
        chosen.extend(comp)
    return [pairs[i] for i in sorted(chosen)]


def split(
    pairs: list[tuple[str, str]], spec: DataSpec, extra_corpus: list[str] | None = None
) -> PreparedData:
    """Leak-free train / eval / corpus split of cleaned pairs (see module docstring)."""
    comps = _components(pairs)
    n_questions = len({q for q, _ in pairs})
    want_eval = spec.eval_size or max(1, round(spec.eval_fraction * n_questions))
    if len(comps) < 2 or want_eval >= n_questions:
        raise EmbedtuneError(
            f"dataset {spec.label} is too small for the split asked: {len(pairs)} pairs, {n_questions} questions "
            f"in {len(comps)} independent group(s), {want_eval} asked for eval; add data or lower eval_size/eval_fraction"
        )
    order = list(range(len(comps)))
    random.Random(spec.seed).shuffle(order)
    eval_idx: list[int] = []
    eval_questions: set[str] = set()
    taken = 0
    for ci in order:
        if len(eval_questions) >= want_eval:
            break
        eval_idx.extend(comps[ci])
        eval_questions.update(pairs[i][0] for i in comps[ci])
        taken += 1
    eval_set = set(eval_idx)
    train = [p for i, p in enumerate(pairs) if i not in eval_set]
    eval_pairs = [pairs[i] for i in sorted(eval_idx)]
    if len(train) < 2:
        raise EmbedtuneError(
            f"dataset {spec.label} is too small for the split asked: only {len(train)} train pair(s) left "
            f"after holding out {len(eval_questions)} eval questions; add data or lower eval_size/eval_fraction"
        )
    # Distractors: every non-eval answer, also those of train pairs dropped by max_train_pairs.
    non_eval_answers = [a for _, a in train]
    if spec.max_train_pairs and len(train) > spec.max_train_pairs:
        keep = sorted(random.Random(spec.seed + 1).sample(range(len(train)), spec.max_train_pairs))
        train = [train[i] for i in keep]  # a seeded sample, in the original order

    corpus_texts: list[str] = []
    seen: set[str] = set()
    distractors = non_eval_answers + list(extra_corpus or []) if spec.corpus_distractors else []
    for text in [a for _, a in eval_pairs] + distractors:
        if text not in seen:
            seen.add(text)
            corpus_texts.append(text)
    cid_of = {t: f"d{i}" for i, t in enumerate(corpus_texts)}
    queries: dict[str, str] = {}
    relevant: dict[str, list[str]] = {}
    qid_of: dict[str, str] = {}
    for q, a in eval_pairs:
        qid = qid_of.setdefault(q, f"q{len(qid_of)}")
        queries[qid] = q
        if cid_of[a] not in relevant.setdefault(qid, []):
            relevant[qid].append(cid_of[a])
    fingerprint = stable_hash(
        SPLIT_VERSION,
        stable_hash(pairs, extra_corpus or [], length=64),
        spec.model_dump(exclude={"name", "source", "format", "hf_split", "hf_config"}),
    )
    counts = {
        "pairs": len(pairs),
        "components": len(comps),
        "train_pairs": len(train),
        "eval_pairs": len(eval_pairs),
        "eval_questions": len(queries),
        "corpus": len(corpus_texts),
    }
    data = PreparedData(
        fingerprint,
        spec.label,
        train,
        eval_pairs,
        queries,
        {v: k for k, v in cid_of.items()},
        relevant,
        counts,
    )
    check_no_leak(data)
    return data


def check_no_leak(data: PreparedData) -> None:
    """Raise if any eval question or any answer of an eval question appears in training (as a
    question or as an answer)."""
    train_texts = {t for pair in data.train for t in pair}
    leaked_q = [q for q in data.queries.values() if q in train_texts]
    leaked_a = [a for _, a in data.eval_pairs if a in train_texts]
    if leaked_q or leaked_a:
        raise AssertionError(f"train/eval leak: {len(leaked_q)} questions, {len(leaked_a)} answers")


def prepare(spec: DataSpec) -> PreparedData:
    """Load, clean and split. Cheap enough to redo per process; the fingerprint names what derives from it."""
    pairs, extra = load_pairs(spec)
    return split(pairs, spec, extra)


def parse_data_arg(value: str, **overrides: object) -> DataSpec:
    """CLI form: a source with optional `source?key=value&key=value` settings (e.g.
    `data.csv?question_column=q&answer_column=a`)."""
    source, _, query = value.partition("?")
    settings: dict[str, object] = {"source": source}
    for part in filter(None, query.split("&")):
        key, eq, val = part.partition("=")
        if not eq:
            raise EmbedtuneError(f"bad data setting {part!r} in {value!r}: use key=value")
        settings[key] = val
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return make_spec(settings)


def make_spec(settings: dict) -> DataSpec:
    from pydantic import ValidationError

    try:
        return DataSpec.model_validate(settings)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or "data"
        raise EmbedtuneError(f"data setting {loc}: {err['msg']} (got {err.get('input')!r})") from exc


def prepare_ood(spec: DataSpec, max_corpus: int | None = 2000) -> PreparedData:
    """An out-of-domain evaluation set: every question of `spec` (after `max_pairs` sampling) is a
    query, relevant to the answers it is paired with; the corpus holds those answers plus the other
    documents (a BEIR corpus, the other answers), seeded-sampled down to `max_corpus` documents in all
    (relevant ones always kept). Nothing is held out for training: none is done on it."""
    pairs, extra = load_pairs(spec)
    docs: dict[str, str] = {}
    queries: dict[str, str] = {}
    relevant: dict[str, list[str]] = {}
    qid_of: dict[str, str] = {}
    for q, a in pairs:
        cid = docs.setdefault(a, f"d{len(docs)}")
        qid = qid_of.setdefault(q, f"q{len(qid_of)}")
        queries[qid] = q
        if cid not in relevant.setdefault(qid, []):
            relevant[qid].append(cid)
    others = [d for d in dict.fromkeys(extra) if d not in docs]
    if max_corpus is not None and len(docs) + len(others) > max_corpus:
        keep = max(0, max_corpus - len(docs))
        others = [others[i] for i in sorted(random.Random(spec.seed).sample(range(len(others)), keep))]
    for d in others:
        docs.setdefault(d, f"d{len(docs)}")
    corpus = {cid: text for text, cid in docs.items()}
    fingerprint = stable_hash("ood", stable_hash(pairs, length=64), sorted(corpus.values()), spec.seed)
    counts = {"pairs": len(pairs), "eval_questions": len(queries), "corpus": len(corpus)}
    return PreparedData(fingerprint, spec.label, [], list(pairs), queries, corpus, relevant, counts)
