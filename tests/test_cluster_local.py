"""The cluster path, run for real on this machine: `make cluster-local`'s servers (SeaweedFS S3,
PostgreSQL, MLflow with basic auth, a Ray head with token auth and an autoscaler on the loopback fake
multi-node provider), started and stopped by the project's own script, and sweeps submitted to it
with `ray job submit`, as the README tells a cluster user.

- the shipped `sweeps/cluster-local.yaml` runs to the end: GPU workers are launched for the trials,
  the trials run there (not on the head), every trial is one run in the PostgreSQL-backed MLflow
  with its model in S3, the final stage reads checkpoints from S3 and writes LanceDB tables and the
  report to S3;
- faults, each injected for real: the driver killed and, later in the same sweep, the head lost
  with its disk (each time the job resubmitted resumes from S3), a worker node killed under a trial
  (retried on a new worker from its S3 checkpoint), the tracking server and the object store
  crashed and restarted mid-sweep. Each checks: child runs in PostgreSQL = the trial
  configs, epochs continuous per trial, checkpoints in the bucket;
- the same sweep submitted twice at once: one job runs it, the other fails with one line (the
  run dir's lease on S3);
- unauthenticated job submission and MLflow writes are refused; every listening socket of the
  cluster is on 127.0.0.1, and `down` leaves no process behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "cluster" / "local" / "cluster_local.py"
RAY = str(Path(sys.executable).parent / "ray")
HEAD_NODE = "f" * 51 + "00000"  # the fake provider's head node id (workers: ...00001, ...00002)
DRIVER_USER = "sweeper"  # the sweep driver's MLflow user (cluster/mlflow_driver_user.py)


class Cluster:
    """The cluster `cluster_local.py up` started in `state`, and what a client needs to talk to it."""

    def __init__(self, state: Path) -> None:
        self.state = state
        out = subprocess.run([sys.executable, str(SCRIPT), "env", "--state-dir", str(state)], capture_output=True,
                             text=True, check=True).stdout  # fmt: skip
        self.env = dict(
            shlex.split(line.removeprefix("export "))[0].split("=", 1) for line in out.splitlines()
        )
        info = json.loads((state / "state.json").read_text())
        self.dsn = info["services"]["postgres"]["dsn"]
        self.dashboard = info["services"]["ray"]["dashboard"]

    def refresh(self) -> None:
        """Read the addresses again (a replaced head may listen on new ports)."""
        self.__init__(self.state)

    def script(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        cmd = [sys.executable, str(SCRIPT), *args, "--state-dir", str(self.state)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True)

    def client_env(self) -> dict[str, str]:
        return {**os.environ, **self.env}

    def admin_password(self) -> str:
        return (self.state / "secrets" / "mlflow_admin_password").read_text().strip()

    def mlflow_as(self, user: str, password: str, path: str, body: dict | None = None,
                  method: str = "POST") -> tuple[int, dict]:  # fmt: skip
        """(HTTP status, JSON answer) of one MLflow REST call with this basic-auth login."""
        import base64

        url = self.env["MLFLOW_TRACKING_URI"] + path
        auth = base64.b64encode(f"{user}:{password}".encode()).decode()
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, method=method,
                                         headers={"Content-Type": "application/json", "Authorization": f"Basic {auth}"})  # fmt: skip
        try:
            with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                request, timeout=30
            ) as resp:
                return resp.status, json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as err:
            return err.code, {}

    def permission(self, user: str, resource_type: str, resource_id: str) -> str:
        """`user`'s permission on one resource, as the tracking server's admin reads it."""
        from urllib.parse import urlencode

        query = urlencode({"username": user, "resource_type": resource_type, "resource_id": resource_id})
        status, answer = self.mlflow_as("admin", self.admin_password(), f"/api/3.0/mlflow/users/permissions/get?{query}",
                                        method="GET")  # fmt: skip
        assert status == 200, (status, answer)
        return answer["permission"]

    # -- jobs
    def submit(self, workdir: Path, spec: str, *extra: str, wait: bool = True, job_id: str | None = None,
               timeout: float = 900) -> subprocess.CompletedProcess:  # fmt: skip
        """`ray job submit --working-dir <workdir> -- embedtune sweep <spec>` (the README's line)."""
        runtime = {"env_vars": {"TUNE_GLOBAL_CHECKPOINT_S": "1"}}  # results reach S3 within a second
        cmd = [RAY, "job", "submit", "--address", self.dashboard, "--working-dir", str(workdir),
               "--runtime-env-json", json.dumps(runtime)]  # fmt: skip
        if job_id:
            cmd += ["--submission-id", job_id]
        if not wait:
            cmd.append("--no-wait")
        cmd += ["--", "embedtune", "sweep", spec, *extra]
        return subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=self.client_env(), cwd=workdir
        )

    def jobs(self):
        """Ray's job SDK, authenticated with the cluster's token."""
        from ray.job_submission import JobSubmissionClient

        token = Path(self.env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
        return JobSubmissionClient(self.dashboard, headers={"Authorization": f"Bearer {token}"})

    def logs(self, job_id: str) -> str:
        return self.jobs().get_job_logs(job_id)

    def wait_job(self, job_id: str, timeout: float = 900) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            status = str(self.jobs().get_job_status(job_id).value)
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                return status
            time.sleep(3)
        raise AssertionError(f"job {job_id} did not end within {timeout:.0f} s: {self.logs(job_id)[-2000:]}")

    # -- the stores
    def s3(self):
        from pyarrow import fs

        endpoint = self.env["AWS_ENDPOINT_URL"].removeprefix("http://")
        return fs.S3FileSystem(access_key=self.env["AWS_ACCESS_KEY_ID"], secret_key=self.env["AWS_SECRET_ACCESS_KEY"],
                               endpoint_override=endpoint, scheme="http", region="us-east-1")  # fmt: skip

    def files(self, prefix: str) -> list[str]:
        from pyarrow import fs

        s3 = self.s3()
        sel = fs.FileSelector(f"embedtune/{prefix}", recursive=True, allow_not_found=True)
        return sorted(i.path for i in s3.get_file_info(sel) if i.type == fs.FileType.File)

    def read(self, key: str) -> bytes:
        with self.s3().open_input_stream(f"embedtune/{key}") as src:
            return src.read()

    def sql(self, query: str, *params) -> list[tuple]:
        import psycopg2

        with patched({"PGPASSFILE": str(self.state / "secrets" / "pgpass")}):
            conn = psycopg2.connect(self.dsn)
        try:
            with conn.cursor() as cur:
                cur.execute(query, params)
                return cur.fetchall()
        finally:
            conn.close()

    def trial_runs(self, experiment: str) -> dict[str, str]:
        """{trial id: status} of the experiment's trial runs, straight from PostgreSQL."""
        rows = self.sql(
            "SELECT t2.value, r.status FROM runs r JOIN experiments e ON r.experiment_id = e.experiment_id "
            "JOIN tags t ON t.run_uuid = r.run_uuid AND t.key = 'embedtune.kind' AND t.value = 'trial' "
            "JOIN tags t2 ON t2.run_uuid = r.run_uuid AND t2.key = 'embedtune.trial_id' "
            "WHERE e.name = %s AND r.lifecycle_stage = 'active'",
            experiment,
        )
        runs: dict[str, str] = {}
        for trial_id, status in rows:
            assert trial_id not in runs, f"two MLflow runs for trial {trial_id}"
            runs[trial_id] = status
        return runs

    def steps(self, experiment: str, metric: str) -> dict[str, list[int]]:
        rows = self.sql(
            "SELECT t.value, m.step FROM metrics m JOIN runs r ON m.run_uuid = r.run_uuid "
            "JOIN experiments e ON r.experiment_id = e.experiment_id "
            "JOIN tags t ON t.run_uuid = r.run_uuid AND t.key = 'embedtune.trial_id' "
            "WHERE e.name = %s AND m.key = %s AND r.lifecycle_stage = 'active'",
            experiment,
            metric,
        )
        out: dict[str, list[int]] = {}
        for trial_id, step in rows:
            out.setdefault(trial_id, []).append(int(step))
        return {k: sorted(v) for k, v in out.items()}


@contextlib.contextmanager
def patched(values: dict[str, str]):
    from embedtune.env import patched_environ

    with patched_environ(values):
        yield


def _our_leftovers(cluster_id: str) -> list[int]:
    import psutil

    left = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if proc.environ().get("EMBEDTUNE_CLUSTER_LOCAL", "").startswith(cluster_id + "/"):
                left.append(proc.pid)
    return left


@pytest.fixture(scope="module")
def cluster():
    # /tmp, not pytest's 0700 tmp root: the PostgreSQL OS user must reach the state dir.
    state = Path(tempfile.mkdtemp(prefix="etest-cl-", dir="/tmp")) / "state"
    state.parent.chmod(0o755)
    up = subprocess.run([sys.executable, str(SCRIPT), "up", "--state-dir", str(state), "--idle-timeout-minutes", "0.25"],
                        capture_output=True, text=True, timeout=600)  # fmt: skip
    assert up.returncode == 0, up.stderr[-3000:]
    assert "ray job submit --working-dir . -- embedtune sweep sweeps/cluster-local.yaml" in up.stdout
    cluster_id = json.loads((state / "state.json").read_text())["cluster_id"]
    try:
        yield Cluster(state)
    finally:
        down = subprocess.run([sys.executable, str(SCRIPT), "down", "--purge", "--state-dir", str(state)],
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert down.returncode == 0, down.stderr[-3000:]
        assert not _our_leftovers(cluster_id)
        assert not list(Path("/tmp").glob("etcl-*")) or all(
            cluster_id not in p.read_text() for p in Path("/tmp").glob("etcl-*/owner") if p.exists()
        )
        shutil.rmtree(state.parent, ignore_errors=True)


def _spec_dir(tmp_path: Path, name: str, **changes) -> Path:
    """A working dir holding a variant of sweeps/cluster-local.yaml (its own name, so its own S3 state)."""
    raw = yaml.safe_load((REPO / "sweeps" / "cluster-local.yaml").read_text())
    raw.update(name=name, **changes)
    # The fault tests resume trials from the checkpoint of the epoch before the fault: separate mode
    # checkpoints every epoch, branch mode only its listed counts (README, "Faults a sweep survives").
    raw["search"] = {"mode": "grid", **raw.get("search", {}), "epochs_mode": "separate"}
    raw["mlflow"]["experiment"] = f"embedtune-{name}"
    workdir = tmp_path / name
    workdir.mkdir()
    (workdir / "spec.yaml").write_text(yaml.safe_dump(raw))
    return workdir


def _epochs(c: Cluster, sweep: str) -> dict[str, list[tuple[int, str]]]:
    """{trial dir: [(epoch, node id)] in reporting order} from the trials' result.json in S3."""
    out = {}
    for key in c.files(f"sweeps/{sweep}/tune"):
        if key.endswith("/result.json"):
            rows = [
                json.loads(line)
                for line in c.read(key.removeprefix("embedtune/")).decode().splitlines()
                if line
            ]
            out[key.split("/")[-2]] = [
                (int(r["epoch"]), r.get("system/node_id")) for r in rows if "epoch" in r
            ]
    return out


def _wait_epoch(c: Cluster, sweep: str, at_least: int, timeout: float = 600) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with contextlib.suppress(Exception):
            got = _epochs(c, sweep)
            if any(len(v) >= at_least for v in got.values()):
                return got
        time.sleep(1)
    raise AssertionError(f"no trial of {sweep} reported epoch {at_least} within {timeout:.0f} s")


def _trials(c: Cluster, sweep: str) -> list[dict]:
    return json.loads(c.read(f"sweeps/{sweep}/trials.json"))


def _check_sweep(c: Cluster, sweep: str, configs: int, epochs: int) -> dict:
    """What every fault test asserts: one FINISHED MLflow run per trial config in PostgreSQL, each
    trial's epochs 1..N reported once each (continuous across restarts), checkpoints in the bucket."""
    trials = _trials(c, sweep)
    assert len(trials) == configs and {t["status"] for t in trials} == {"FINISHED"}, trials
    runs = c.trial_runs(f"embedtune-{sweep}")
    assert len(runs) == configs and set(runs.values()) == {"FINISHED"}, runs
    assert set(runs) == {t["trial_id"] for t in trials}
    steps = c.steps(f"embedtune-{sweep}", "ir_recall_at_10")
    assert all(steps[t] == list(range(epochs + 1)) for t in runs), steps  # step 0 = base, once per epoch
    reported = _epochs(c, sweep)
    assert len(reported) == configs
    for trial_dir, rows in reported.items():
        assert [e for e, _ in rows] == list(range(1, epochs + 1)), (trial_dir, rows)
        assert all(node != HEAD_NODE for _, node in rows), rows  # trials never ran on the head
    for t in trials:
        assert t["best_checkpoint"].startswith("s3://embedtune/sweeps/")
        key = t["best_checkpoint"].removeprefix("s3://embedtune/") + "/model.safetensors"
        assert key in {k.removeprefix("embedtune/") for k in c.files(f"sweeps/{sweep}/tune")}
    assert not [k for k in c.files(f"sweeps/{sweep}") if k.endswith("mlflow_pending.json")]
    return {"trials": trials, "runs": runs, "epochs": reported}


def test_unauthenticated_job_submission_and_mlflow_writes_are_refused(
    cluster: Cluster, tmp_path: Path
) -> None:
    anonymous = {
        k: v for k, v in cluster.client_env().items() if not k.startswith(("RAY_AUTH", "MLFLOW_TRACKING_"))
    }
    cmd = [RAY, "job", "submit", "--address", cluster.dashboard, "--", "echo", "hi"]
    refused = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=anonymous)
    assert refused.returncode != 0 and "Authentication required" in refused.stdout + refused.stderr
    url = cluster.env["MLFLOW_TRACKING_URI"] + "/api/2.0/mlflow/experiments/create"
    body = json.dumps({"name": f"anon-{uuid.uuid4().hex[:6]}"}).encode()
    for headers in ({}, {"Authorization": "Basic YWRtaW46d3Jvbmc="}):  # none, admin:wrong
        request = urllib.request.Request(
            url, data=body, headers={"Content-Type": "application/json", **headers}
        )
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=30)
        assert err.value.code == 401
    # and a sweep whose MLflow login is wrong stops at once, before any data work, with one line
    workdir = _spec_dir(tmp_path, "bad-login")
    out = subprocess.run([sys.executable, "-m", "embedtune.cli", "sweep", "spec.yaml", "--no-final"], cwd=workdir,
                         capture_output=True, text=True, timeout=120,
                         env={**cluster.client_env(), "MLFLOW_TRACKING_PASSWORD": "wrong"})  # fmt: skip
    assert out.returncode == 2 and "refused the credentials" in out.stderr and "data " not in out.stdout
    assert len(out.stderr.strip().splitlines()) == 1


PROBE_JOB = """
import json, os, sys
import ray
from ray import tune

LOGIN = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


def seen(password):
    # What this process and its raylet (the node's own environment) carry of the MLflow login.
    with open(f"/proc/{os.getppid()}/environ", "rb") as fh:
        raylet = dict(kv.split("=", 1) for kv in fh.read().decode().split("\\0") if "=" in kv)
    return {"node": ray.get_runtime_context().get_node_id(),
            "keys": sorted(k for k in os.environ if k in LOGIN),
            "raylet_keys": sorted(k for k in raylet if k in LOGIN),
            "leaked": sorted(k for k, v in {**os.environ, **raylet}.items() if password in v)}


@ray.remote(num_gpus=1)
def task(password):
    return seen(password)


def trial(config):
    tune.report(seen(config["password"]))


password = os.environ["MLFLOW_TRACKING_PASSWORD"]  # the driver, on the head, has the login
ray.init()
out = {"driver_user": os.environ["MLFLOW_TRACKING_USERNAME"], "task": ray.get(task.remote(password))}
tuner = tune.Tuner(tune.with_resources(trial, {"cpu": 1, "gpu": 1}), param_space={"password": password},
                   run_config=tune.RunConfig(storage_path="s3://embedtune/probes", name=sys.argv[1]))
result = tuner.fit()[0]
out["trial"] = {k: result.metrics[k] for k in ("node", "keys", "raylet_keys", "leaked")}
print("PROBE " + json.dumps(out))
"""


def test_worker_nodes_carry_no_mlflow_login_and_the_driver_user_writes_only_its_own(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Least privilege: the sweep driver's MLflow user can write its own experiments and gets a
    real 403 from the real server on anyone else's; a task and a Tune trial on an autoscaled worker
    node (and the node's raylet) have no MLflow login in their environment, while the job driver on
    the head has it."""
    user, password = cluster.env["MLFLOW_TRACKING_USERNAME"], cluster.env["MLFLOW_TRACKING_PASSWORD"]
    assert user == DRIVER_USER
    tag = uuid.uuid4().hex[:8]
    status, made = cluster.mlflow_as("admin", cluster.admin_password(), "/api/2.0/mlflow/experiments/create",
                                     {"name": f"someone-else-{tag}"})  # fmt: skip
    assert status == 200, made
    other = made["experiment_id"]
    delete = "/api/2.0/mlflow/experiments/delete"
    assert cluster.mlflow_as(user, password, delete, {"experiment_id": other})[0] == 403
    assert (
        cluster.mlflow_as(user, password, "/api/2.0/mlflow/runs/create", {"experiment_id": other})[0] == 403
    )
    status, own = cluster.mlflow_as(
        user, password, "/api/2.0/mlflow/experiments/create", {"name": f"own-{tag}"}
    )
    assert (
        status == 200
        and cluster.mlflow_as(user, password, delete, {"experiment_id": own["experiment_id"]})[0] == 200
    )
    assert cluster.sql("SELECT lifecycle_stage FROM experiments WHERE experiment_id = %s", int(other)) == [
        ("active",)
    ]

    (tmp_path / "probe.py").write_text(PROBE_JOB)
    cmd = [RAY, "job", "submit", "--address", cluster.dashboard, "--working-dir", str(tmp_path), "--",
           "python", "probe.py", f"probe-{tag}"]  # fmt: skip
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, env=cluster.client_env(), cwd=tmp_path
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    (line,) = [ln for ln in done.stdout.splitlines() if ln.startswith("PROBE ")]
    probe = json.loads(line.removeprefix("PROBE "))
    assert probe["driver_user"] == DRIVER_USER
    for where in ("task", "trial"):
        seen = probe[where]
        assert seen["node"] != HEAD_NODE, probe  # on an autoscaled worker node
        assert seen["keys"] == [] and seen["raylet_keys"] == [] and seen["leaked"] == [], probe
    assert password not in done.stdout + done.stderr


def _check_served(c: Cluster, sweep: str, tmp_path: Path) -> None:
    """The served table is on S3 and searched by text from a process that has only the S3 keys and
    the MLflow login (and an empty EMBEDTUNE_HOME: a registry model is downloaded through the
    tracking server): restricted to the evaluated corpus, its vector hit@10 over the held-out
    questions is the leaderboard's (final.encode_backend: torch, the same encoder)."""
    import io

    import pandas as pd
    from test_serve import fresh_search, hits_at_10

    data = json.loads(c.read(f"sweeps/{sweep}/data/medquad.json"))
    env = {k: v for k, v in c.env.items() if k.startswith(("AWS_", "MLFLOW_"))}
    home = tmp_path / "laptop"
    home.mkdir()
    env |= {"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO), "HOME": str(home), "EMBEDTUNE_HOME": str(home / "et"),
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "NO_PROXY": "127.0.0.1,localhost"}  # fmt: skip
    qids = list(data["queries"])
    got = fresh_search(f"s3://embedtune/sweeps/{sweep}/lancedb/serve", "medquad",
                       [data["queries"][q] for q in qids], tmp_path, env=env, only_ids=list(data["corpus"]))  # fmt: skip
    meta, (fn,) = got["meta"], got["functions"]
    assert got["rows"] > len(data["corpus"])  # the whole corpus, not only the evaluated one
    assert (
        meta["embedtune.data_fingerprint"] == data["fingerprint"]
        and fn["model"]["model"] == meta["embedtune.model"]
    )
    if meta["embedtune.kind"] == "tuned":  # a registered version, fetched through the tracking server
        assert fn["model"]["model"].startswith("models:/embedtune-cluster-local/")
        assert list((home / "et" / "served").glob("*/model/modules.json"))
    board = pd.read_csv(io.BytesIO(c.read(f"sweeps/{sweep}/report/results.csv")))
    row = board[(board["model"] == meta["embedtune.model_label"]) & (board["query_type"] == "vector")
                & (board["reranker"] == "none")].iloc[0]  # fmt: skip
    hits = hits_at_10(got["ranked"], [data["relevant"][q] for q in qids])
    assert sum(hits) == round(row["hit_at_10"] * len(qids))  # the same count of questions answered


def test_job_runs_the_shipped_spec_on_autoscaled_gpu_workers(cluster: Cluster, tmp_path: Path) -> None:
    """The README's line, as a cluster user types it, from the repository root, logged in to MLflow
    as the driver's own user (what `env` prints), not the admin."""
    import psutil

    assert cluster.env["MLFLOW_TRACKING_USERNAME"] == DRIVER_USER
    assert cluster.admin_password() not in cluster.env.values()
    done = cluster.submit(REPO, "sweeps/cluster-local.yaml")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "sweep cluster-local: 2 trials (2 run now) in s3://embedtune/sweeps/cluster-local" in done.stdout
    # the memory probe waited for the autoscaler's first GPU worker and ran there (no CUDA: logical GPUs)
    assert "memory probe skipped: the GPU worker has no CUDA device" in done.stdout + done.stderr
    checked = _check_sweep(cluster, "cluster-local", configs=2, epochs=2)
    nodes = {node for rows in checked["epochs"].values() for _, node in rows}
    assert nodes and HEAD_NODE not in nodes  # GPU workers launched by the autoscaler took the trials
    # every trial's model went through the tracking server into the bucket
    models = {k.split("/models/")[1].split("/")[0] for k in cluster.files("mlartifacts") if "/models/" in k}
    assert len(models) >= 3  # two trials + the registered champion
    # the final stage: report and LanceDB tables on S3, the winner in the registry
    report = cluster.files("sweeps/cluster-local/report")
    assert {"leaderboard.md", "leaderboard.html", "results.csv"} <= {k.split("/")[-1] for k in report}
    board = cluster.read("sweeps/cluster-local/report/leaderboard.md").decode()
    assert "## medquad" in board and "**Winner**" in board and "-ft-e" in board  # a tuned checkpoint won
    tables = {k.split("/lancedb/")[1].split("/")[0] for k in cluster.files("sweeps/cluster-local/lancedb")}
    assert len([t for t in tables if t.endswith(".lance")]) >= 2  # the base model and the tuned one
    versions = cluster.sql("SELECT name, version FROM model_versions WHERE name = 'embedtune-cluster-local'")
    assert versions
    # the driver user created the experiment and the registered model (the creator gets MANAGE)
    exp = cluster.sql("SELECT experiment_id FROM experiments WHERE name = 'embedtune-cluster-local'")[0][0]
    assert cluster.permission(DRIVER_USER, "experiment", str(exp)) == "MANAGE"
    assert cluster.permission(DRIVER_USER, "registered_model", "embedtune-cluster-local") == "MANAGE"
    _check_served(cluster, "cluster-local", tmp_path)
    # every server of the cluster listens on loopback only
    ours = _cluster_pids(cluster)
    listening = [c for c in psutil.net_connections("inet") if c.status == "LISTEN" and c.pid in ours]
    assert listening and not [c for c in listening if not _loopback(c.laddr.ip)], listening


def _loopback(ip: str) -> bool:
    import ipaddress

    addr = ipaddress.ip_address(ip)
    return addr.is_loopback or bool(getattr(addr, "ipv4_mapped", None) and addr.ipv4_mapped.is_loopback)


def _cluster_pids(c: Cluster) -> set[int]:
    import psutil

    cid = json.loads((c.state / "state.json").read_text())["cluster_id"]
    pids = set(_our_leftovers(cid))
    for pid in list(pids):
        with contextlib.suppress(psutil.Error):
            pids |= {ch.pid for ch in psutil.Process(pid).children(recursive=True)}
    return pids


def test_worker_node_killed_trial_retried_on_a_new_worker(cluster: Cluster, tmp_path: Path) -> None:
    workdir = _spec_dir(tmp_path, "node-loss", max_failures=2,
                        search={"epochs": [3], "lr": [5.0e-5], "batch_size": [16]})  # fmt: skip
    job = f"node-{uuid.uuid4().hex[:8]}"
    assert cluster.submit(workdir, "spec.yaml", "--no-final", wait=False, job_id=job).returncode == 0
    reported = _wait_epoch(cluster, "node-loss", 1)
    (rows,) = reported.values()
    lost = rows[0][1]
    assert cluster.script("kill-worker", "--node-id", lost).stdout.strip() == lost
    assert cluster.wait_job(job) == "SUCCEEDED", cluster.logs(job)[-4000:]
    checked = _check_sweep(cluster, "node-loss", configs=1, epochs=3)
    (rows,) = checked["epochs"].values()
    assert rows[0][1] == lost and rows[-1][1] != lost  # epoch 1 on the lost node, the rest elsewhere
    state = [k for k in cluster.files("sweeps/node-loss/tune") if "experiment_state" in k][-1]
    trials = json.loads(cluster.read(state.removeprefix("embedtune/")))["trial_data"]
    assert sum(json.loads(t[1])["num_failures"] for t in trials) >= 1  # Tune retried it


def test_tracking_server_restarted_mid_sweep_records_are_replayed(cluster: Cluster, tmp_path: Path) -> None:
    workdir = _spec_dir(
        tmp_path, "mlflow-restart", search={"epochs": [3], "lr": [5.0e-5, 1.0e-4], "batch_size": [16]}
    )
    job = f"mlflow-{uuid.uuid4().hex[:8]}"
    assert cluster.submit(workdir, "spec.yaml", "--no-final", wait=False, job_id=job).returncode == 0
    _wait_epoch(cluster, "mlflow-restart", 1)
    cluster.script("restart", "mlflow", "--down-for", "20")
    status = cluster.wait_job(job)
    logs = cluster.logs(job)
    assert status == "SUCCEEDED", logs[-4000:]
    assert "training goes on" in logs and "replayed" in logs
    _check_sweep(cluster, "mlflow-restart", configs=2, epochs=3)


def test_object_store_restarted_mid_sweep_loses_nothing(cluster: Cluster, tmp_path: Path) -> None:
    """S3 crashes under running trials: the sweep goes on, or stops with one clear line, and the
    same job submitted again completes with nothing lost. The outage did hit the driver's S3 calls:
    its run-dir lease is refreshed every 10 s, so an outage of 10 s or more meets at least one
    refresh, which fails and is retried (a warning in the job log)."""
    workdir = _spec_dir(tmp_path, "s3-restart", max_failures=2,
                        search={"epochs": [3], "lr": [5.0e-5, 1.0e-4], "batch_size": [16]})  # fmt: skip
    job = f"s3-{uuid.uuid4().hex[:8]}"
    assert cluster.submit(workdir, "spec.yaml", "--no-final", wait=False, job_id=job).returncode == 0
    _wait_epoch(cluster, "s3-restart", 1)
    cluster.script("restart", "s3", "--down-for", "10")
    status = cluster.wait_job(job)
    assert "run dir lease refresh failed" in cluster.logs(job), cluster.logs(job)[-4000:]
    if status != "SUCCEEDED":
        errors = [ln for ln in cluster.logs(job).splitlines() if ln.startswith("embedtune: error:")]
        assert len(errors) == 1, cluster.logs(job)[-4000:]
        again = cluster.submit(workdir, "spec.yaml", "--no-final")
        assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-2000:]
    try:
        _check_sweep(cluster, "s3-restart", configs=2, epochs=3)
    except AssertionError as exc:
        errors = [(t["trial_id"], t["status"], t.get("error")) for t in _trials(cluster, "s3-restart")]
        raise AssertionError(f"{exc}\ntrials: {errors}\njob log:\n{cluster.logs(job)[-8000:]}") from exc


def test_two_jobs_submitted_at_once_one_runs_the_other_stops_with_one_line(
    cluster: Cluster, tmp_path: Path
) -> None:
    """The same sweep submitted twice at the same moment (a double click, a retrying CI): the run
    dir's lease on S3 (conditional writes) lets exactly one driver run it; the other job fails with
    one line naming the holder, and the sweep's records are one set."""
    from concurrent.futures import ThreadPoolExecutor

    # one config of one epoch: what is tested is who runs it, not the training
    workdir = _spec_dir(tmp_path, "twin-jobs", search={"epochs": [1], "lr": [5.0e-5], "batch_size": [16]})
    ids = [f"twin-{i}-{uuid.uuid4().hex[:8]}" for i in range(2)]
    with ThreadPoolExecutor(2) as pool:
        submits = list(
            pool.map(lambda j: cluster.submit(workdir, "spec.yaml", "--no-final", wait=False, job_id=j), ids)
        )
    assert all(s.returncode == 0 for s in submits), [s.stderr[-2000:] for s in submits]
    statuses = {job: cluster.wait_job(job) for job in ids}
    assert sorted(statuses.values()) == ["FAILED", "SUCCEEDED"], {j: cluster.logs(j)[-3000:] for j in ids}
    loser = next(j for j, s in statuses.items() if s == "FAILED")
    errors = [ln for ln in cluster.logs(loser).splitlines() if ln.startswith("embedtune: error:")]
    assert len(errors) == 1, cluster.logs(loser)[-4000:]
    assert "run dir s3://embedtune/sweeps/twin-jobs is in use by pid" in errors[0], errors
    assert "resuming" not in cluster.logs(loser) and "trial(s)" not in cluster.logs(loser)  # it did no work
    _check_sweep(cluster, "twin-jobs", configs=1, epochs=1)
    assert not [k for k in cluster.files("sweeps/twin-jobs") if k.endswith("/lock.json")]  # the lease is gone


def test_driver_killed_then_head_lost_each_resubmitted_job_resumes_from_s3(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Two losses in one sweep, each followed by the same job submitted again. First the driver:
    the job is stopped (SIGTERM, then SIGKILL) after epoch 1, and the resubmitted job resumes from
    S3. Then the Ray head dies mid-sweep and its disk with it (Ray's temp dir and job packages,
    Tune's staging dir, embedtune's caches: `cluster_local.py replace-head`); a new head starts
    against the same S3, PostgreSQL and MLflow, knowing no job, and the job submitted once more
    completes from S3: one FINISHED run per trial, every epoch reported once across both losses."""
    sweep = "resume-job"
    workdir = _spec_dir(tmp_path, sweep, search={"epochs": [4], "lr": [5.0e-5], "batch_size": [16]})
    first, second = (f"resume-{i}-{uuid.uuid4().hex[:8]}" for i in range(2))
    resumed = f"resuming sweep from s3://embedtune/sweeps/{sweep}/tune"

    # 1. the driver is killed after epoch 1; the resubmitted job resumes from S3
    assert cluster.submit(workdir, "spec.yaml", "--no-final", wait=False, job_id=first).returncode == 0
    _wait_epoch(cluster, sweep, 1)
    cluster.jobs().stop_job(first)  # SIGTERM to the driver (then SIGKILL): the driver is gone
    assert cluster.wait_job(first, 300) == "STOPPED"
    assert json.loads(cluster.read(f"sweeps/{sweep}/sweep_state.json"))["finished"] is False
    assert cluster.submit(workdir, "spec.yaml", "--no-final", wait=False, job_id=second).returncode == 0

    # 2. the head is lost with its disk after epoch 2 (two epochs left: the job is still running)
    _wait_epoch(cluster, sweep, 2)
    assert resumed in cluster.logs(second), cluster.logs(second)[-4000:]
    models = cluster.state / "ray" / "home" / ".cache" / "embedtune" / "models"  # the head's cache
    temp_dir = Path(json.loads((cluster.state / "state.json").read_text())["services"]["ray"]["temp_dir"])
    sessions = list(temp_dir.glob("session_2*"))  # Ray's session: logs, job packages, Tune's staging dir
    assert models.is_dir() and sessions
    cluster.script("replace-head", "--down-for", "2", timeout=400)
    cluster.refresh()
    assert not models.exists() and not [s for s in sessions if s.exists()]
    known = {j.submission_id for j in cluster.jobs().list_jobs()}
    assert not {first, second} & known  # the new head knows no job
    assert json.loads(cluster.read(f"sweeps/{sweep}/sweep_state.json"))["finished"] is False
    again = cluster.submit(workdir, "spec.yaml", "--no-final")
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-2000:]
    assert resumed in again.stdout
    _check_sweep(cluster, sweep, configs=1, epochs=4)
