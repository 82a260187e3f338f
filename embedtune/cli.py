"""`embedtune` command line: thin over the library. Bad input → one line on stderr, exit 2."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import get_args

from embedtune import cli_init, env, storage
from embedtune.credentials import check_source, redact, s3_keys_to_env
from embedtune.errors import EmbedtuneError
from embedtune.specs.evaluation import EncodeBackend
from embedtune.specs.metrics import DEFAULT_LEADERBOARD_METRIC, LEADERBOARD_METRICS


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        required=True,
        help="sample name (medquad-sample, squad-sample), a .jsonl/.parquet/.csv file, a BEIR folder, or hf:<id>; "
        "settings may follow after '?', e.g. data.csv?question_column=q&answer_column=a",
    )
    p.add_argument("--question-column", help="column holding the question (default: question)")
    p.add_argument("--answer-column", help="column holding the answer / passage (default: answer)")
    p.add_argument("--hf-split", help="split of a Hugging Face dataset (default: train)")
    p.add_argument("--eval-size", type=int, help="held-out eval questions")
    p.add_argument("--max-train-pairs", type=int, help="cap the training pairs")
    p.add_argument("--max-pairs", type=int, help="sample this many pairs before splitting")


def _data_spec(args: argparse.Namespace):
    from embedtune.data import parse_data_arg

    check_source(args.data, "--data")
    return parse_data_arg(
        args.data,
        question_column=args.question_column,
        answer_column=args.answer_column,
        hf_split=args.hf_split,
        eval_size=args.eval_size,
        max_train_pairs=args.max_train_pairs,
        max_pairs=args.max_pairs,
    )


def _validated(model_cls, **values):
    """Build a pydantic model from CLI values; a bad value becomes a one-line error naming the flag."""
    from pydantic import ValidationError

    try:
        return model_cls(**{k: v for k, v in values.items() if v is not None})
    except ValidationError as exc:
        err = exc.errors()[0]
        flag = "--" + str(err["loc"][0]).replace("_", "-") if err["loc"] else "input"
        raise EmbedtuneError(f"{flag}: {err['msg']} (got {err.get('input')!r})") from exc


def _cmd_train(args: argparse.Namespace) -> int:
    from embedtune.data import prepare
    from embedtune.models import check_max_seq_length, resolve_model
    from embedtune.negatives import mine
    from embedtune.rundir import check_train_overwrite
    from embedtune.specs import MiningSpec, TrainConfig
    from embedtune.train import train

    config = _validated(
        TrainConfig,
        model=args.model,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
        max_seq_length=args.max_seq_length,
        hard_negatives=not args.no_hard_negatives,
        threads=args.threads,
    )
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise EmbedtuneError(f"--out {out} is a file, not a directory; pick a new directory")
    if out.exists() and any(out.iterdir()):
        if not args.overwrite:
            raise EmbedtuneError(
                f"--out {out} exists and is not empty; pick a new directory or pass --overwrite"
            )
        check_train_overwrite(out)  # the guard --fresh has: only what `embedtune train` wrote
    resolve_model(config.model)  # fail on an unknown model before loading any data
    check_max_seq_length(config.model, config.max_seq_length, "--max-seq-length")
    if args.miner and not args.no_hard_negatives:
        resolve_model(args.miner)
    spec = _data_spec(args)
    data = prepare(spec)
    _say_data(data)
    triplets = None
    if config.hard_negatives:
        miner = _validated(MiningSpec, model=args.miner or config.model, max_seq_length=config.max_seq_length)
        triplets = mine(data, miner)
        source = "mined" if triplets.mined else "cached"
        print(f"[embedtune] hard negatives ({source}, key {triplets.key}): {triplets.counts}")
    result = train(config, data, triplets, out)
    best = result.best()
    print(f"[embedtune] wrote {out} in {result.duration_s:.0f}s on {result.device}; best epoch {best.epoch}")
    if args.json:
        print(json.dumps(result.to_json()))
    return 0


def _say_data(data) -> None:
    print(
        f"[embedtune] data {data.label} ({data.fingerprint}): "
        + ", ".join(f"{k}={v}" for k, v in data.counts.items())
    )


def _service_flags(args: argparse.Namespace) -> dict[str, str | None]:
    """The spec values `--tracking-uri / --storage-path / --lancedb-uri` replace (they beat the spec)."""
    return {
        "tracking_uri": args.tracking_uri,
        "storage_path": args.storage_path,
        "lancedb_uri": args.lancedb_uri,
    }


def _show(renderable) -> None:
    """A rich table on stdout, as wide as the terminal (at least 120 columns)."""
    from rich.console import Console

    Console(width=max(120, shutil.get_terminal_size().columns)).print(renderable)


def _show_trials(records, spec, table) -> None:
    """The trials as a table, then each dataset's searched axes whose best value sat at the edge of
    the search, with the spec change to look beyond it (the report's summary says the same)."""
    from embedtune.report.edges import edge_advice, edge_lines

    _show(table)
    for line in edge_lines(edge_advice(records, spec)):
        print(f"[embedtune] edge of the search, {line}")


def _cmd_sweep(args: argparse.Namespace) -> int:
    from embedtune.rundir import REPORT, SPEC, STATE, RunDir
    from embedtune.specs import load_spec
    from embedtune.specs.load import with_overrides
    from embedtune.sweep import default_run_dir, run_sweep
    from embedtune.sweep.preflight import without_secrets
    from embedtune.sweep.results import results_table
    from embedtune.tracking.client import redact

    if args.resume:
        if args.fresh:  # one continues the sweep in RUN_DIR, the other deletes it: never guess which
            raise EmbedtuneError(
                "--resume and --fresh contradict each other: --resume RUN_DIR continues the sweep stored "
                "there, --fresh deletes it; pass one (to start over: embedtune sweep SPEC --run-dir RUN_DIR --fresh)"
            )
        rundir = RunDir(s3_keys_to_env(args.resume, "--resume"))
        try:  # an older or edited spec.json: one line naming the file and the key, not a traceback
            stored = rundir.spec()
        except EmbedtuneError as exc:
            raise EmbedtuneError(
                f"--resume: {exc}; fix that key in the file, or run the sweep's YAML with --run-dir {args.resume}"
            ) from None
        if not rundir.has(STATE) or stored is None:
            raise EmbedtuneError(f"--resume {args.resume}: not a sweep run directory (no {STATE} / {SPEC})")
        spec = with_overrides(stored, **_service_flags(args))
        resume: bool | None = True
    else:
        if not args.spec:
            raise EmbedtuneError("give a sweep spec (e.g. sweeps/local.yaml) or --resume RUN_DIR")
        spec = without_secrets(with_overrides(load_spec(args.spec), **_service_flags(args)))
        rundir = RunDir(default_run_dir(spec, s3_keys_to_env(args.run_dir, "--run-dir")))
        resume = None
        if args.fresh:
            rundir.clear_for_fresh()  # only an embedtune run dir, never $HOME, `/` or the checkout
            resume = False
    result = run_sweep(
        spec,
        rundir,
        resume=resume,
        final=not args.no_final,
        ray_address=args.address,
        on_trials=lambda records: _show_trials(records, spec, results_table(records, spec.scheduler.metric)),
    )
    print(
        f"[embedtune] sweep {spec.name}: {len(result.trials)} trials ({result.launched} run now) in {result.location}"
    )
    failed = {t.run_trial_id: t for t in result.trials if t.status == "FAILED" and t.error}
    for tid, t in failed.items():  # what to fix, one line per Tune trial (also in trials.json, MLflow)
        print(f"[embedtune] trial {tid} ({t.model_label} on {t.dataset}) failed: {t.error}")
    final = result.final
    if final is not None:
        for ds, v in sorted((final.verdicts or {}).items()):
            print(f"[embedtune] {ds}: {v['verdict']}")
        for ds in sorted(final.served):
            print(f"[embedtune] search it: embedtune search {result.location} 'a question' --dataset {ds}")
    print(f"[embedtune] time: {result.clock.line()}")
    # The last lines: where the user reads the results: the report on the storage for a remote run
    # dir (the local file is a cache on the driver's machine, e.g. a cluster head), else the run
    # dir's own file; then the sweep's parent run in MLflow.
    if final is not None:
        report = rundir.uri(REPORT, "leaderboard.md") if rundir.remote else final.files.get("leaderboard_md")
        print(f"[embedtune] report: {report} (and leaderboard.html, plots/)")
    tracking = redact(result.tracking_uri)
    if tracking.startswith(("http://", "https://")):
        run_url = f"{tracking.rstrip('/')}/#/experiments/{result.experiment_id}/runs/{result.parent_run_id}"
        print(f"[embedtune] MLflow: {run_url} (the sweep's parent run, experiment {spec.experiment})")
    else:
        print(
            f"[embedtune] MLflow: {tracking} (experiment {spec.experiment}); "
            f"`make mlflow-ui RUN_DIR={result.run_dir}` to browse"
        )
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from embedtune.data import prepare
    from embedtune.final import evaluate_and_report
    from embedtune.models import model_label, resolve_model
    from embedtune.records import ModelEntry
    from embedtune.rundir import RunDir
    from embedtune.specs import EvalSpec, FinalSpec

    if len(set(args.models)) != len(args.models):
        raise EmbedtuneError(f"--models: a model is given twice ({' '.join(args.models)})")
    labels = [model_label(m) for m in args.models]
    if len(set(labels)) != len(labels):  # e.g. two checkpoints both named .../model: add parent folders
        labels = [model_label("-".join(Path(m).parts[-3:])) for m in args.models]
    if len(set(labels)) != len(labels):
        raise EmbedtuneError(
            f"--models: two models share a label ({', '.join(labels)}); pass distinct models"
        )
    for m in args.models:
        resolve_model(m)  # fail on an unknown model before loading any data
    eval_spec = _validated(
        EvalSpec,
        query_types=args.query_types,
        rerankers=args.rerankers,
        ks=args.ks,
        max_seq_length=args.max_seq_length,
        overfetch=args.overfetch,
    )
    spec = _validated(
        FinalSpec,
        eval=eval_spec,
        cross_encoder=args.cross_encoder,
        leaderboard_metric=args.metric,
        lancedb_uri=s3_keys_to_env(args.lancedb, "--lancedb"),
        probe_size=args.probe_size,
        register_name=args.register_name,
        encode_backend=args.encode_backend,
    )
    data = prepare(_data_spec(args))
    _say_data(data)
    out = RunDir(args.out or f"runs/evaluate-{data.label}")
    entries = {
        data.label: [
            ModelEntry(label=lab, path=m, base_model=lab, kind="base")
            for m, lab in zip(args.models, labels, strict=True)
        ]
    }
    result = evaluate_and_report(out, entries, {data.label: data}, {}, [], spec, None, args.tracking_uri)
    print(f"[embedtune] leaderboard: {result.files['leaderboard_md']}")
    if result.winner:
        w, m = result.winner, spec.leaderboard_metric
        print(f"[embedtune] best: {w['model']} ({w['query_type']}/{w['reranker']}) {m}={w[m]:.4f}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from embedtune.report import rebuild_report

    result = rebuild_report(args.run_dir, metric=args.metric)
    print(
        f"[embedtune] leaderboard: {result.files['leaderboard_md']} ({len(result.leaderboard)} rows, {len(result.plots)} plots)"
    )
    for ds, v in result.verdicts.items():
        print(f"[embedtune] should you fine-tune on {ds}? {v['verdict']}")
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    from embedtune.serve import open_served, search, table_meta

    tbl = open_served(args.location, args.dataset)
    hits = search(tbl, args.question, args.k, args.hybrid)
    if args.json:
        print(json.dumps({"table": tbl.name, "model": table_meta(tbl).get("model"), "hits": hits}, indent=2))
        return 0
    print(
        f"[embedtune] {tbl.name} ({table_meta(tbl).get('model')}), {'hybrid' if args.hybrid else 'vector'} search:"
    )
    for h in hits:
        text = " ".join(h["text"].split())
        print(f"{h['rank']:>3}  {h['score']:.4f}  {h['id']}  {text[:160]}{'...' if len(text) > 160 else ''}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="embedtune",
        description="Fine-tune sentence-embedding models for a retrieval job and prove which one is best: "
        "`init` writes a sweep spec for your data, `sweep` runs one (Ray Tune trials, MLflow runs, a "
        "leaderboard), `train` one run, "
        "`evaluate` scores models in LanceDB, `report` rebuilds a run's leaderboard.",
        epilog="example: embedtune --offline sweep sweeps/local.yaml --run-dir runs/local "
        "(what `make sweep-local` runs); then open runs/local/report/leaderboard.html",
    )
    parser.add_argument("--offline", action="store_true", help="never contact the Hugging Face hub")
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also show debug lines, the libraries' logs and load bars, and Tune's trial tables",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune one model on one dataset")
    p.add_argument("--model", default="all-MiniLM-L6-v2", help="packaged name, local path or hub id")
    _add_data_args(p)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--max-seq-length", type=int, default=128)
    p.add_argument("--threads", type=int)
    p.add_argument("--miner", help="model that mines hard negatives (default: the model being trained)")
    p.add_argument("--no-hard-negatives", action="store_true", help="train on plain pairs")
    p.add_argument("--out", required=True, help="directory for the final model and metrics.json")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--json", action="store_true", help="also print the result as JSON")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("sweep", help="run (or resume) a sweep spec with Ray Tune")
    p.add_argument("spec", nargs="?", help="sweep YAML, e.g. sweeps/local.yaml")
    p.add_argument("--run-dir", help="where results go (default: runs/<sweep name>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="resume the sweep stored in RUN_DIR")
    p.add_argument("--fresh", action="store_true", help="delete RUN_DIR first instead of resuming it")
    p.add_argument("--no-final", action="store_true", help="skip the final stage (LanceDB + leaderboard)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a private local Ray)")
    # Where the shared services are; each beats the spec's value (which may be ${VAR:-default}).
    p.add_argument(
        "--tracking-uri", help="MLflow tracking URI (beats mlflow.tracking_uri and $MLFLOW_TRACKING_URI)"
    )
    p.add_argument(
        "--storage-path", help="Tune storage and, on object storage, the run's state (beats storage_path)"
    )
    p.add_argument("--lancedb-uri", help="LanceDB of the final stage (beats final.lancedb_uri)")
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser("evaluate", help="score models for retrieval in LanceDB and write a leaderboard")
    p.add_argument("--models", nargs="+", required=True, help="packaged names, local model dirs or hub ids")
    _add_data_args(p)
    p.add_argument("--out", help="output directory (default: runs/evaluate-<data label>)")
    p.add_argument("--query-types", nargs="+", choices=["vector", "fts", "hybrid"])
    p.add_argument("--rerankers", nargs="+", choices=["none", "rrf", "linear", "cross-encoder"])
    p.add_argument("--ks", nargs="+", type=int, help="hit@k cut-offs (default: 1 5 10)")
    p.add_argument(
        "--max-seq-length", type=int, help="truncate every model's inputs to this many tokens (default: own)"
    )
    p.add_argument(
        "--overfetch", type=int, help="a reranker sees k x this many candidates per query (default: 4)"
    )
    p.add_argument(
        "--cross-encoder", default="train", help="'train' (default), a cross-encoder dir or hub id, or none"
    )
    p.add_argument(
        "--metric",
        default=DEFAULT_LEADERBOARD_METRIC,
        choices=LEADERBOARD_METRICS,
        help=f"headline metric (default: {DEFAULT_LEADERBOARD_METRIC})",
    )
    p.add_argument("--lancedb", help="LanceDB URI (default: <out>/lancedb)")
    p.add_argument("--probe-size", type=int, help="questions sampled for the 'should you fine-tune?' probe")
    p.add_argument(
        "--encode-backend",
        choices=get_args(EncodeBackend),
        help="encoder of corpora and queries (default: auto = openvino on a CPU, torch on a GPU)",
    )
    p.add_argument("--tracking-uri", help="also log the report to MLflow at this URI")
    p.add_argument("--register-name", help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("report", help="rebuild a run's leaderboard from its stored results")
    p.add_argument("run_dir", help="a sweep run directory or an `embedtune evaluate` --out directory")
    p.add_argument("--metric", choices=LEADERBOARD_METRICS, help="leaderboard metric (default: as built)")
    p.set_defaults(func=_cmd_report)

    cli_init.add_parser(sub)

    p = sub.add_parser("search", help="search a run's served table by text with its recommended model")
    p.add_argument(
        "location", help="a sweep run directory, its LanceDB URI, or <lancedb>/serve (local or s3://)"
    )
    p.add_argument("question", help="the text to search for")
    p.add_argument("--dataset", help="which dataset's table (default: the only one)")
    p.add_argument("-k", type=int, default=5, help="answers to return (default: 5)")
    p.add_argument("--hybrid", action="store_true", help="vector + full-text, fused (default: vector)")
    p.add_argument("--json", action="store_true", help="print the hits as JSON")
    p.set_defaults(func=_cmd_search)
    return parser


class _Lines(logging.Formatter):
    """embedtune's own INFO lines as `[embedtune] message`; warnings and errors say so."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.levelno >= logging.WARNING:
            text = f"{record.levelname}: {text}"
        if not record.name.startswith("embedtune"):
            text = f"{record.name}: {text}"
        return f"[embedtune] {text}"


class _Stdout(logging.StreamHandler):
    """A handler writing to whatever `sys.stdout` is at the time (test capture included)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass


def configure_logging(verbose: bool = False) -> None:
    """The library logs; the CLI decides what shows: embedtune's INFO lines, other libraries'
    warnings (everything at DEBUG/INFO with --verbose)."""
    env.set_verbose(verbose)
    handler = _Stdout()
    handler.setFormatter(_Lines())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("embedtune").setLevel(logging.DEBUG if verbose else logging.INFO)


def _stop_gracefully_on_sigterm() -> None:
    """`ray job stop`, Kubernetes and `kill` send SIGTERM: treat it as Ctrl-C, so Tune saves its
    state, open trial runs are closed and the run dir's lock is released before the process goes."""
    import signal

    def to_sigint(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends at once
        os.kill(os.getpid(), signal.SIGINT)

    signal.signal(signal.SIGTERM, to_sigint)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    env.apply(offline=True if args.offline else None)
    configure_logging(args.verbose)
    _stop_gracefully_on_sigterm()
    try:
        return args.func(args)
    except EmbedtuneError as exc:
        print(
            f"embedtune: error: {redact(str(exc))}", file=sys.stderr
        )  # a value quoted back: no secret in it
        return 2
    except KeyboardInterrupt:
        print("embedtune: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if not storage.is_disk_full(exc):
            raise
        # A full disk where no stage said more (a checkpoint, a file a library wrote): one line still.
        line = storage.disk_full_error(
            storage.full_path(exc) or "the run",
            "the run's files",
            "move the run (--run-dir, storage_path) to a bigger disk",
        )
        print(f"embedtune: error: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
