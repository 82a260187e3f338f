"""The final stage of a sweep: `pick` (which checkpoints), `stage` (LanceDB evaluation and the
report), `cross_encoder_train` (a cross-encoder reranker trained offline) and `cross_encoder_gate`
(is it better than the bi-encoder's own ordering?), `harm` (the do-no-harm check on out-of-domain
data) and `registry` (MLflow)."""

from embedtune.final.stage import FinalResult, evaluate_and_report, run_final_stage, stamp_timings

__all__ = ["FinalResult", "evaluate_and_report", "run_final_stage", "stamp_timings"]
