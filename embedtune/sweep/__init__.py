"""The sweep: `identity` (a trial's config hash, the space Tune draws from), `trainable` (what runs in
a trial), `preflight` (checks and the run dir's state), `tuner` (the Tune experiment),
`results` (trial records), `inputs` / `parent_run` / `trials` (steps 2-4 of a sweep) and `driver`
(`run_sweep`, five steps)."""

from embedtune.sweep.driver import SweepResult, default_run_dir, run_sweep

__all__ = ["SweepResult", "default_run_dir", "run_sweep"]
