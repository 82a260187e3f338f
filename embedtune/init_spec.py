"""`embedtune init DATA`: a commented starter sweep spec for a user's own data, sized from it.

The data is read with the project's loader (`data.load_pairs`: the same cleaning and dedup a
sweep does) after its question / answer columns are found (`columns.guess_columns`); the split a
sweep would make (`data.split`) gives the held-out questions, the training pairs left and the eval
corpus, from which the spec's sizes follow (see `size`). The YAML is written to a temp file next to
the target, loaded back with `specs.load_spec` and checked, then moved into place: on any error
nothing is left behind.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from embedtune.columns import ColumnGuess, guess_columns
from embedtune.data import (
    SAMPLES,
    load_pairs,
    make_spec,
    parse_data_arg,
    resolve_source,
    sample_by_group,
    sample_rows,
    split,
)
from embedtune.errors import EmbedtuneError
from embedtune.specs import DataSpec, SweepSpec, load_spec

log = logging.getLogger(__name__)

DEFAULT_MODELS = ("all-MiniLM-L6-v2", "paraphrase-MiniLM-L3-v2")  # the shipped (packaged) models
SPEC_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # SweepSpec.name's pattern

# Held-out questions: a share of the data, but enough for a paired test to call a real gain
# significant (README, "Why these sizes": ~200 questions make a +0.08 MRR@10 gain p < 0.001), and
# no more than the per-epoch evaluation can afford.
EVAL_FRACTION, MIN_EVAL, MAX_EVAL = 0.2, 100, 1000
# The eval corpus (held-out answers + every other answer as a distractor) is encoded at every epoch
# of every trial and for each model in the final stage: `max_pairs` keeps it near this many.
MAX_CORPUS = 2000
# The time budget: about an hour on a 2-core CPU machine. Rates measured on such a machine with
# sweeps/local.yaml (`make bench`: its trials train ~2,300 pairs in ~5 min, evaluation included):
# two 1-CPU trials at a time train ~8 pairs/s together with MiniLM-size models on hard-negative
# triplets, and encode ~200 texts/s for each epoch's evaluation; data, mining, base scores and the
# final stage take ~10 min.
BUDGET_S, FIXED_S = 3600, 600
TRAIN_PAIRS_PER_S, ENCODE_TEXTS_PER_S = 8.0, 200.0
EPOCHS = (1, 2, 3)
TRIALS_PER_MODEL = 3  # whole trials the sizing plans for (auto mode then spends their time)
SECOND_SEED_TRIALS = 1  # search.second_seed: the best configuration again, after the budget
MIN_BUDGET_MIN = 5
MIN_TRAIN_PAIRS = 64
# DATA's `?key=value` settings written into the spec as given (the sizes are chosen here).
PASSED_ON = ("format", "hf_split", "hf_config", "beir_split", "corpus_distractors", "seed")
LR_LOW, LR_HIGH = "1.0e-5", "1.0e-4"  # YAML floats need the dot: PyYAML reads 1e-5 as a string


@dataclass
class Sizing:
    """What the data holds and the spec values chosen from it."""

    usable: int  # pairs after the loader's cleaning
    pairs: int  # of them, what the spec keeps (max_pairs)
    questions: int
    answers: int
    extra_docs: int  # a BEIR corpus's documents beyond the answers
    max_pairs: int | None
    eval_size: int
    eval_questions: int  # what the split holds out (whole groups: can exceed eval_size)
    train_available: int
    max_train_pairs: int
    corpus: int
    num_samples: int
    batch_size: int
    trial_s: float  # one whole trial (max(EPOCHS) epochs, each with its evaluation)

    @property
    def trials_s(self) -> float:
        """The trial phase: `num_samples` whole trials, then the second seed's."""
        return (self.num_samples + SECOND_SEED_TRIALS) * self.trial_s

    @property
    def total_s(self) -> float:
        return FIXED_S + self.trials_s

    @property
    def budget_minutes(self) -> int:
        """search.budget of the written spec: the time `num_samples` whole trials would take (the
        scheduler stops weak ones early, so more trials fit), within the hour less the second seed's
        trial, at least MIN_BUDGET_MIN."""
        search_s = min(
            self.num_samples * self.trial_s, BUDGET_S - FIXED_S - SECOND_SEED_TRIALS * self.trial_s
        )
        return max(MIN_BUDGET_MIN, math.ceil(search_s / 60))


@dataclass
class InitResult:
    out: Path
    name: str
    dataset: DataSpec
    columns: ColumnGuess | None
    sizing: Sizing
    spec: SweepSpec


def eval_size_for(questions: int) -> int:
    """EVAL_FRACTION of the questions, raised to MIN_EVAL where the data allows (never more than
    half of them: training needs the rest), capped at MAX_EVAL."""
    want = round(EVAL_FRACTION * questions)
    if want < MIN_EVAL:
        want = min(MIN_EVAL, questions // 2)
    return max(1, min(want, MAX_EVAL))


def train_cap(num_samples: int, eval_texts: int) -> int:
    """Training pairs per trial that keep `num_samples` trials of max(EPOCHS) epochs (each epoch
    also encoding `eval_texts` texts) within BUDGET_S - FIXED_S; a multiple of 32, at least
    MIN_TRAIN_PAIRS."""
    per_epoch_s = (BUDGET_S - FIXED_S) / (num_samples * max(EPOCHS))
    pairs = TRAIN_PAIRS_PER_S * (per_epoch_s - eval_texts / ENCODE_TEXTS_PER_S)
    return max(MIN_TRAIN_PAIRS, int(pairs // 32) * 32)


def detect(spec: DataSpec) -> tuple[DataSpec, ColumnGuess | None]:
    """`spec` with its question / answer columns set (those the user gave kept); a BEIR folder
    needs none. One error line listing the columns found when they cannot be told."""
    rows = sample_rows(spec)
    if rows is None:
        return spec, None
    if not rows:
        load_pairs(spec)  # the loader's own one-line error for a file without rows
    given = spec.model_fields_set
    guess = guess_columns(
        rows,
        spec.question_column if "question_column" in given else None,
        spec.answer_column if "answer_column" in given else None,
    )
    if guess.question is None or guess.answer is None:
        roles = [role for role in ("question", "answer") if getattr(guess, role) is None]
        found = [
            f"{role}: {getattr(guess, role)!r}" for role in ("question", "answer") if getattr(guess, role)
        ]
        raise EmbedtuneError(
            f"cannot tell the {' and '.join(roles)} column of {spec.source} from its column names "
            f"({'; '.join([*found, 'columns found: ' + ', '.join(repr(c) for c in guess.columns)])}); pass "
            + " ".join(f"--{role}-column COL" for role in roles)
            + " (the spec's datasets[0]."
            + " / ".join(f"{role}_column" for role in roles)
            + ")"
        )
    settings = spec.model_dump(exclude_unset=True)
    return make_spec({**settings, "question_column": guess.question, "answer_column": guess.answer}), guess


def size(spec: DataSpec, n_models: int) -> Sizing:
    """Load the pairs as a sweep would, and size the spec from them (module docstring)."""
    pairs, extra = load_pairs(spec)
    usable, answers = len(pairs), len({a for _, a in pairs})
    max_pairs = spec.max_pairs
    if max_pairs is None and answers > MAX_CORPUS:
        max_pairs = max(2, math.floor(len(pairs) * MAX_CORPUS / answers))
        pairs = sample_by_group(pairs, max_pairs, spec.seed)  # what load_pairs does with max_pairs
    questions = len({q for q, _ in pairs})
    eval_size = eval_size_for(questions)
    held = split(pairs, spec.model_copy(update={"eval_size": eval_size, "max_train_pairs": None}), extra)
    counts = held.counts
    num_samples = TRIALS_PER_MODEL * n_models
    eval_texts = counts["eval_questions"] + counts["corpus"]
    max_train = min(counts["train_pairs"], train_cap(num_samples + SECOND_SEED_TRIALS, eval_texts))
    batch_size = 32 if max_train >= 160 else 16  # at least ~10 steps an epoch on small data
    trial_s = max(EPOCHS) * (max_train / TRAIN_PAIRS_PER_S + eval_texts / ENCODE_TEXTS_PER_S)
    return Sizing(
        usable=usable,
        pairs=len(pairs),
        questions=questions,
        answers=len({a for _, a in pairs}),
        extra_docs=len(extra),
        max_pairs=max_pairs,
        eval_size=eval_size,
        eval_questions=counts["eval_questions"],
        train_available=counts["train_pairs"],
        max_train_pairs=max_train,
        corpus=counts["corpus"],
        num_samples=num_samples,
        batch_size=batch_size,
        trial_s=trial_s,
    )


def _q(value: object) -> str:
    """A YAML scalar: JSON's double-quoted strings are YAML's too (any column name or path)."""
    return json.dumps(value, ensure_ascii=False)


def _written_source(spec: DataSpec, out: Path) -> str:
    """A local file relative to the spec's folder (what `load_spec` resolves it against), so the
    spec and its data move together (absolute when they share no folder but the root); a saved
    Hugging Face folder absolute (`load_spec` leaves `hf:` sources alone); samples and hub ids as
    given."""
    src = spec.source.strip()
    if src in SAMPLES:
        return src
    path = Path(src.removeprefix("hf:")).expanduser()
    if src.startswith("hf:") or spec.format == "hf":
        return f"{'hf:' if src.startswith('hf:') else ''}{path.resolve()}" if path.exists() else src
    data, folder = path.resolve(), out.parent.resolve()
    if os.path.commonpath([data, folder]) == data.anchor:  # nothing shared but `/`: keep it absolute
        return str(data)
    return os.path.relpath(data, folder)


def _ood(spec: DataSpec) -> str:
    """The do-no-harm set: a shipped sample unlike the user's data (SciFact: 300 claims, 1,000 abstracts)."""
    if spec.source == "scifact-sample":
        return "{source: medquad-sample, name: medquad-ood, max_pairs: 300}"
    return "{source: scifact-sample, name: scifact-ood}"


def _c(line: str, comment: str) -> str:
    """`line` with an inline comment, comments aligned where the lines allow."""
    return f"{line:<29} # {comment}"


def _header(data_arg: str, s: Sizing, out: Path) -> list[str]:
    return [
        f"# Written by `embedtune init {data_arg}`: a sweep spec for this data, sized from it.",
        f"# {s.usable:,} usable (question, answer) pairs after the loader's cleaning (whitespace stripped,",
        "# empty and duplicate rows dropped)"
        + (f"; the spec keeps {s.pairs:,} of them (max_pairs)" if s.pairs != s.usable else "")
        + f": {s.questions:,} distinct questions, {s.answers:,} distinct answers"
        + (f", {s.extra_docs:,} corpus documents." if s.extra_docs else "."),
        f"# Sized to fit about an hour on a 2-core CPU machine: ~{round(s.total_s / 60)} min if no trial is",
        "# stopped early (ASHA usually stops some). Assumed, from sweeps/local.yaml measured by `make bench`: two",
        f"# 1-CPU trials at a time train ~{TRAIN_PAIRS_PER_S:.0f} pairs/s together with MiniLM-size models "
        "(hard-negative",
        f"# triplets), encode ~{ENCODE_TEXTS_PER_S:.0f} texts/s for each epoch's evaluation, and data, mining, "
        "base scores",
        f"# and the final stage take ~{FIXED_S // 60} min. Larger models (all-mpnet-base-v2: ~30 s per training "
        "step on",
        "# CPU) need a GPU: set resources.gpu.",
        f"# Run it: embedtune sweep {out}",
    ]


def _dataset(name: str, spec: DataSpec, guess: ColumnGuess | None, s: Sizing, out: Path) -> list[str]:
    written = _written_source(spec, out)
    local = written not in SAMPLES and not written.startswith("hf:") and spec.format != "hf"
    source = f"    source: {_q(written)}"
    local = local and not Path(written).is_absolute()
    lines = [f"  - name: {name}", _c(source, "relative to this file") if local else source]
    lines += [f"    {k}: {_q(getattr(spec, k))}" for k in PASSED_ON if k in spec.model_fields_set]
    if guess is None:
        lines.append(
            "    # A BEIR folder: questions, documents and relevance come from its queries, corpus, qrels."
        )
    else:
        guessed = [r for r in ("question", "answer") if r not in guess.given]
        how = (
            f"the {' and '.join(guessed)} column{'s' * (len(guessed) > 1)} found by name"
            if guessed
            else "as given"
        )
        others = "; ".join(f"other {role} candidates: {', '.join(cols)}" for role, cols in guess.also.items())
        lines += [
            f"    # Columns: {', '.join(guess.columns)}. Mapped {how}"
            + (f" ({others})" if others and guessed else "")
            + "; change it if wrong.",
            f"    question_column: {_q(spec.question_column)}",
            f"    answer_column: {_q(spec.answer_column)}",
        ]
    if s.max_pairs is not None:
        lines += [
            f"    # {s.max_pairs:,} pairs, sampled in whole groups: the eval corpus (all answers) is encoded at every",
            f"    # epoch of every trial and per model in the final stage; this keeps it near {MAX_CORPUS:,} texts.",
            f"    max_pairs: {s.max_pairs}",
        ]
    lines += [
        f"    # Held-out questions: {EVAL_FRACTION:.0%} of the {s.questions:,} distinct questions, raised to "
        f"{MIN_EVAL} where the",
        f"    # data allows (at most half), capped at {MAX_EVAL:,}. A paired test on ~200 questions calls a +0.08",
        '    # MRR@10 gain significant (p < 0.001, README "Why these sizes"); on far fewer a real gain looks',
        f"    # like noise. The split holds out whole groups of linked pairs (here {s.eval_questions:,} questions).",
        f"    eval_size: {s.eval_size}",
    ]
    if s.max_train_pairs >= s.train_available:
        note = f"all {s.train_available:,} left after the hold-out fit the time budget."
    else:
        note = (
            f"{s.max_train_pairs:,} of the {s.train_available:,} left after the hold-out: what "
            f"{s.num_samples} trials x {max(EPOCHS)} epochs fit in the time budget."
        )
    return [*lines, f"    # Training pairs per trial: {note}", f"    max_train_pairs: {s.max_train_pairs}"]


def render(
    data_arg: str,
    name: str,
    spec: DataSpec,
    guess: ColumnGuess | None,
    s: Sizing,
    models: list[str],
    out: Path,
) -> str:
    """The spec's YAML, each choice commented."""
    epochs = ", ".join(str(e) for e in EPOCHS)
    lr = f"{{distribution: loguniform, low: {LR_LOW}, high: {LR_HIGH}}}"
    lines = [
        *_header(data_arg, s, out),
        f"name: {name}",
        _c("metric: mrr_at_10", "the headline (scheduler, winner, report); hit@10 is often near 1 zero-shot"),
        "datasets:",
        *_dataset(name, spec, guess, s, out),
        _c("models:", "--models; the first also mines the hard negatives (mining.model)"),
        *(f"  - {_q(m)}" for m in models),
        "search:",
        _c(
            "  mode: auto",
            "Optuna (TPE) draws each trial's model, lr, warmup and loss (mnrl or gist) from the trials "
            "before it; ASHA stops weak ones after an epoch",
        ),
        _c(
            f"  budget: {{minutes: {s.budget_minutes}}}",
            f"trial phase: the time of ~{s.num_samples} whole trials ({TRIALS_PER_MODEL} per model) here",
        ),
        _c(
            "  second_seed: true",
            "then the best configuration again with seed 43 (one more trial): is the gain real for both seeds?",
        ),
        _c(
            f"  epochs: [{epochs}]", f"one {max(EPOCHS)}-epoch run per trial, checkpointed and scored at each"
        ),
        "  epochs_mode: branch",
        f"  lr: {lr}  # around sentence-transformers' 2e-5 and sweeps/local.yaml's 5e-5",
        _c(
            f"  batch_size: [{s.batch_size}]",
            "MNRL's in-batch negatives: more is better; 32 fits a CPU"
            + ("; 16 on small data: more steps" if s.batch_size < 32 else ""),
        ),
        "  seed: [42]",
        "train:",
        _c("  max_seq_length: 128", "tokens per text; longer ones are cut (the cost grows with it)"),
        _c("  hard_negatives: true", "train on (question, answer, mined near-miss answer) triplets"),
        "mining:",
        f"  model: {_q(models[0])}",
        "  num_negatives: 1",
        "  range_max: 30",
        "resources:",
        _c("  cpu: 1", "per trial: two trials share a 2-core machine"),
        _c("  gpu: 0", "on a GPU machine: 1 (or 0.5: two trials per GPU)"),
        "scheduler:",
        _c("  type: asha", "stops trials that trail after an epoch: the estimate above is the worst case"),
        "  grace_period: 1",
        "  reduction_factor: 2",
        _c("  compare: gain", "rank trials by their gain over their own base model"),
        "max_concurrent_trials: 2",
        "checkpoints:",
        "  keep: 1",
        "mlflow:",
        _c("  tracking_uri: null", "$MLFLOW_TRACKING_URI if set, else a SQLite store in the run directory"),
        "final:",
        _c("  top_k: 0", "the best checkpoint per model and the base models; no extra runners-up"),
        _c("  cross_encoder_max_pairs: 240", "trained, then used only where it beats the bi-encoder"),
        "  eval:",
        _c("    overfetch: 1", "rerankers reorder the top 10 (2 cores: cross-encoder time)"),
        _c("  ood:", "do no harm: the winner and its base model on data unlike yours"),
        f"    - {_ood(spec)}",
        "  ood_max_corpus: 1000",
    ]
    return "\n".join(lines) + "\n"


def default_name(spec: DataSpec) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", spec.label).strip("-_.") or "data"


def _check(loaded: SweepSpec, spec: DataSpec, s: Sizing, where: Path) -> None:
    """The spec as `load_spec` reads it back must be the one meant (a bug here, not bad input)."""
    ds = loaded.datasets[0]

    def located(target: Path | str) -> Path | str:  # a local file or folder, else a hub id
        return Path(target).resolve() if Path(target).exists() else str(target)

    same_source = located(resolve_source(spec)[0]) == located(resolve_source(ds)[0])
    checks = {
        "source": same_source,
        "columns": (ds.question_column, ds.answer_column) == (spec.question_column, spec.answer_column),
        "sizes": (ds.eval_size, ds.max_train_pairs, ds.max_pairs)
        == (s.eval_size, s.max_train_pairs, s.max_pairs),
        "budget": loaded.search.budget is not None and loaded.search.budget.minutes == s.budget_minutes,
    }
    wrong = [k for k, ok in checks.items() if not ok]
    if wrong:
        raise EmbedtuneError(
            f"the spec written to {where} reads back with other {', '.join(wrong)}; nothing written"
        )


def write_spec(text: str, out: Path, force: bool, check) -> SweepSpec:
    """Write `text` to a temp file beside `out`, load it with `load_spec`, `check` it, move it into
    place; on any error nothing is left (a folder made for it is removed again)."""
    made = [p for p in [out.parent, *out.parent.parents] if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.stem}.", suffix=".yaml.tmp", dir=out.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        loaded = load_spec(tmp)
        check(loaded, tmp)
        if out.exists() and not force:  # appeared meanwhile: still never overwrite
            raise EmbedtuneError(f"{out} exists; pass --force to overwrite it")
        os.replace(tmp, out)
        return loaded
    except BaseException:
        tmp.unlink(missing_ok=True)
        for folder in made:  # innermost first
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise


def init_spec(
    data: str,
    name: str | None = None,
    models: list[str] | None = None,
    out: str | Path | None = None,
    force: bool = False,
    question_column: str | None = None,
    answer_column: str | None = None,
) -> InitResult:
    """The `embedtune init` command (see the module docstring)."""
    models = list(models or DEFAULT_MODELS)
    if len(set(models)) != len(models):
        raise EmbedtuneError(f"--models: a model is given twice ({' '.join(models)})")
    if name is not None and not SPEC_NAME.fullmatch(name):
        raise EmbedtuneError(
            f"--name {name!r}: use letters, digits and _ . - (a letter or digit first), e.g. --name faq"
        )
    spec = parse_data_arg(data, question_column=question_column, answer_column=answer_column)
    name = name or default_name(spec)
    target = Path(out) if out is not None else Path("sweeps") / f"{name}.yaml"
    if target.is_dir():
        raise EmbedtuneError(
            f"--out {target} is a folder; give a file name, e.g. {target / (name + '.yaml')}"
        )
    if target.exists() and not force:
        raise EmbedtuneError(f"{target} exists; pass --force to overwrite it, or --out another file")
    spec, guess = detect(spec)
    sizing = size(spec, len(models))
    text = render(data, name, spec, guess, sizing, models, target)
    written = write_spec(text, target, force, lambda loaded, where: _check(loaded, spec, sizing, where))
    return InitResult(target, name, spec, guess, sizing, written)
