"""The distributed path for real: a two-node Ray cluster on loopback, sweeps submitted to it.

One head and one worker node (`ray.cluster_utils.Cluster`, each its own raylet, object store and
agents; the worker joins the head's GCS over 127.0.0.1) run small real sweeps through
`embedtune.sweep.run_sweep(..., ray_address=...)`:

- trials land on both nodes (the trial data travels through the object store from the head), and
  trials.json has the shape of a local run of the same spec;
- every process of the cluster runs with the private HOME holding `ray_bootstrap_config.yaml`
  (so the head skips its cloud-metadata probes), usage stats and token auth off, and nothing
  lands in the real HOME.

Only the nodes started here are shut down (fixture teardown); `ray stop` is never used. The
cluster path as users run it (`make cluster-local`: S3, PostgreSQL, MLflow, an autoscaling Ray with
token auth, `ray job submit`, a node lost under a trial, fractional GPUs) is tests/test_cluster_local.py.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

HEAD_RESOURCE = "embedtune_test_head"
WORKER_RESOURCE = "embedtune_test_worker"
TRIAL_KEYS = {
    "trial_id",
    "model",
    "model_label",
    "dataset",
    "epochs",
    "lr",
    "batch_size",
    "warmup_ratio",
    "seed",
    "status",
    "duration_s",
    "gpu_seconds",
    "epochs_done",
    "history",
    "best_epoch",
    "best_metrics",
    "best_checkpoint",
    "mlflow_run_id",
}


def _raw_spec(name: str, resources: dict, epochs: list[int], seeds: list[int], smaller: bool = False) -> dict:
    """A sweep small enough for two CPU cores: one small model on 80 real MedQuAD pairs (`smaller`:
    no hard negatives either, where only the placement of trials is under test)."""
    raw = {
        "name": name,
        "datasets": [
            {
                "name": "medquad",
                "source": "medquad-sample",
                "max_pairs": 80,
                "eval_size": 10,
                "max_train_pairs": 16,
            }
        ],
        "models": ["paraphrase-MiniLM-L3-v2"],
        # separate: one Tune trial per epoch count (these tests place trials on nodes)
        "search": {
            "mode": "grid",
            "epochs": epochs,
            "batch_size": [16],
            "seed": seeds,
            "epochs_mode": "separate",
        },
        "train": {"max_seq_length": 64},
        "mining": {"model": "paraphrase-MiniLM-L3-v2"},
        "resources": resources,
        "scheduler": {"type": "none"},
        "max_concurrent_trials": 2,
        "mlflow": {"log_models": False},
    }
    if smaller:
        raw["train"]["hard_negatives"] = False
    return raw


def _spec(name: str, resources: dict, epochs: list[int], seeds: list[int], smaller: bool = False):
    from embedtune.specs import parse_spec

    return parse_spec(_raw_spec(name, resources, epochs, seeds, smaller))


def _real_home_ray_files() -> dict[str, float]:
    """What Ray could leave in the real HOME (token, bootstrap config, default results dir), with mtimes."""
    home = Path(os.path.expanduser("~"))
    paths = [home / ".ray" / "auth_token", home / "ray_bootstrap_config.yaml", home / "ray_results"]
    return {str(p): p.stat().st_mtime for p in paths if p.exists()}


class LoopbackCluster:
    def __init__(self, cluster, base: Path, home: Path, env: dict[str, str], node_args: dict, node_env: dict):
        self.cluster = cluster
        self.base = base
        self.home = home
        self.env = env
        self.node_args = node_args
        self.node_env = node_env
        self.head = cluster.head_node
        (self.worker,) = cluster.worker_nodes

    def add_node(self, **kwargs):
        """One more worker node (its own raylet and object store) joining the head over loopback."""
        from embedtune import ray_env

        with ray_env.patched_environ(self.node_env):
            node = self.cluster.add_node(**self.node_args, **kwargs)
        self.cluster.wait_for_nodes()
        return node

    @property
    def address(self) -> str:
        return self.cluster.address

    def processes(self):
        """Every live process of both nodes: the ones Ray started directly and their children
        (agents, core workers)."""
        import psutil

        seen = {}
        for node in (self.head, self.worker):
            for infos in node.all_processes.values():
                for info in infos:
                    try:
                        proc = psutil.Process(info.process.pid)
                        seen[proc.pid] = proc
                        for child in proc.children(recursive=True):
                            seen[child.pid] = child
                    except psutil.NoSuchProcess:
                        pass
        return list(seen.values())


@pytest.fixture(scope="module")
def loopback_cluster():
    from ray.cluster_utils import Cluster

    from embedtune import ray_env

    real_home_before = _real_home_ray_files()
    base = Path(tempfile.mkdtemp(prefix="etc-", dir="/tmp"))  # short: socket paths are length-limited
    home = ray_env.private_home(base / "home")
    env = ray_env.ray_process_env(home)
    env["RAY_AUTH_MODE"] = "disabled"
    with pytest.MonkeyPatch.context() as mp:
        # For the driver (this process) while the module runs; HOME only while nodes start.
        mp.delenv("RAY_ADDRESS", raising=False)
        mp.setenv("RAY_TMPDIR", str(base))  # where Cluster writes/removes ray_current_cluster
        for key, value in env.items():
            if key != "HOME":
                mp.setenv(key, value)
        node_args = {
            "node_ip_address": "127.0.0.1",
            "dashboard_agent_listen_port": None,  # pick free ports: other Ray instances may run here
            "object_store_memory": 100 * 2**20,
        }
        node_env = env | {
            # The `embedtune` command of this environment, for job entrypoints.
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            # Ray's own processes join the cluster too (the dashboard agent does for every submitted
            # job) and rewrite 127.0.0.1 to the machine's outward IP first, where nothing listens
            # here. This switch (meant for macOS/Windows, where Ray clusters are single-machine)
            # makes them keep loopback addresses; `ray start --address` would refuse it, Cluster
            # does not use that path. The driver side is embedtune.ray_env's own business.
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        }
        cluster = Cluster(shutdown_at_exit=True)
        try:
            with ray_env.patched_environ(node_env):
                cluster.add_node(
                    num_cpus=1,
                    resources={HEAD_RESOURCE: 1},
                    temp_dir=str(base / "ray"),
                    include_dashboard=True,  # the job API (ray job submit), on 127.0.0.1
                    dashboard_port=None,  # 8265, or the next free port
                    **node_args,
                )
                cluster.add_node(
                    num_cpus=1,
                    num_gpus=1,
                    resources={WORKER_RESOURCE: 1},
                    # Its own runtime-env dir, as on a machine of its own: the nodes share one
                    # filesystem here, and a node's agent deletes a job's working_dir copy when
                    # its last user there exits, while the driver on the head still runs in it.
                    runtime_env_dir_name="runtime_resources_worker",
                    **node_args,
                )
            cluster.wait_for_nodes()
            yield LoopbackCluster(cluster, base, home, env, node_args, node_env)
        finally:
            import ray

            if ray.is_initialized():
                ray.shutdown()  # the driver connection only
            with ray_env.patched_environ({"HOME": str(home)}):
                cluster.shutdown()  # kills exactly the processes of the two nodes started above
    assert _real_home_ray_files() == real_home_before, (
        "Ray wrote to the real HOME (~/.ray/auth_token or the like)"
    )
    shutil.rmtree(base, ignore_errors=True)


def _results(run_dir: Path) -> dict[str, list[dict]]:
    """Tune's per-report rows (result.json) of every trial, by trial id."""
    out: dict[str, list[dict]] = {}
    for path in (run_dir / "tune").glob("*/result.json"):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if rows:
            out[rows[0]["trial_id"]] = rows
    return out


def _disconnect_and_check_released(address: str, timeout: float = 20.0) -> None:
    """Every CPU/GPU is free again once the sweep returns (no leaked trial actors or placement
    groups), then drop the driver's connection (the cluster keeps running). The sweep disconnects
    itself, so this joins the cluster again to look."""
    import ray

    from embedtune import ray_env

    if not ray.is_initialized():
        ray_env.init(address=address)
    try:
        deadline = time.time() + timeout
        while True:
            total, free = ray.cluster_resources(), ray.available_resources()
            if all(free.get(k, 0) == total.get(k, 0) for k in ("CPU", "GPU")) or time.time() > deadline:
                break
            time.sleep(0.5)
        assert {k: free.get(k, 0) for k in ("CPU", "GPU")} == {k: total.get(k, 0) for k in ("CPU", "GPU")}
    finally:
        ray.shutdown()


def _within(seconds: float, fn, *args, **kwargs):
    """fn(*args, **kwargs), failing the test instead of hanging when it does not return in time
    (the job client's HTTP calls have no timeout; teardown then stops the cluster, which ends them)."""
    box: dict = {}

    def run() -> None:
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # re-raised in the test's thread
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{getattr(fn, '__name__', fn)} did not return within {seconds} s"
    if "error" in box:
        raise box["error"]
    return box["value"]


def _shape(trials: list[dict]) -> list[tuple]:
    return sorted(
        (
            t["model"],
            t["dataset"],
            t["epochs"],
            t["status"],
            t["epochs_done"],
            [h["epoch"] for h in t["history"]],
            tuple(sorted(t["history"][-1]["metrics"])),
            t["best_epoch"] is not None,
            t["best_checkpoint"] is not None and Path(t["best_checkpoint"]).is_dir(),
            t["mlflow_run_id"] is not None,
        )
        for t in trials
    )


def test_cluster_processes_run_with_private_home(loopback_cluster):
    c = loopback_cluster
    assert (c.home / "ray_bootstrap_config.yaml").is_file()
    assert c.home != Path(os.path.expanduser("~"))
    checked = []
    for proc in c.processes():
        try:
            name, environ = proc.name(), proc.environ()
        except Exception:  # exited meanwhile
            continue
        if not environ:  # Python processes rewrite their title over /proc/PID/environ: checked below
            continue
        checked.append(name)
        assert environ.get("HOME") == str(c.home), (name, environ.get("HOME"))
        assert environ.get("RAY_USAGE_STATS_ENABLED") == "0", name
        assert environ.get("RAY_AUTH_MODE") == "disabled", name
    assert sum("raylet" in n for n in checked) == 2 and any("gcs_server" in n for n in checked), checked

    import ray

    from embedtune import ray_env

    assert c.address.startswith("127.0.0.1:")
    assert ray_env.init(address=c.address) is False  # joined, not started
    try:
        # The driver kept the loopback address (Ray would otherwise rewrite it to this machine's
        # outward IP, where nothing listens).
        assert ray._private.worker.global_worker.node.gcs_address == c.address
        # Two raylets, both on loopback, both in the cluster.
        nodes = [n for n in ray.nodes() if n["Alive"]]
        assert {n["NodeManagerAddress"] for n in nodes} == {"127.0.0.1"}
        assert sorted(n["NodeID"] for n in nodes) == sorted([c.head.node_id, c.worker.node_id])

        # What a worker process on each node sees.
        @ray.remote(num_cpus=0)
        def probe():
            return {
                "node_id": ray.get_runtime_context().get_node_id(),
                "home": os.environ.get("HOME"),
                "bootstrap": os.path.exists(os.path.expanduser("~/ray_bootstrap_config.yaml")),
                "usage_stats": os.environ.get("RAY_USAGE_STATS_ENABLED"),
                "auth_mode": os.environ.get("RAY_AUTH_MODE"),
            }

        seen = ray.get(
            [probe.options(resources={r: 0.01}).remote() for r in (HEAD_RESOURCE, WORKER_RESOURCE)]
        )
        assert [s["node_id"] for s in seen] == [c.head.node_id, c.worker.node_id]
        for s in seen:
            assert s["home"] == str(c.home) and s["bootstrap"], s
            assert s["usage_stats"] == "0" and s["auth_mode"] == "disabled", s
        assert not (c.home / ".ray" / "auth_token").exists()  # token auth off: no token written
    finally:
        ray.shutdown()


def test_sweep_spreads_trials_over_both_nodes(loopback_cluster, tmp_path):
    import ray

    from embedtune.sweep import run_sweep

    c = loopback_cluster
    spec = _spec("cluster-two-nodes", {"cpu": 1, "gpu": 0}, epochs=[1, 2], seeds=[42])
    try:
        result = run_sweep(spec, tmp_path / "cluster", final=False, ray_address=c.address)
        assert not ray.is_initialized()  # the sweep disconnected from the cluster it joined
    finally:
        _disconnect_and_check_released(c.address)
    trials = json.loads((tmp_path / "cluster" / "trials.json").read_text())
    assert trials == json.loads(json.dumps([t.to_dict() for t in result.trials], default=str))
    assert len(trials) == 2 and {t["status"] for t in trials} == {"FINISHED"}

    rows = _results(tmp_path / "cluster")
    assert set(rows) == {t["trial_id"] for t in trials}
    node_of = {tid: {r["system/node_id"] for r in rs} for tid, rs in rows.items()}
    assert all(len(v) == 1 for v in node_of.values()), node_of  # a trial stays on its node
    assert set().union(*node_of.values()) == {c.head.node_id, c.worker.node_id}, node_of

    # The same sweep on a private local Ray gives trials.json of the same shape.
    local = run_sweep(spec, tmp_path / "local", final=False)
    local_trials = json.loads((tmp_path / "local" / "trials.json").read_text())
    assert local.trials and len(local_trials) == len(trials)
    for t in trials + local_trials:
        assert TRIAL_KEYS <= set(t), TRIAL_KEYS - set(t)
    assert [sorted(t) for t in trials] == [sorted(t) for t in local_trials]
    assert _shape(trials) == _shape(local_trials)
    assert [len(t["history"]) for t in sorted(trials, key=lambda t: t["epochs"])] == [2, 3]


def test_memory_probe_runs_as_a_gpu_task_on_the_cluster(loopback_cluster, caplog):
    """On a joined cluster the GPU memory probe is a Ray task asking for the trial's GPU share: here
    it lands on the worker (the only node with a GPU, a logical one), finds no CUDA device there and
    the sweep goes on with a log line; the driver is disconnected afterwards."""
    import logging

    import ray

    from embedtune.specs import parse_spec
    from embedtune.sweep import preflight as pf

    spec = parse_spec(_raw_spec("probe", {"cpu": 1, "gpu": 0.5}, [1], [1]))
    with caplog.at_level(logging.INFO, logger="embedtune.sweep.preflight"):
        assert pf.check_gpu_memory(spec, loopback_cluster.address) == []
    assert "memory probe skipped: the GPU worker has no CUDA device" in caplog.text
    assert not ray.is_initialized()
