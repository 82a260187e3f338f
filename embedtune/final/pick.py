"""Which models the final stage evaluates (pure).

Per (base model, dataset) the trial whose *best epoch* scores highest on the sweep metric (a trial's
`best_metrics`, not its last epoch), plus the `top_k` best trials overall, plus every base model as
the baseline of every dataset. Trials that are not usable (`TrialRecord.usable`) are never picked.
Ties are broken by fewer epochs trained, then by trial id, so the same trial list always gives the
same picks.
"""

from __future__ import annotations

from embedtune.models import model_label
from embedtune.records import ModelEntry, TrialRecord
from embedtune.specs.metrics import DEFAULT_SWEEP_METRIC


def tuned_label(trial: TrialRecord) -> str:
    """Leaderboard label of a trial's best checkpoint: `<base>-ft-e<best epoch>-<trial id>`."""
    return f"{trial.model_label}-ft-e{trial.best_epoch}-{trial.trial_id}"


def tuned_entry(trial: TrialRecord) -> ModelEntry:
    return ModelEntry(
        label=tuned_label(trial),
        path=str(trial.best_checkpoint),
        base_model=trial.model_label,
        kind="tuned",
        trial_id=trial.trial_id,
        epochs=trial.best_epoch,
    )


def pick_models(
    trials: list[TrialRecord],
    base_models: list[str],
    top_k: int = 2,
    metric: str = DEFAULT_SWEEP_METRIC,
    mode: str = "max",
    datasets: list[str] | None = None,
) -> dict[str, list[ModelEntry]]:
    """Models to evaluate, per dataset label: every base model (kind "base", `path` = the reference
    as given, resolved later), the best trial of each (base model, dataset) and the `top_k` best
    trials overall (see the module docstring)."""
    order = TrialRecord.best_first(metric, mode)
    usable = [t for t in trials if t.usable(metric)]
    chosen: dict[str, TrialRecord] = {}
    groups: dict[tuple[str, str], list[TrialRecord]] = {}
    for t in usable:
        groups.setdefault(t.key, []).append(t)
    for key in sorted(groups):
        best = min(groups[key], key=order)
        chosen[best.trial_id] = best
    for t in sorted(usable, key=order)[: max(top_k, 0)]:
        chosen.setdefault(t.trial_id, t)
    labels = list(dict.fromkeys([*(datasets or []), *sorted({str(t.dataset) for t in trials if t.dataset})]))
    out: dict[str, list[ModelEntry]] = {}
    for ds in labels:
        entries = [
            ModelEntry(label=model_label(m), path=m, base_model=model_label(m), kind="base")
            for m in base_models
        ]
        entries += [tuned_entry(t) for t in sorted(chosen.values(), key=order) if str(t.dataset) == ds]
        out[ds] = entries
    return out


def epoch_entries(
    trials: list[TrialRecord],
    picked: dict[str, list[ModelEntry]],
    metric: str = DEFAULT_SWEEP_METRIC,
    mode: str = "max",
) -> dict[str, list[ModelEntry]]:
    """Per dataset: for each base model, the best trial of every epoch count (its best epoch: the
    epochs its checkpoint was trained) that `picked` does not already hold. These are scored on
    vector search only: enough for the report's epoch advice, at a fraction of the full grid's cost."""
    sign = -1.0 if mode == "max" else 1.0
    best: dict[tuple[str, str, int], TrialRecord] = {}
    for t in sorted(
        (t for t in trials if t.usable(metric)), key=lambda t: (sign * t.score(metric), str(t.trial_id))
    ):
        best.setdefault((str(t.dataset), str(t.model_label), int(t.best_epoch)), t)
    out: dict[str, list[ModelEntry]] = {}
    for (ds, base, epochs), t in sorted(best.items()):
        have = {(e.base_model, e.epochs) for e in picked.get(ds, []) if e.kind == "tuned"}
        if ds in picked and (base, epochs) not in have:
            out.setdefault(ds, []).append(tuned_entry(t))
    return out


def seed_entries(
    trials: list[TrialRecord],
    picked: dict[str, list[ModelEntry]],
    also: dict[str, list[ModelEntry]] | None = None,
    metric: str = DEFAULT_SWEEP_METRIC,
) -> dict[str, list[ModelEntry]]:
    """Per dataset: the seed twins (same recipe, another seed: `search.second_seed`) of each picked
    tuned model that neither `picked` nor `also` holds, scored on vector search like `epoch_entries`
    so the report can compare the seeds of a winner."""
    by_id = {str(t.trial_id): t for t in trials}
    usable = [t for t in trials if t.usable(metric)]
    out: dict[str, list[ModelEntry]] = {}
    for ds, entries in picked.items():
        held = {e.trial_id for e in [*entries, *(also or {}).get(ds, [])] if e.trial_id}
        for e in entries:
            t = by_id.get(str(e.trial_id)) if e.kind == "tuned" else None
            if t is None:
                continue
            for twin in sorted(usable, key=lambda r: (r.seed, str(r.trial_id))):
                if twin.recipe == t.recipe and twin.seed != t.seed and twin.trial_id not in held:
                    held.add(twin.trial_id)
                    out.setdefault(ds, []).append(tuned_entry(twin))
    return out
