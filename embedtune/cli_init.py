"""The `embedtune init` command: its arguments and what it prints (kept out of cli.py, which holds
the other commands and must stay under the module size limit)."""

from __future__ import annotations

import argparse

from embedtune.credentials import check_source


def run(args: argparse.Namespace) -> int:
    from embedtune.init_spec import FIXED_S, init_spec

    check_source(args.data, "DATA")  # a source never carries a credential
    result = init_spec(
        args.data,
        name=args.name,
        models=args.models,
        out=args.out,
        force=args.force,
        question_column=args.question_column,
        answer_column=args.answer_column,
    )
    s, ds = result.sizing, result.dataset
    if result.columns is not None:
        print(f"[embedtune] columns: question {ds.question_column!r}, answer {ds.answer_column!r}")
    print(
        f"[embedtune] wrote {result.out}: {s.usable} usable pairs, eval_size {s.eval_size}, "
        f"max_train_pairs {s.max_train_pairs}, an auto search of {s.budget_minutes} min (the run: "
        f"~{round((s.budget_minutes * 60 + FIXED_S) / 60)} min on 2 CPU cores)"
    )
    print(f"[embedtune] run it: embedtune sweep {result.out}")
    return 0


def add_parser(sub) -> None:
    """`init` on the CLI's subcommands."""
    p = sub.add_parser(
        "init",
        help="write a commented sweep spec for your data, sized from it",
        description="Write a commented sweep spec (YAML) for DATA: its question / answer columns found "
        "from their names, eval_size and max_train_pairs sized from its usable pairs (after the loader's "
        "cleaning), an Optuna search sized to about an hour on a 2-core CPU machine. The spec is loaded "
        "back and checked before it is written; on an error nothing is written.",
        epilog="example: embedtune init faq.csv  (writes sweeps/faq.yaml; then: embedtune sweep sweeps/faq.yaml)",
    )
    p.add_argument(
        "data",
        metavar="DATA",
        help="a .jsonl[.gz]/.parquet/.csv file, a BEIR folder, a sample (medquad-sample, squad-sample, "
        "scifact-sample) or hf:<dataset id>; settings may follow after '?', e.g. hf:org/name?hf_split=test",
    )
    p.add_argument("--name", help="the sweep's name (default: from DATA's file name)")
    p.add_argument(
        "--models",
        nargs="+",
        metavar="MODEL",
        help="models to tune (default: the packaged all-MiniLM-L6-v2 paraphrase-MiniLM-L3-v2)",
    )
    p.add_argument(
        "--out",
        help="the spec file to write (default: sweeps/<name>.yaml under the current folder, made if needed)",
    )
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--question-column", help="the question column, when its name does not tell")
    p.add_argument("--answer-column", help="the answer / passage column, when its name does not tell")
    p.set_defaults(func=run)
