"""Build a run's report (`build_report`) from evaluation rows and trial records, or rebuild it from
what the run stored (`rebuild_report`); the parts are the modules beside this one (see the package
docstring). The report is built in a staging folder and replaces the old one as a whole
(`RunDir.write_report`)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from embedtune import report_store as store
from embedtune.data import PreparedData
from embedtune.errors import EmbedtuneError
from embedtune.records import HarmCheck, TrialRecord
from embedtune.report.edges import edge_advice
from embedtune.report.epochs import epoch_advice, overfitting_flags
from embedtune.report.leaderboard import leaderboard, pick_winner
from embedtune.report.plots import COST_PLOT, plot_best, plot_cost, plot_epochs
from embedtune.report.probe import probe_all
from embedtune.report.render import page_blocks, render, with_time_line
from embedtune.report.seeds import seed_checks
from embedtune.report.verdict import should_fine_tune
from embedtune.rundir import RunDir
from embedtune.specs import SweepSpec
from embedtune.specs.metrics import DEFAULT_LEADERBOARD_METRIC, DEFAULT_SWEEP_METRIC

log = logging.getLogger(__name__)


@dataclass
class ReportResult:
    report_dir: Path
    files: dict[str, Path]  # leaderboard_md / leaderboard_csv / leaderboard_html / results / meta (/ harm)
    plots: list[Path]
    winner: dict[str, Any] | None  # see pick_winner: best tuned row that beats its base, by `metric`
    metric: str
    leaderboard: Any  # pandas.DataFrame
    dataset_winners: dict[str, dict[str, Any]] = field(default_factory=dict)
    verdicts: dict[str, dict[str, Any]] = field(default_factory=dict)
    flags: list[dict[str, Any]] = field(default_factory=list)
    harm: HarmCheck = field(default_factory=HarmCheck)
    blocks: list = field(default_factory=list)  # the page (render.Block), rendered as md and html

    @property
    def paths(self) -> list[Path]:
        return [*self.files.values(), *self.plots]


def _safe(text: str) -> str:
    import re

    return re.sub(r"[^\w.-]+", "_", str(text))


def stored_spec(rundir: RunDir) -> SweepSpec | None:
    """The run's stored sweep spec, or None: the report needs it only for the dataset sources and
    a lost meta.json's metric, so one that does not validate is a warning with its cause."""
    try:
        return rundir.spec()
    except EmbedtuneError as exc:
        log.warning("%s; the report is built without it", exc)
        return None


def dataset_sources(rundir: RunDir, spec: SweepSpec | None = None) -> dict[str, list[str]]:
    """Dataset label -> [source] from the run's stored spec (matched against model cards)."""
    out: dict[str, list[str]] = {}
    spec = spec or stored_spec(rundir)
    for ds in spec.datasets if spec else []:
        out.setdefault(ds.label, []).append(ds.source)
    return out


def overall_winner(board, dataset_winners: dict[str, Any], metric: str) -> dict[str, Any] | None:
    """The run's winner (what the registry gets): the dataset winner with the largest gain over its
    own base model. Raw scores of different datasets are not comparable (an easy dataset's small
    gain would outrank a hard one's large one), the gain is (as the scheduler's `compare: gain`)."""
    tuned = [w for w in dataset_winners.values() if w and w.get("kind") == "tuned"]
    gains = [w for w in tuned if (w.get(f"delta_{metric}") or 0) > 0]
    if len(dataset_winners) <= 1 or not gains:
        return pick_winner(board, metric)
    return max(gains, key=lambda w: (w[f"delta_{metric}"], w[metric], str(w["model"])))


def build_report(
    rundir: RunDir,
    trials: list[TrialRecord],
    results,
    datasets: dict[str, PreparedData],
    metric: str = DEFAULT_LEADERBOARD_METRIC,
    sweep_metric: str = DEFAULT_SWEEP_METRIC,
    probe_size: int = 200,
    harm: HarmCheck | None = None,
    sources: dict[str, list[str]] | None = None,
    gates: list | None = None,
    encode_backend: str = "torch",
    timings: dict[str, Any] | None = None,
) -> ReportResult:
    """Write the leaderboard (md, csv, html), plots and the stored inputs as `rundir`'s report.
    `encode_backend`: what the probe encodes with (the final stage passes `final.encode_backend`);
    `timings`: the run's times (`clock.StageClock.to_dict()`), a line of the summary when given."""
    if gates is None:  # a rebuild: the gates the run stored
        gate_rows = rundir.report_meta().get("reranker_gates", [])
    else:
        gate_rows = [g if isinstance(g, dict) else {**g.to_dict(), "line": g.line()} for g in gates]
    probe_cache = rundir.probe_cache()
    flags = overfitting_flags(trials, sweep_metric)
    spec = stored_spec(rundir) if trials or sources is None else None
    edges = edge_advice(trials, spec) if spec else {}  # a best value at the edge of the search
    board = leaderboard(results, trials, metric, flags, sweep_metric)
    epochs = epoch_advice(results, metric)
    dataset_winners = {str(ds): pick_winner(rows, metric) for ds, rows in board.groupby("dataset", sort=True)}
    winner = overall_winner(board, dataset_winners, metric)
    probes = probe_all(
        probe_cache,
        board,
        datasets,
        probe_size,
        sources if sources is not None else dataset_sources(rundir, spec),
        encode_backend,
    )
    verdicts = should_fine_tune(board, probes, metric, seed_checks(board, trials, dataset_winners, metric))
    harm = store.current_harm(harm or HarmCheck(), dataset_winners)
    for ds, v in verdicts.items():
        mine = harm.for_dataset(ds)
        v["harm"] = (
            {
                "metric": harm.metric,
                "alpha": harm.alpha,
                "test": harm.test,
                "rows": [{**r.__dict__, "forgetting": r.forgetting(harm.metric)} for r in mine],
            }
            if mine
            else None
        )
    names = {
        "leaderboard_csv": "leaderboard.csv",
        "leaderboard_md": "leaderboard.md",
        "leaderboard_html": "leaderboard.html",
        "results": store.RESULTS_FILE,
        "meta": store.META_FILE,
    }
    if harm.rows or harm.results:
        names["harm"] = store.HARM_FILE
    plot_names = [f"epochs_{_safe(ds)}.png" for ds in sorted(board["dataset"].unique())] + [
        "best_combinations.png",
        COST_PLOT,
    ]
    meta = {
        "metric": metric,
        "sweep_metric": sweep_metric,
        "probe_size": probe_size,
        "encode_backend": encode_backend,
        "winner": winner,
        "dataset_winners": dataset_winners,
        "verdicts": verdicts,
        "flags": flags,
        "epoch_advice": epochs,
        "search_edges": {ds: [a.to_dict() for a in items] for ds, items in edges.items()},
        "reranker_gates": gate_rows,
    }
    if timings:
        meta["timings"] = timings
    page: list = []

    def build(folder: Path) -> None:
        plots_dir = folder / "plots"
        plots_dir.mkdir(parents=True)
        plots = [
            plot_epochs(board, trials, str(ds), metric, sweep_metric, plots_dir / name)
            for ds, name in zip(sorted(board["dataset"].unique()), plot_names, strict=False)
        ]
        plots.append(plot_best(board, metric, plots_dir / plot_names[-2]))
        plots.append(plot_cost(board, metric, plots_dir / COST_PLOT))
        store.save_results(folder, results)
        board.to_csv(folder / names["leaderboard_csv"], index=False)
        blocks = page_blocks(
            board, metric, winner, verdicts, flags, plots, epochs, harm, dataset_winners, gate_rows, timings,
            edges,
        )  # fmt: skip
        page[:] = blocks
        (folder / names["leaderboard_md"]).write_text(render(blocks, "md"))
        (folder / names["leaderboard_html"]).write_text(render(blocks, "html"))
        store.write_json(folder / names["meta"], meta)
        store.write_json(folder / store.PROBE_FILE, probe_cache)
        if "harm" in names:
            store.write_json(folder / store.HARM_FILE, harm.to_dict())

    report_dir = rundir.write_report(build)
    files = {k: report_dir / v for k, v in names.items()}
    plots = [report_dir / "plots" / n for n in plot_names]
    return ReportResult(
        report_dir, files, plots, winner, metric, board, dataset_winners, verdicts, flags, harm, page
    )


def report_with_timings(rundir: RunDir, blocks: list, timings: dict[str, Any]) -> list[str]:
    """Stamp the run's times on its built report (`blocks`: its page): the summary's time line in
    leaderboard.md/html and `timings` in meta.json. The names of the files rewritten."""
    meta = rundir.report_meta()
    meta["timings"] = timings
    page = with_time_line(blocks, timings)
    files = {
        "leaderboard.md": render(page, "md").encode(),
        "leaderboard.html": render(page, "html").encode(),
        store.META_FILE: json.dumps(meta, indent=2, default=str).encode(),
    }
    rundir.update_report(files)
    return list(files)


def rebuild_report(rundir: RunDir | str | Path, metric: str | None = None) -> ReportResult:
    """Rebuild the report from what a run stored (the report's inputs, trials.json, data/<label>.json)
    without evaluating anything."""
    rundir = rundir if isinstance(rundir, RunDir) else RunDir(rundir)
    if not rundir.remote and not rundir.path.is_dir():
        raise EmbedtuneError(f"run dir {rundir} does not exist")
    rundir.pull_report()
    results = rundir.results()
    trials = rundir.trials()
    datasets = {}
    for label in sorted(results["dataset"].astype(str).unique()):
        data = rundir.data(label)
        if data is not None:
            datasets[label] = data
    meta = rundir.report_meta()
    spec = stored_spec(rundir)
    spec_metric = spec.metric if spec else None  # when meta.json is lost
    return build_report(
        rundir,
        trials,
        results,
        datasets,
        metric=metric or meta.get("metric") or spec_metric or DEFAULT_LEADERBOARD_METRIC,
        sweep_metric=meta.get("sweep_metric", DEFAULT_SWEEP_METRIC),
        probe_size=int(meta.get("probe_size", 200)),
        harm=rundir.harm(),
        encode_backend=meta.get("encode_backend", "torch"),
        timings=meta.get("timings"),
    )
