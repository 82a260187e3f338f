"""`make bench`: time and memory of the default sweep, as ratios against a baseline measured in
the same process (one plain training run of the same data and settings, no Ray, no MLflow).

Prints: the sweep's wall time (and its share of the 15-minute budget for `make sweep-local`),
each phase, the sweep's cost per trained epoch relative to the baseline's (what Ray, MLflow,
checkpoints and concurrency add or save), and peak memory (driver RSS) relative to the baseline.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

from embedtune import env

BUDGET_S = 15 * 60


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--spec", default=str(Path(__file__).resolve().parent.parent / "sweeps" / "local.yaml")
    )
    parser.add_argument("--run-dir", default=None, help="default: a temporary directory")
    args = parser.parse_args()
    env.apply(offline=True)

    from embedtune.config import load_spec
    from embedtune.data import prepare
    from embedtune.negatives import mine
    from embedtune.sweep import run_sweep
    from embedtune.train import TrainConfig, train

    spec = load_spec(args.spec)
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="embedtune-bench-"))

    # Baseline: one 1-epoch training run of the first model on the first dataset, in-process.
    data = prepare(spec.datasets[0])
    triplets = mine(data, spec.mining)
    cfg = TrainConfig(model=spec.models[0], epochs=1, lr=spec.search.lr[0], batch_size=spec.search.batch_size[0],
                      max_seq_length=spec.train.max_seq_length, threads=int(spec.resources.cpu))  # fmt: skip
    t0 = time.time()
    train(cfg, data, triplets, None, progress=False, evaluate_base=False)
    baseline_s = time.time() - t0
    baseline_rss = _peak_rss_mb()

    t1 = time.time()
    result = run_sweep(spec, run_dir, resume=False)
    sweep_s = time.time() - t1
    trained_epochs = sum(t["epochs_done"] for t in result.trials)
    n_models = len(spec.models)
    # the baseline trains the first model; weight by model count for a rough per-epoch unit
    per_epoch = sweep_s / max(trained_epochs, 1)

    print("\n== embedtune bench ==")
    print(f"trials: {len(result.trials)} ({trained_epochs} epochs trained, {n_models} models, "
          f"{len(spec.datasets)} datasets)")  # fmt: skip
    print(f"baseline: one epoch of {spec.models[0]} on {data.label}: {baseline_s:.1f}s (no Ray, no MLflow)")
    print(f"sweep wall time: {sweep_s:.1f}s = {sweep_s / BUDGET_S:.2f} x the 15-minute budget")
    for phase, seconds in result.timings.items():
        print(f"  {phase:<14} {seconds:8.1f}s  ({seconds / sweep_s:.0%})")
    print(f"sweep seconds per trained epoch / baseline epoch: {per_epoch / baseline_s:.2f}x")
    print(f"peak driver RSS: {_peak_rss_mb():.0f} MB = {_peak_rss_mb() / baseline_rss:.2f}x the baseline's")
    print(f"run dir: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
