"""The final stage: score the picked checkpoints in LanceDB next to the untouched base models, write
the leaderboard, log it to MLflow and register the winner.

Evaluation runs per dataset (`embedtune.evaluate.evaluate_models`); the report
(`embedtune.report.build_report`) is written into the run dir as a whole. With a tracking URI the
report folder is logged to the sweep's parent run (artifact path `report/`) with summary metrics
`final.<dataset>.*`, and the winner (the tuned model with the best leaderboard metric) is logged in a
child run of the parent and registered under `register_name` with the alias `alias`.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from embedtune import storage
from embedtune.clock import StageClock
from embedtune.data import PreparedData, resolve_source
from embedtune.errors import EmbedtuneError
from embedtune.final.cross_encoder_early import RerankerJob, reranker_jobs
from embedtune.final.cross_encoder_gate import GateResult
from embedtune.final.harm import do_no_harm
from embedtune.final.pick import epoch_entries, pick_models, seed_entries
from embedtune.final.registry import log_report, log_report_files, register_winner, standalone_run
from embedtune.final.serve import serve_datasets
from embedtune.models import resolve_model
from embedtune.records import HarmCheck, ModelEntry, TrialRecord
from embedtune.report import dataset_sources, report_with_timings
from embedtune.rundir import RunDir
from embedtune.specs import FinalSpec
from embedtune.specs.metrics import DEFAULT_SWEEP_METRIC

log = logging.getLogger(__name__)


@dataclass
class FinalResult:
    """What the final stage produced."""

    report_dir: Path
    results_path: Path
    files: dict[str, Path]
    winner: dict[str, Any] | None
    registered: dict[str, Any] | None = None  # {"name", "version", "alias", "model_uri", "run_id"}
    picked: dict[str, list[ModelEntry]] = field(default_factory=dict)
    cross_encoders: dict[str, str] = field(default_factory=dict)
    verdicts: dict[str, dict[str, Any]] = field(default_factory=dict)  # per dataset, see report.verdict
    dataset_winners: dict[str, dict[str, Any]] = field(default_factory=dict)  # per dataset: its best row
    leaderboard: Any = None  # the report's leaderboard frame
    metric: str = DEFAULT_SWEEP_METRIC  # the leaderboard metric
    served: dict[str, Any] = field(default_factory=dict)  # per dataset: its served table (final.serve)
    blocks: list = field(default_factory=list)  # the report page (report.render), to stamp the times on


def cross_encoders(
    spec: FinalSpec,
    datasets: dict[str, PreparedData],
    triplets: dict[str, Any],
    bi_encoders: dict[str, str] | None = None,
    early: dict[str, tuple[RerankerJob, Path, GateResult | None]] | None = None,
) -> tuple[dict[str, str], list[GateResult]]:
    """Cross-encoder path (or hub id) per dataset label, and the gate results; empty when the spec
    asks for none. A pretrained cross-encoder named in the spec is used as given. One trained here
    is trained without a held-back share of the training questions and used only where it improves
    the ordering of the dataset's bi-encoder (`bi_encoders[label]`, default the cross-encoder's own
    base) on them (`cross_encoder_gate`). `early`: what was trained and gated beside the trials
    (`EarlyCrossEncoders.wait()`), taken as is where it was made for the same job."""
    if spec.cross_encoder is None or "cross-encoder" not in spec.eval.rerankers:
        return {}, []
    if spec.cross_encoder != "train":
        return dict.fromkeys(datasets, spec.cross_encoder), []
    out, gates = {}, []
    for job in reranker_jobs(spec, datasets, triplets, bi_encoders):
        made = (early or {}).get(job.label)
        if made is not None and made[0].key() == job.key():
            path, gate = made[1], made[2]
        else:
            path = job.train()
            gate = job.gate(path)
        log.info("cross-encoder reranker for %s: %s", job.label, path)
        if gate is not None:
            gates.append(gate)
            if not gate.used:
                continue
        out[job.label] = str(path)
    return out, gates


def local_models(entries: list[ModelEntry], checkpoints: Path) -> list[ModelEntry]:
    """`entries` with local model folders: base models resolved, remote checkpoints downloaded (once)
    under `checkpoints`; a checkpoint that is gone is skipped with a warning."""
    out = []
    for e in entries:
        if e.kind != "tuned":
            out.append(replace(e, path=str(resolve_model(e.path))))
            continue
        path = e.path
        if storage.is_remote(path):
            # One local copy per checkpoint (a resumed trial's best checkpoint may change: a copy
            # of another one must never stand in for it), and none of a checkpoint Tune deleted
            # (beyond checkpoints.keep): the copies obey checkpoints.keep too.
            ckpt = path.rstrip("/").rsplit("/", 1)[0]  # .../<trial>/checkpoint_00000N
            trial_dir, name = ckpt.rsplit("/", 1)
            local = checkpoints / str(e.trial_id) / name / "model"
            if not local.exists() and not storage.download_dir(path, local):
                log.warning("checkpoint of trial %s is gone (%s); skipping it", e.trial_id, path)
                continue
            for copy in local.parent.parent.iterdir():
                if copy.name != name and not storage.exists(storage.join(trial_dir, copy.name)):
                    shutil.rmtree(copy, ignore_errors=True)
            path = str(local)
        elif not Path(path).exists():
            log.warning("checkpoint of trial %s is gone (%s); skipping it", e.trial_id, path)
            continue
        out.append(replace(e, path=path))
    return out


def evaluate_and_report(
    rundir: RunDir,
    entries: dict[str, list[ModelEntry]],
    datasets: dict[str, PreparedData],
    triplets: dict[str, Any],
    trials: list[TrialRecord],
    spec: FinalSpec,
    mlflow_parent_run_id: str | None = None,
    tracking_uri: str | None = None,
    epoch_models: dict[str, list[ModelEntry]] | None = None,
    sweep_name: str | None = None,
    sweep_metric: str = DEFAULT_SWEEP_METRIC,
    clock: StageClock | None = None,
    early_cross_encoders: dict[str, tuple[RerankerJob, Path, GateResult | None]] | None = None,
) -> FinalResult:
    """Evaluate `entries` per dataset (and `epoch_models`, see `epoch_entries` and `seed_entries`,
    on vector search only), build the report, log and register. Shared by the sweep's final stage and
    `embedtune evaluate`. Each part is timed as a `final/...` stage of `clock`."""
    import pandas as pd

    from embedtune.evaluate import evaluate_models
    from embedtune.report import build_report

    rundir.create()
    for data in datasets.values():
        rundir.save_data(data)  # what `embedtune report` rebuilds from
    db_uri = spec.lancedb_uri or rundir.default_lancedb
    for ood in spec.ood:
        resolve_source(ood)  # a missing OOD file fails now, not after the evaluation
    bases = {
        label: next((e.path for e in models if e.kind == "base"), None) for label, models in entries.items()
    }
    clock = clock or StageClock()
    with clock.stage("final/cross_encoder"):
        cross, gates = cross_encoders(
            spec, datasets, triplets, {k: v for k, v in bases.items() if v}, early_cross_encoders
        )
    if spec.cross_encoder != "train" or "cross-encoder" not in spec.eval.rerankers:
        clock.skip("final/cross_encoder", "none trained")
    no_ce = spec.eval.model_copy(
        update={"rerankers": [r for r in spec.eval.rerankers if r != "cross-encoder"]}
    )
    frames = []
    resolved: dict[str, list[ModelEntry]] = {}
    for label, models in entries.items():
        if label not in datasets:
            raise EmbedtuneError(
                f"no prepared data for dataset {label!r} (expected {rundir.data_file(label)})"
            )
        with clock.stage(f"final/scoring/{label}"):  # the ingest into LanceDB and the search
            models = resolved[label] = local_models(models, rundir.checkpoints)
            log.info(
                "evaluating %d model(s) on %s: %s", len(models), label, ", ".join(m.label for m in models)
            )
            eval_spec = spec.eval if label in cross else no_ce
            frames.append(
                evaluate_models(
                    models,
                    datasets[label],
                    eval_spec,
                    db_uri,
                    cross_encoder_path=cross.get(label),
                    encode_backend=spec.encode_backend,
                )
            )
        if not (epoch_models or {}).get(label):
            continue
        with clock.stage("final/epochs"):
            extra = local_models(epoch_models[label], rundir.checkpoints)
            if extra:
                log.info(
                    "epoch comparison on %s (vector search): %s", label, ", ".join(m.label for m in extra)
                )
                vector_only = spec.eval.model_copy(
                    update={"query_types": ["vector"], "rerankers": ["none"], "dims": None}
                )
                frames.append(
                    evaluate_models(
                        extra,
                        datasets[label],
                        vector_only,
                        db_uri,
                        progress=False,
                        encode_backend=spec.encode_backend,
                    )
                )
                resolved[label] = [*models, *extra]
    if not clock.ran("final/epochs"):
        clock.skip(
            "final/epochs", "no other epoch count" if epoch_models is not None else "final.epoch_compare off"
        )
    results = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    harm = HarmCheck(metric=spec.leaderboard_metric, alpha=spec.harm_alpha)
    if spec.ood and not results.empty:
        with clock.stage("final/harm"):
            try:
                harm = do_no_harm(results, trials, resolved, spec, db_uri, dataset_sources(rundir))
            except Exception as exc:  # the leaderboard must not be lost to the extra check
                log.warning("do-no-harm check failed (%s: %s); report without it", type(exc).__name__, exc)
    else:
        clock.skip("final/harm", "no final.ood" if not spec.ood else "nothing evaluated")
    with clock.stage("final/report"):
        report = build_report(
            rundir,
            trials,
            results,
            datasets,
            metric=spec.leaderboard_metric,
            sweep_metric=sweep_metric,
            probe_size=spec.probe_size,
            harm=harm,
            gates=gates,
            encode_backend=spec.encode_backend,
        )
        if tracking_uri:
            parent = mlflow_parent_run_id or standalone_run(tracking_uri, rundir.path, rundir.path.name)
            log_report(tracking_uri, parent, report)
    final = FinalResult(
        report.report_dir,
        report.files["results"],
        report.files,
        report.winner,
        picked=entries,
        cross_encoders=cross,
        verdicts=report.verdicts,
        dataset_winners=report.dataset_winners,
        leaderboard=report.leaderboard,
        metric=report.metric,
        blocks=report.blocks,
    )
    registers = bool(
        tracking_uri and spec.registry and report.winner and report.winner.get("kind") == "tuned"
    )
    with clock.stage("final/registry"):
        if registers:
            name = spec.register_name or f"embedtune-{sweep_name or rundir.path.name}"
            final.registered = register_winner(
                tracking_uri, parent, report.winner, name, spec.alias, spec.leaderboard_metric
            )
            log.info(
                "registered %s as %s v%s (alias %s)",
                report.winner["model"],
                name,
                final.registered["version"],
                spec.alias,
            )
        elif tracking_uri and spec.registry:
            log.info("no tuned model was evaluated: nothing registered")
    if not registers:
        why = (
            "final.registry off"
            if not spec.registry
            else "no tracking URI"
            if not tracking_uri
            else "no tuned winner"
        )
        clock.skip("final/registry", why)
    return final


def with_eval_cut(spec: FinalSpec, max_seq_length: int | None, dims: list[int] | None = None) -> FinalSpec:
    """`spec` with the sweep's training truncation as its evaluation's, and its Matryoshka
    dimensions as the evaluation's `dims`, each unless `spec.eval` sets its own."""
    update: dict[str, Any] = {}
    if max_seq_length and spec.eval.max_seq_length is None:
        update["max_seq_length"] = max_seq_length
    if dims and spec.eval.dims is None:
        update["dims"] = list(dims)  # train.matryoshka_dims: distinct, largest first already
    return spec.model_copy(update={"eval": spec.eval.model_copy(update=update)}) if update else spec


def run_final_stage(
    rundir: RunDir,
    trials: list[TrialRecord],
    datasets: dict[str, PreparedData],
    triplets: dict[str, Any],
    base_models: list[str],
    spec: FinalSpec,
    mlflow_parent_run_id: str | None,
    tracking_uri: str | None,
    max_seq_length: int | None = None,
    sweep_name: str | None = None,
    sweep_metric: str = DEFAULT_SWEEP_METRIC,
    clock: StageClock | None = None,
    early_cross_encoders: dict[str, tuple[RerankerJob, Path, GateResult | None]] | None = None,
    matryoshka_dims: list[int] | None = None,
) -> FinalResult:
    """Pick (see `pick_models`), evaluate in LanceDB, report, log to the parent run, register the winner.
    `max_seq_length` (the sweep's training truncation) applies to every model unless `spec.eval`
    sets its own, so the base models are not scored on longer inputs than the tuned ones;
    `matryoshka_dims` (the sweep's train.matryoshka_dims) become the evaluation's `dims`.
    `early_cross_encoders`: the cross-encoders made beside the trials (`EarlyCrossEncoders`)."""
    clock = clock or StageClock()
    spec = with_eval_cut(spec, max_seq_length, matryoshka_dims)
    entries = pick_models(trials, base_models, spec.top_k, spec.metric, spec.mode, datasets=list(datasets))
    entries = {k: v for k, v in entries.items() if k in datasets}
    extra = epoch_entries(trials, entries, spec.metric, spec.mode) if spec.epoch_compare else None
    twins = seed_entries(trials, entries, extra, spec.metric)  # search.second_seed's, for the report
    if twins:
        extra = {ds: [*(extra or {}).get(ds, []), *twins.get(ds, [])] for ds in {*(extra or {}), *twins}}
    final = evaluate_and_report(
        rundir,
        entries,
        datasets,
        triplets,
        trials,
        spec,
        mlflow_parent_run_id,
        tracking_uri,
        extra,
        sweep_name,
        sweep_metric,
        clock,
        early_cross_encoders,
    )
    if spec.serve:
        with clock.stage("final/served"):
            final.served = serve_datasets(
                rundir, final, datasets, spec, tracking_uri, mlflow_parent_run_id, sweep_name
            )
    else:
        clock.skip("final/served", "final.serve off")
    return final


def stamp_timings(
    rundir: RunDir, final: FinalResult, timings: dict[str, Any], tracking_uri: str | None, run_id: str | None
) -> None:
    """Put the run's times (`StageClock.to_dict()`) into its report once every stage is done: the
    time line at the top of the leaderboard pages and `timings` in meta.json, on disk, in a remote
    run dir and in the MLflow run's `report/` artifacts."""
    if not final.blocks:
        return
    files = report_with_timings(rundir, final.blocks, timings)
    if tracking_uri and run_id:
        log_report_files(tracking_uri, run_id, [final.report_dir / name for name in files])
