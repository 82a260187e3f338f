"""The cluster configs under cluster/ parse, agree with each other and with the sweep specs, and
their commands are accepted by the real CLIs they call (ray start, mlflow server, embedtune). What is
checked is what a user applies: the files rendered from a sample site file (`make cluster-render`,
tests/cluster_site.py); tests/test_cluster_render.py checks the rendering and the schemas."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml
from cluster_site import SAMPLE_SITE, render_sample

from embedtune.specs import load_spec

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "cluster"
SWEEPS = sorted((REPO / "sweeps").glob("*.yaml"))
GPU_SPECS = [p for p in SWEEPS if p.stem in ("gooaq", "squad")]


def _load(path: Path):
    return yaml.safe_load(path.read_text(encoding="utf-8"))


SITE_STORAGE = f"s3://{SAMPLE_SITE['BUCKET']}/sweeps"  # what every rendered cluster file sets


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Path:
    """cluster/rendered/ as `make cluster-render` makes it from the sample site file."""
    return render_sample(tmp_path_factory.mktemp("site"))


@pytest.fixture(autouse=True)
def _cluster_storage(monkeypatch) -> None:
    # The GPU specs take storage_path from $EMBEDTUNE_STORAGE (no default bucket): set as on a cluster.
    monkeypatch.setenv("EMBEDTUNE_STORAGE", SITE_STORAGE)


def _env(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def _after(words: list[str], *prefix: str) -> list[str]:
    """The arguments after `prefix` (e.g. `mlflow server`) in a shell word list, up to a `>` redirect."""
    n = len(prefix)
    for i in range(len(words) - n + 1):
        if tuple(words[i : i + n]) == prefix:
            rest = words[i + n :]
            return rest[: rest.index(">")] if ">" in rest else rest
    raise AssertionError(f"{' '.join(prefix)!r} not in {words}")


def _click_parses(command, args: list[str]) -> dict:
    """Parse `args` with a click command without running it (unknown flags / bad values raise)."""
    ctx = command.make_context(command.name, list(args), resilient_parsing=False)
    return ctx.params


def _mlflow_server_params(args: list[str]) -> dict:
    from mlflow.cli import server

    return _click_parses(server, args)


def _allowed_hosts(params: dict) -> list[str]:
    return [h.strip() for h in params["allowed_hosts"].split(",")]


def _host_ok(allowed: list[str], host: str) -> bool:
    from mlflow.server.security_utils import is_allowed_host_header

    return is_allowed_host_header(allowed, host)


def _gpu_spec_needs() -> list[tuple[str, float, float, int]]:
    out = []
    for path in GPU_SPECS:
        spec = load_spec(path)
        out.append((path.name, spec.resources.cpu, spec.resources.gpu, spec.max_concurrent_trials or 1))
    return out


def _tracking_hosts() -> set[str]:
    return {urlparse(load_spec(p).mlflow.tracking_uri).netloc for p in GPU_SPECS}


# ------------------------------------------------------------------ sweep specs


@pytest.mark.parametrize("path", SWEEPS, ids=[p.name for p in SWEEPS])
def test_every_sweep_spec_loads(path: Path, monkeypatch) -> None:
    # cluster-local.yaml has no default server (make cluster-local prints the URI to export)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:45678")
    spec = load_spec(path)
    assert spec.name and spec.models and spec.datasets


# The environments the README documents for the cluster specs: what each target sets on its head.
TARGETS = {
    # the specs' default tracking URI (the in-cluster service); the bucket from the pods' env
    "kuberay": {"EMBEDTUNE_STORAGE": SITE_STORAGE},
    "ray-up": {
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000",
        "EMBEDTUNE_STORAGE": SITE_STORAGE,
    },
    "cluster-local": {
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:45678",
        "EMBEDTUNE_STORAGE": "s3://embedtune/sweeps",
    },
}
CLUSTER_SPECS = [p for p in SWEEPS if p.stem in ("gooaq", "squad", "cluster-local")]


@pytest.mark.parametrize("target", sorted(TARGETS))
@pytest.mark.parametrize("path", CLUSTER_SPECS, ids=[p.name for p in CLUSTER_SPECS])
def test_cluster_specs_take_tracking_and_storage_from_each_target(
    path: Path, target: str, monkeypatch
) -> None:
    for key in ("MLFLOW_TRACKING_URI", "EMBEDTUNE_STORAGE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in TARGETS[target].items():
        monkeypatch.setenv(key, value)
    if path.stem == "cluster-local" and "MLFLOW_TRACKING_URI" not in TARGETS[target]:
        from embedtune.errors import EmbedtuneError

        with pytest.raises(EmbedtuneError, match="MLFLOW_TRACKING_URI is not set"):
            load_spec(path)  # the laptop cluster has no default server: the spec says so at once
        return
    spec = load_spec(path)
    expected_uri = TARGETS[target].get("MLFLOW_TRACKING_URI", "http://mlflow.embedtune.svc:5000")
    assert spec.mlflow.tracking_uri == expected_uri
    assert spec.storage_path == TARGETS[target]["EMBEDTUNE_STORAGE"]


@pytest.mark.parametrize("path", GPU_SPECS, ids=[p.name for p in GPU_SPECS])
def test_gpu_specs_name_no_bucket_of_their_own(path: Path, monkeypatch) -> None:
    """No default bucket a user did not choose: without $EMBEDTUNE_STORAGE (every rendered cluster
    file sets it from cluster/site.env) the spec stops with one line naming the variable."""
    from embedtune.errors import EmbedtuneError

    monkeypatch.delenv("EMBEDTUNE_STORAGE")
    with pytest.raises(EmbedtuneError, match="EMBEDTUNE_STORAGE is not set") as info:
        load_spec(path)
    assert "\n" not in str(info.value)


def test_gpu_specs_exist_and_share_storage_and_tracking() -> None:
    assert [p.stem for p in GPU_SPECS] == ["gooaq", "squad"]
    for path in GPU_SPECS:
        spec = load_spec(path)
        # Every node reads and writes checkpoints: storage must be shared, not a local path.
        assert spec.storage_path and "://" in spec.storage_path, path
        assert spec.mlflow.tracking_uri.startswith("http"), path
    assert _tracking_hosts() == {"mlflow.embedtune.svc:5000"}


# ------------------------------------------------------------------ ray up (cluster launcher)


@pytest.fixture(scope="module")
def launcher(rendered) -> dict:
    return _load(rendered / "ray-cluster.yaml")


def test_launcher_config_passes_ray_schema(launcher) -> None:
    from ray.autoscaler._private.util import validate_config

    validate_config(launcher)  # ray's own JSON schema for `ray up`
    assert launcher["provider"]["type"] == "aws"
    assert launcher["head_node_type"] in launcher["available_node_types"]


def test_launcher_installs_with_the_one_install_script(launcher) -> None:
    cmds = launcher["setup_commands"]
    install = [c for c in cmds if "scripts/install.sh" in c]
    assert install and "cd ~/embedtune" in install[0] and "cluster" in install[0]
    assert not [c for c in cmds if "pip install" in c]  # no second install path beside the script
    # the repo, and the secrets made by cluster/make-secrets.sh, synced from where `ray up` runs
    assert launcher["file_mounts"] == {"~/embedtune": ".", "~/embedtune-secrets": "cluster/secrets"}
    assert ".venv" in launcher["rsync_exclude"]
    assert launcher["docker"]["image"].startswith("rayproject/ray:2.60.0-py311")


def test_launcher_nodes_fit_the_gpu_sweeps(launcher) -> None:
    types = launcher["available_node_types"]
    head = types[launcher["head_node_type"]]
    assert head["resources"] == {"CPU": 0, "GPU": 0}  # the driver's node: no trials there
    workers = [t for name, t in types.items() if name != launcher["head_node_type"]]
    gpu_workers = [t for t in workers if t["resources"].get("GPU", 0) >= 1]
    assert gpu_workers
    for name, cpu, gpu, concurrent in _gpu_spec_needs():
        assert any(w["resources"]["CPU"] >= cpu and w["resources"]["GPU"] >= gpu for w in gpu_workers), name
        assert launcher["max_workers"] >= concurrent * gpu, name


def test_launcher_start_commands_parse_and_carry_the_env(launcher) -> None:
    from ray.scripts.scripts import start

    head_cmd = next(c for c in launcher["head_start_ray_commands"] if "ray start" in c)
    worker_cmd = next(c for c in launcher["worker_start_ray_commands"] if "ray start" in c)
    for cmd in (head_cmd, worker_cmd):
        assert "RAY_USAGE_STATS_ENABLED=0" in cmd
        assert (
            "RAY_AUTH_MODE=token" in cmd
            and "RAY_AUTH_TOKEN_PATH=$HOME/embedtune-secrets/ray_auth_token" in cmd
        )
    # the driver runs on the head: the specs take its tracking server and storage from there
    assert "MLFLOW_TRACKING_URI=http://127.0.0.1:5000" in head_cmd
    assert f"EMBEDTUNE_STORAGE={TARGETS['ray-up']['EMBEDTUNE_STORAGE']}" in head_cmd
    assert "mlflow_client.env" in head_cmd  # the driver's MLflow login, from the secrets folder
    head = _click_parses(start, _after(shlex.split(head_cmd), "ray", "start"))
    worker = _click_parses(
        start, _after(shlex.split(worker_cmd.replace("$RAY_HEAD_IP", "10.0.0.1")), "ray", "start")
    )
    assert head["head"] and head["port"] == 6379
    assert head["dashboard_host"] == "127.0.0.1"  # reached through `ray dashboard` (SSH), never 0.0.0.0
    assert worker["address"] == "10.0.0.1:6379" and not worker["head"]


def test_launcher_keeps_the_mlflow_login_off_the_workers(launcher) -> None:
    """The driver's MLflow login is the head's alone: the worker nodes' setup deletes every MLflow
    secret the file mounts copied, their `ray start` sources none, and the head creates the
    driver's own user with the project's script, whose arguments it accepts."""
    import importlib.util

    worker_setup = " ".join(launcher["worker_setup_commands"])
    for name in ("mlflow_client.env", "mlflow_auth.ini", "mlflow_flask_secret_key"):
        assert f"~/embedtune-secrets/{name}" in worker_setup and "rm -f" in worker_setup
    assert not [
        c
        for c in launcher["worker_start_ray_commands"]
        if "mlflow_client.env" in c or "MLFLOW_TRACKING_U" in c
    ]
    (create,) = [c for c in launcher["head_start_ray_commands"] if "mlflow_driver_user.py" in c]
    words = shlex.split(create)
    assert words[1] == "~/embedtune/cluster/mlflow_driver_user.py"
    spec = importlib.util.spec_from_file_location("mlflow_driver_user", CLUSTER / "mlflow_driver_user.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = module.parser().parse_args(words[2:])
    assert args.client_env.name == "mlflow_client.env" and args.auth_ini.name == "mlflow_auth.ini"
    assert args.tracking_uri == "http://127.0.0.1:5000" and args.wait > 0
    order = [
        i for i, c in enumerate(launcher["head_start_ray_commands"]) if "mlflow server" in c or c is create
    ]
    assert order == sorted(order) and len(order) == 2  # after the server is started


def test_launcher_mlflow_server_command(launcher) -> None:
    cmd = next(c for c in launcher["head_start_ray_commands"] if "mlflow server" in c)
    args = _after(shlex.split(cmd.replace("(", " ").replace(")", " ")), "mlflow", "server")
    params = _mlflow_server_params(args)
    assert params["serve_artifacts"] and params["artifacts_destination"].startswith("s3://")
    # the tracking database outlives the cluster: its URI (RDS) from the secrets folder, through
    # the environment (so no password on a command line), never a SQLite file on the head
    assert "--backend-store-uri" not in args and "sqlite" not in cmd
    assert 'MLFLOW_BACKEND_STORE_URI="$(cat $HOME/embedtune-secrets/mlflow_backend_uri)"' in cmd
    assert params["port"] == 5000 and params["host"] == "127.0.0.1"  # `ray attach -p 5000`, never 0.0.0.0
    assert "pgrep" not in cmd  # it matched the shell running this very line (whose argv holds it)
    assert params["app_name"] == "basic-auth" and "MLFLOW_AUTH_CONFIG_PATH=$HOME/embedtune-secrets/" in cmd
    allowed = _allowed_hosts(params)
    assert _host_ok(allowed, "127.0.0.1:5000") and _host_ok(allowed, "localhost:5000")
    assert not _host_ok(allowed, "attacker.example.com")


def test_make_secrets_wants_databases_outside_the_cluster(tmp_path: Path) -> None:
    """cluster/make-secrets.sh writes the tracking and basic-auth database URIs it is given, and
    without them stops with one line before writing anything."""
    import os
    import shutil
    import subprocess

    script = tmp_path / "cluster" / "make-secrets.sh"
    script.parent.mkdir()
    shutil.copy(CLUSTER / "make-secrets.sh", script)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    bare = subprocess.run([str(script)], capture_output=True, text=True, env=env)
    assert bare.returncode == 1 and "MLFLOW_BACKEND_URI" in bare.stderr and len(bare.stderr.splitlines()) == 1
    assert not (script.parent / "secrets").exists()
    db = "postgresql+psycopg2://u:p@db.example:5432"
    env.update(MLFLOW_BACKEND_URI=f"{db}/mlflow", MLFLOW_AUTH_DB_URI=f"{db}/mlflow_auth")
    subprocess.run([str(script)], capture_output=True, text=True, env=env, check=True)
    secrets = script.parent / "secrets"
    assert (secrets / "mlflow_backend_uri").read_text().strip() == f"{db}/mlflow"
    auth_ini = (secrets / "mlflow_auth.ini").read_text()
    assert f"database_uri = {db}/mlflow_auth" in auth_ini
    # a login's scrypt hash checked once a minute per worker: 100 authenticated requests cost the
    # server ~31 s of CPU without the cache, ~1 s with it (measured on this machine)
    assert "\nauth_cache_ttl_seconds = 60\n" in auth_ini
    assert {f.name for f in secrets.iterdir()} >= {
        "ray_auth_token",
        "mlflow_client.env",
        "mlflow_flask_secret_key",
    }


# ------------------------------------------------------------------ KubeRay


@pytest.fixture(scope="module")
def raycluster(rendered) -> dict:
    return _load(rendered / "kuberay" / "raycluster.yaml")


@pytest.fixture(scope="module")
def rayjob(rendered) -> dict:
    return _load(rendered / "kuberay" / "rayjob.yaml")


def _containers(spec: dict) -> tuple[dict, list[dict]]:
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    workers = [g["template"]["spec"]["containers"][0] for g in spec["workerGroupSpecs"]]
    return head, workers


def test_raycluster_shape(raycluster) -> None:
    import ray

    assert raycluster["apiVersion"] == "ray.io/v1" and raycluster["kind"] == "RayCluster"
    spec = raycluster["spec"]
    assert spec["rayVersion"] == ray.__version__
    head, workers = _containers(spec)
    assert workers
    for c in [head, *workers]:
        env = _env(c)
        assert urlparse(env["MLFLOW_TRACKING_URI"]).netloc in _tracking_hosts()
        assert env["RAY_USAGE_STATS_ENABLED"] == "0"
        assert env["EMBEDTUNE_STORAGE"] == TARGETS["kuberay"]["EMBEDTUNE_STORAGE"]  # the specs' storage_path
        assert c["image"] == head["image"]
    login = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
    head_env_but_login = {k: v for k, v in _env(head).items() if k not in login}
    assert all(_env(w) == head_env_but_login for w in workers)
    # No trials on the head (it runs the driver).
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert spec["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    assert spec["authOptions"] == {"mode": "token", "secretName": "embedtune-ray-token"}
    # the driver's MLflow login by reference to a Secret, never inline, and on the head only: the
    # worker pods (trials) carry no MLflow credential, nor any Secret that holds one
    head_login = {e["name"]: e for e in head["env"] if e["name"] in login}
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        assert head_login[name]["valueFrom"]["secretKeyRef"]["name"] == "embedtune-mlflow-client"
    for w in workers:
        assert not [e for e in w["env"] if e["name"] in login], w["env"]
        assert "embedtune-mlflow-client" not in yaml.safe_dump(w) and "mlflow-auth" not in yaml.safe_dump(w)


def test_raycluster_start_params_are_ray_start_flags(raycluster) -> None:
    from ray.scripts.scripts import start

    spec = raycluster["spec"]
    head_args = ["--head", *(f"--{k}={v}" for k, v in spec["headGroupSpec"]["rayStartParams"].items())]
    assert _click_parses(start, head_args)["num_cpus"] == 0
    for group in spec["workerGroupSpecs"]:
        _click_parses(
            start, ["--address=10.0.0.1:6379", *(f"--{k}={v}" for k, v in group["rayStartParams"].items())]
        )


def test_raycluster_workers_fit_the_gpu_sweeps(raycluster) -> None:
    groups = raycluster["spec"]["workerGroupSpecs"]
    for name, cpu, gpu, concurrent in _gpu_spec_needs():
        fits = [
            g
            for g in groups
            if float(g["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"]) >= cpu
            and float(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))
            >= gpu
        ]
        assert fits, name
        assert max(g["maxReplicas"] for g in fits) >= concurrent * gpu, name


def test_rayjob_runs_the_sweep_and_shuts_down(rayjob, raycluster) -> None:
    from embedtune.cli import build_parser

    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    spec = rayjob["spec"]
    words = shlex.split(spec["entrypoint"])
    assert words[:2] == ["embedtune", "sweep"]
    args = build_parser().parse_args(words[1:])  # the real CLI accepts it
    # the spec comes with the image: cluster/Dockerfile copies sweeps/ into its WORKDIR
    workdir = next(
        ln.split()[1] for ln in (CLUSTER / "Dockerfile").read_text().splitlines() if ln.startswith("WORKDIR")
    )
    assert "COPY --chown=ray:users sweeps ./sweeps" in (CLUSTER / "Dockerfile").read_text()
    assert args.spec.startswith(workdir + "/") and args.run_dir is None  # the run dir: on S3 by default
    load_spec(REPO / Path(args.spec).relative_to(workdir))
    # shutdownAfterJobFinishes only acts on a cluster the RayJob creates itself (not with clusterSelector).
    assert spec["shutdownAfterJobFinishes"] is True and "clusterSelector" not in spec
    assert spec["rayClusterSpec"] == raycluster["spec"]  # the same cluster as raycluster.yaml
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert "working_dir" not in runtime_env  # the image holds the code (see the archive test below)
    assert not {k for k in runtime_env["env_vars"] if k.startswith(("MLFLOW_TRACKING", "AWS_"))}  # no secrets
    # A stop reaches the sweep as Ctrl-C (its KeyboardInterrupt path), with time to close runs.
    assert runtime_env["env_vars"]["RAY_JOB_STOP_SIGNAL"] == "SIGINT"
    assert int(runtime_env["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"]) >= 30
    # the memory probe waits for the first GPU worker (the cluster starts with none)
    assert float(runtime_env["env_vars"]["EMBEDTUNE_PROBE_WAIT_S"]) >= 300
    submitter = spec["submitterPodTemplate"]["spec"]["containers"][0]
    assert submitter["image"] == _containers(raycluster["spec"])[0]["image"]


# ------------------------------------------------------------------ MLflow server


@pytest.fixture(scope="module")
def mlflow_docs(rendered) -> dict[str, dict]:
    docs = [d for d in yaml.safe_load_all((rendered / "mlflow-server.yaml").read_text()) if d]
    return {d["kind"]: d for d in docs}


def test_mlflow_server_manifest(mlflow_docs, monkeypatch) -> None:
    assert set(mlflow_docs) == {"Deployment", "Service", "ServiceAccount", "NetworkPolicy"}
    dep, svc = mlflow_docs["Deployment"], mlflow_docs["Service"]
    # The service is what the specs and the Ray pods point at.
    port = svc["spec"]["ports"][0]["port"]
    assert f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc:{port}" in _tracking_hosts()
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert all(pod_labels.get(k) == v for k, v in svc["spec"]["selector"].items())
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()

    container = dep["spec"]["template"]["spec"]["containers"][0]
    # exec form, no shell: `mlflow server` itself, the database URI from its environment (the Secret)
    assert container["command"][:2] == ["mlflow", "server"] and "args" not in container
    assert not [a for a in container["command"] if a.startswith("--backend-store-uri")]  # no password in argv
    monkeypatch.setenv("MLFLOW_BACKEND_STORE_URI", "postgresql://u:p@db:5432/mlflow")  # as the Secret sets it
    params = _mlflow_server_params(container["command"][2:])
    assert params["backend_store_uri"].startswith("postgresql")
    assert params["artifacts_destination"].startswith("s3://") and params["serve_artifacts"]
    assert params["host"] == "0.0.0.0" and params["port"] == container["ports"][0]["containerPort"]
    assert params["app_name"] == "basic-auth"  # every request needs a login
    env = {e["name"]: e for e in container["env"]}
    assert (
        "secretKeyRef" in env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]
    )  # credentials stay out of the manifest
    assert "secretKeyRef" in env["MLFLOW_FLASK_SERVER_SECRET_KEY"]["valueFrom"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "mlflow-auth")
    assert env["MLFLOW_AUTH_CONFIG_PATH"]["value"].startswith(mount["mountPath"] + "/")
    volume = next(v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == "mlflow-auth")
    assert volume["secret"]["secretName"] == "mlflow-auth"
    assert (
        dep["spec"]["template"]["spec"]["serviceAccountName"]
        == mlflow_docs["ServiceAccount"]["metadata"]["name"]
    )
    # Host-header allowlist: the in-cluster names the clients use, and localhost for port-forward.
    allowed = _allowed_hosts(params)
    for host in (
        *_tracking_hosts(),
        "mlflow:5000",
        "mlflow.embedtune.svc.cluster.local:5000",
        "localhost:5000",
    ):
        assert _host_ok(allowed, host), host
    assert not _host_ok(allowed, "attacker.example.com")
    from mlflow.server.security_utils import HEALTH_ENDPOINTS

    assert container["readinessProbe"]["httpGet"]["path"] in HEALTH_ENDPOINTS  # exempt from the host check


# ------------------------------------------------------------------ secrets and packaging

SECRETISH = ("PASSWORD", "SECRET", "TOKEN", "ACCESS_KEY")


def test_no_secret_is_written_into_a_manifest(rendered) -> None:
    """Passwords, keys and tokens reach pods by reference (secretKeyRef / secretRef / a mounted
    Secret), never as a literal `value`."""
    for path in [*(rendered / "kuberay").glob("*.yaml"), rendered / "mlflow-server.yaml"]:
        text = path.read_text()
        for doc in yaml.safe_load_all(text):
            for env in _walk_env(doc):
                # whole parts of the name: AWS_SECRET_ACCESS_KEY, not TOKENIZERS_PARALLELISM
                if any(re.search(rf"(^|_){word}(_|$)", env["name"]) for word in SECRETISH):
                    assert "value" not in env and "valueFrom" in env, (path.name, env)


def _walk_env(node):
    if isinstance(node, dict):
        if isinstance(node.get("env"), list):
            yield from node["env"]
        for value in node.values():
            yield from _walk_env(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk_env(value)


ARCHIVE = "git archive --prefix=embedtune/ -o embedtune.zip HEAD"


def test_documented_code_archive_is_a_working_dir_ray_accepts(tmp_path: Path) -> None:
    """The zip the README and the RayJob document for a remote working_dir: one top-level folder,
    which Ray's own unpacking strips, leaving the checkout (and its specs) at the working dir."""
    import subprocess

    from ray._private.runtime_env.packaging import get_top_level_dir_from_compressed_package, unzip_package

    assert (
        ARCHIVE in (REPO / "README.md").read_text()
        and ARCHIVE in (CLUSTER / "kuberay" / "rayjob.yaml").read_text()
    )
    words = shlex.split(ARCHIVE)
    words[words.index("-o") + 1] = str(tmp_path / "embedtune.zip")
    subprocess.run(words, cwd=REPO, check=True)
    assert get_top_level_dir_from_compressed_package(str(tmp_path / "embedtune.zip")) == "embedtune"
    unzip_package(
        str(tmp_path / "embedtune.zip"),
        str(tmp_path / "wd"),
        remove_top_level_directory=True,
        unlink_zip=False,
    )
    assert (tmp_path / "wd" / "pyproject.toml").exists() and (
        tmp_path / "wd" / "sweeps" / "gooaq.yaml"
    ).exists()
    load_spec(tmp_path / "wd" / "sweeps" / "gooaq.yaml")


# ------------------------------------------------------------------ command-line overrides

FLAGS = {
    "tracking_uri": "http://127.0.0.1:5999",
    "storage_path": "s3://elsewhere/sweeps",
    "lancedb_uri": "s3://elsewhere/lancedb",
}


@pytest.mark.parametrize("target", sorted(TARGETS))
@pytest.mark.parametrize("path", CLUSTER_SPECS, ids=[p.name for p in CLUSTER_SPECS])
def test_sweep_flags_beat_the_spec_under_each_target(path: Path, target: str, monkeypatch) -> None:
    """Precedence (README): `--tracking-uri / --storage-path / --lancedb-uri` > the spec's value
    (its ${VAR:-default} expanded from the target's environment)."""
    from embedtune.cli import _service_flags, build_parser
    from embedtune.specs.load import with_overrides

    for key in ("MLFLOW_TRACKING_URI", "EMBEDTUNE_STORAGE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in {"MLFLOW_TRACKING_URI": "http://127.0.0.1:45678", **TARGETS[target]}.items():
        monkeypatch.setenv(key, value)
    spec = load_spec(path)
    args = build_parser().parse_args(
        ["sweep", str(path), *(x for k, v in FLAGS.items() for x in (f"--{k.replace('_', '-')}", v))]
    )
    over = with_overrides(spec, **_service_flags(args))
    assert (over.mlflow.tracking_uri, over.storage_path, over.final.lancedb_uri) == tuple(FLAGS.values())
    assert over.model_dump(exclude={"mlflow", "storage_path", "final"}) == spec.model_dump(
        exclude={"mlflow", "storage_path", "final"}
    )
    # One flag alone changes only its own key; none keeps the spec as it is.
    only = with_overrides(spec, **{**_service_flags(build_parser().parse_args(["sweep", str(path)])),
                                   "storage_path": "/tmp/x"})  # fmt: skip
    assert (only.storage_path, only.mlflow.tracking_uri) == ("/tmp/x", spec.mlflow.tracking_uri)
    assert with_overrides(spec, tracking_uri=None) is spec


def test_tracking_uri_flag_is_what_the_sweep_checks(tmp_path: Path, capsys) -> None:
    """The real CLI: the spec names one tracking server, the flag another (nothing listens there):
    the credential pre-check refuses the flag's, in one line, before any data work."""
    import socket

    from embedtune.cli import main

    spec_file = tmp_path / "s.yaml"
    # A port bound and never listened on: refused for as long as the test holds it (a port found
    # free and let go may be taken meanwhile by another test's server, which then answers).
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    spec = {
        "name": "flags",
        "datasets": [{"name": "medquad", "source": "medquad-sample", "max_pairs": 60, "eval_size": 10}],
        "models": ["paraphrase-MiniLM-L3-v2"],
        "mlflow": {"tracking_uri": "${MLFLOW_TRACKING_URI:-http://127.0.0.1:1}"},
        "ray": {"num_gpus": 0},
    }
    spec_file.write_text(yaml.safe_dump(spec))
    run_dir = tmp_path / "run"
    flags = ["--tracking-uri", f"http://127.0.0.1:{port}", "--storage-path", str(tmp_path / "tune")]
    assert main(["sweep", str(spec_file), "--run-dir", str(run_dir), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    closed.close()
    assert len(err) == 1 and f"127.0.0.1:{port} is unreachable" in err[0], err
    assert not run_dir.exists()
    # The storage flag is checked too: a path that cannot be written is named.
    blocker = tmp_path / "file"
    blocker.write_text("")
    flags = ["--storage-path", str(blocker / "tune")]
    assert main(["sweep", str(spec_file), "--run-dir", str(run_dir), *flags, "--tracking-uri", "sqlite:///"
                 + str(tmp_path / "m.db")]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(blocker / "tune") in err[0], err
