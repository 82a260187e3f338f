"""Job for check (e): the autoscaler on the loopback fake provider.

Submit with `ray job submit --working-dir cluster/local/checks/jobs -- python autoscale.py`.
Expects no worker node at start (run it after the idle timeout, or right after `up`).
  1. two tasks with num_gpus=0.5 (num_cpus=0): one worker node appears and runs both;
  2. the idle worker goes away after idle_timeout_minutes;
  3. a task with num_gpus=1 that sleeps; its worker raylet is SIGKILLed (found by the node id in
     its environment: the fake provider sets RAY_OVERRIDE_NODE_ID_FOR_TESTING); does the task get
     retried on a replacement node, and how fast?
Prints timings as one JSON line (prefix RESULT).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import psutil
import ray


def workers() -> list[dict]:
    return [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU")]


def wait(pred, timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return round(time.monotonic() - t0, 1)
        time.sleep(0.5)
    raise TimeoutError(f"{what}: not within {timeout}s")


@ray.remote(num_gpus=0.5, num_cpus=0)
def half_gpu(seconds: float) -> str:
    time.sleep(seconds)
    return ray.get_runtime_context().get_node_id()


@ray.remote(num_gpus=1, num_cpus=0, max_retries=3)
def whole_gpu(seconds: float) -> tuple[str, int]:
    time.sleep(seconds)
    return ray.get_runtime_context().get_node_id(), os.getpid()


def raylet_of(node_id: str) -> psutil.Process | None:
    for proc in psutil.process_iter(["name"]):
        if proc.info["name"] != "raylet":
            continue
        try:
            if proc.environ().get("RAY_OVERRIDE_NODE_ID_FOR_TESTING") == node_id:
                return proc
        except psutil.Error:
            continue
    return None


def main() -> int:
    ray.init()
    head = ray.get_runtime_context().get_node_id()
    out: dict = {"head": head, "workers_at_start": len(workers())}
    # Workers of an earlier job go first (idle timeout), so the launch below is measured.
    out["s_waited_for_no_workers"] = wait(lambda: not workers(), 400, "no worker node at start")

    t0 = time.monotonic()
    refs = [half_gpu.remote(20) for _ in range(2)]
    out["s_to_first_worker"] = wait(lambda: workers(), 180, "a worker node for 2 x 0.5 GPU")
    nodes = ray.get(refs)
    out["half_gpu_task_nodes"] = nodes
    out["half_gpu_tasks_shared_one_node"] = len(set(nodes)) == 1 and head not in nodes
    out["workers_during_half_gpu"] = len(workers())
    out["s_half_gpu_total"] = round(time.monotonic() - t0, 1)

    out["s_idle_worker_removed_after_tasks"] = wait(lambda: not workers(), 400, "idle worker removal")

    ref = whole_gpu.remote(90)
    wait(lambda: workers(), 180, "a worker for the 1-GPU task")
    node = workers()[0]["NodeID"]
    time.sleep(5)  # let the task start on it
    victim = raylet_of(node)
    out["killed_raylet"] = {"node": node, "pid": victim.pid if victim else None}
    if victim is None:
        print("RESULT " + json.dumps(out))
        return 1
    victim.send_signal(signal.SIGKILL)
    t2 = time.monotonic()
    out["s_node_marked_dead"] = wait(
        lambda: node not in [n["NodeID"] for n in ray.nodes() if n["Alive"]], 180, "dead node noticed"
    )
    out["s_replacement_worker_alive"] = wait(
        lambda: any(n["NodeID"] != node for n in workers()), 300, "replacement worker"
    )
    try:
        new_node, _ = ray.get(ref, timeout=300)
        out["retried_task_node"] = new_node
        out["task_retried_on_replacement"] = new_node != node
    except Exception as exc:  # noqa: BLE001
        out["retried_task_error"] = f"{type(exc).__name__}: {exc}"[:300]
    out["s_kill_to_task_done"] = round(time.monotonic() - t2, 1)
    out["s_total"] = round(time.monotonic() - t0, 1)
    print("RESULT " + json.dumps(out))
    return 0 if out.get("half_gpu_tasks_shared_one_node") and out.get("task_retried_on_replacement") else 1


if __name__ == "__main__":
    sys.exit(main())
