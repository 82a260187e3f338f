"""Which columns of a pair file hold the questions and the answers, guessed from their names.

A column qualifies when its sampled values are text (SQuAD's `answers` is a dict of spans: no
answer column) and its name is a known one (`question`, `query`, `anchor`, ... / `answer`,
`passage`, `context`, `positive`, ...), whole or as one word of it (`User Query`, `best_answer`,
`questionText`). A whole-name match beats a word match; earlier names in the lists beat later ones;
a name with a word such as `id` or `url` never matches (`question_id` is no question).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# Most likely first. One- and two-letter names only match whole (`q`, not the `q` in `q_id`).
QUESTION_NAMES = (
    "question", "query", "anchor", "q", "questions", "queries", "prompt", "claim", "title",
    "sentence1", "text1", "search", "input", "instruction", "request", "ask",
)  # fmt: skip
ANSWER_NAMES = (
    "answer", "passage", "context", "positive", "text", "document", "abstract", "a", "answers",
    "passages", "documents", "doc", "content", "body", "response", "reply", "paragraph", "pos",
    "sentence2", "text2", "output", "completion", "target", "solution",
)  # fmt: skip
# A word that makes a column metadata whatever else its name says.
NOT_TEXT_WORDS = {
    "id", "ids", "idx", "index", "url", "uri", "link", "label", "labels", "score", "type", "lang",
    "language", "date", "time", "len", "length", "count", "start", "end", "hash",
}  # fmt: skip


def name_words(column: str) -> list[str]:
    """`User Query` / `user_query` / `userQuery` -> ["user", "query"]."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", column)
    return [w for w in re.split(r"[^0-9A-Za-z]+", spaced.lower()) if w]


@dataclass
class ColumnGuess:
    """The columns found (in file order) and the best question / answer column (None: no match)."""

    columns: list[str]
    question: str | None
    answer: str | None
    also: dict[str, list[str]] = field(default_factory=dict)  # role -> other matching columns
    given: list[str] = field(default_factory=list)  # roles the user named, not guessed


def _rank(column: str, names: tuple[str, ...]) -> tuple[int, int] | None:
    words = name_words(column)
    if not words or NOT_TEXT_WORDS & set(words):
        return None
    whole = "_".join(words)
    for i, name in enumerate(names):
        if whole == name:
            return (0, i)
    for i, name in enumerate(names):
        if len(name) > 2 and name in words:
            return (1, i)
    return None


def _holds_text(rows: list[dict], column: str) -> bool:
    values = [r.get(column) for r in rows if r.get(column) is not None]
    return bool(values) and all(isinstance(v, str) for v in values) and any(v.strip() for v in values)


def guess_columns(rows: list[dict], question: str | None = None, answer: str | None = None) -> ColumnGuess:
    """The question and answer columns of `rows` (a sample of the file's first rows); a column the
    user named (`question` / `answer`) is kept as given and not guessed."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    given = [role for role, col in (("question", question), ("answer", answer)) if col is not None]
    texts = [c for c in columns if _holds_text(rows, c)]
    also: dict[str, list[str]] = {}

    def best(role: str, names: tuple[str, ...], taken: str | None) -> str | None:
        ranked = sorted(
            (rank, i, c) for i, c in enumerate(texts) if c != taken and (rank := _rank(c, names)) is not None
        )
        if len(ranked) > 1:
            also[role] = [c for _, _, c in ranked[1:]]
        return ranked[0][2] if ranked else None

    if question is None:
        question = best("question", QUESTION_NAMES, answer)
    if answer is None:
        answer = best("answer", ANSWER_NAMES, question)
    return ColumnGuess(columns, question, answer, also, given)
