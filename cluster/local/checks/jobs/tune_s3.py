"""Job for check (b): Ray Tune with storage_path on S3, trials on autoscaled (logical) GPU workers.

Submit with `ray job submit --working-dir cluster/local/checks/jobs -- python tune_s3.py [STORAGE]`.
Two trials ({CPU: 1, GPU: 1} each, so one per worker node) report 3 iterations, each with a
tune.Checkpoint. In the first fit every trial fails on purpose after its 2nd checkpoint; then
`Tuner.restore(..., resume_errored=True)` resumes both from their checkpoints on S3 and they finish.
Prints one JSON line (prefix RESULT) with what the harness checks.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import uuid

import ray
from ray import tune


def trainable(config: dict) -> None:
    node = ray.get_runtime_context().get_node_id()
    start, resumed_from = 0, None
    ckpt = tune.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            start = resumed_from = json.load(open(os.path.join(d, "state.json")))["step"]
    for step in range(start + 1, 4):
        time.sleep(1)
        with tempfile.TemporaryDirectory() as d:
            json.dump({"step": step}, open(os.path.join(d, "state.json"), "w"))
            tune.report(
                {"step": step, "score": config["x"] * step, "node": node, "resumed_from": resumed_from},
                checkpoint=tune.Checkpoint.from_directory(d),
            )
        if step == 2 and resumed_from is None:
            raise RuntimeError("planned failure after the 2nd checkpoint (the restore resumes from it)")


def main() -> int:
    storage = sys.argv[1] if len(sys.argv) > 1 else "s3://embedtune/tune-checks"
    name = f"tune-s3-{uuid.uuid4().hex[:6]}"
    ray.init()
    head = ray.get_runtime_context().get_node_id()
    t0 = time.monotonic()
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"CPU": 1, "GPU": 1}),
        param_space={"x": tune.grid_search([1, 2])},
        run_config=tune.RunConfig(name=name, storage_path=storage, verbose=0),
    )
    first = tuner.fit()
    t_first = time.monotonic() - t0
    path = f"{storage.rstrip('/')}/{name}"
    assert tune.Tuner.can_restore(path), f"cannot restore {path}"
    t1 = time.monotonic()
    restored = tune.Tuner.restore(
        path, trainable=tune.with_resources(trainable, {"CPU": 1, "GPU": 1}), resume_errored=True
    )
    final = restored.fit()
    t_restore = time.monotonic() - t1
    trials = []
    for r in final:
        trials.append({"error": str(r.error) if r.error else None, "step": r.metrics.get("step"),
                       "resumed_from": r.metrics.get("resumed_from"), "node": r.metrics.get("node"),
                       "checkpoint": r.checkpoint.path if r.checkpoint else None,
                       "checkpoint_fs": type(r.checkpoint.filesystem).__name__ if r.checkpoint else None})  # fmt: skip
    nodes = [
        {"id": n["NodeID"], "alive": n["Alive"], "resources": n["Resources"], "ip": n["NodeManagerAddress"]}
        for n in ray.nodes()
    ]
    print("RESULT " + json.dumps({
        "path": path, "head": head, "first_errors": sum(1 for r in first if r.error), "trials": trials, "nodes": nodes,
        "seconds_first_fit": round(t_first, 1), "seconds_restore_fit": round(t_restore, 1),
        "env_in_driver": {k: ("set" if os.environ.get(k) else "unset") for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_URI")},
    }))  # fmt: skip
    ok = all(
        t["error"] is None and t["step"] == 3 and t["resumed_from"] == 2 and t["node"] != head for t in trials
    )
    return 0 if ok and len(trials) == 2 else 1


if __name__ == "__main__":
    sys.exit(main())
