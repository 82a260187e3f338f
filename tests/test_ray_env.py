"""ray_env: Ray started or joined on loopback only, with a private HOME (no Ray process needed, but
for the one test that starts a local Ray to check its signal handling)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from embedtune import ray_env


@pytest.mark.parametrize(
    "address, loopback",
    [
        ("127.0.0.1:6379", True),
        ("127.0.1.1:6379", True),
        ("localhost:6379", True),
        ("[::1]:6379", True),
        ("10.0.0.5:6379", False),
        ("embedtune-head-svc.embedtune.svc:6379", False),
        ("auto", False),
    ],
)
def test_is_loopback_address(address: str, loopback: bool) -> None:
    assert ray_env.is_loopback_address(address) is loopback


def test_joining_a_loopback_address_stays_on_loopback() -> None:
    """Ray rewrites 127.0.0.1 to the machine's outward IP before connecting; while joining a
    loopback address ray_env keeps it as given, and restores Ray's behaviour afterwards."""
    from ray._private import ray_constants, services

    before = ray_constants.ENABLE_RAY_CLUSTER
    with ray_env._keep_loopback("127.0.0.1:6379"):
        assert services.canonicalize_bootstrap_address("127.0.0.1:6379") == "127.0.0.1:6379"
    assert ray_constants.ENABLE_RAY_CLUSTER == before
    with ray_env._keep_loopback("10.0.0.5:6379"):  # a real cluster address: untouched
        assert ray_constants.ENABLE_RAY_CLUSTER == before
        assert services.canonicalize_bootstrap_address("10.0.0.5:6379") == "10.0.0.5:6379"


def test_private_home_and_process_env(tmp_path, monkeypatch) -> None:
    home = ray_env.private_home(tmp_path / "home")
    assert (home / "ray_bootstrap_config.yaml").read_text().strip()  # Ray skips its cloud probes
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    env = ray_env.ray_process_env(home)
    assert env["HOME"] == str(home)
    assert env["RAY_USAGE_STATS_ENABLED"] == "0"
    # nodes a test starts with the CLI: auth off unless asked for (`init`'s private Ray turns it on)
    assert env["RAY_AUTH_MODE"] == "disabled"
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # a token-auth cluster's setting is passed on
    assert ray_env.ray_process_env(home)["RAY_AUTH_MODE"] == "token"


def test_stale_dirs_of_dead_owners_are_removed_live_and_foreign_ones_kept(tmp_path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale, live, foreign = tmp_path / "etray-stale", tmp_path / "etray-live", tmp_path / "etray-foreign"
    for d in (stale, live, foreign):
        d.mkdir()
        (d / "session_latest").mkdir()
    (stale / ray_env.OWNER_FILE).write_text(f"{dead.pid} 1.0")  # its process is gone
    ray_env._mark_owned(live)  # this process: alive
    # foreign: no owner mark (another tool's, or a user's): never touched
    assert ray_env.remove_stale_dirs((tmp_path,)) == [stale]
    assert not stale.exists() and live.exists() and foreign.exists()


SIGTERM_DRIVER = """
import os, signal, time
import psutil
from embedtune import ray_env

got = []
signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
with ray_env.session(num_cpus=1) as started:
    assert started
    kids = psutil.Process().children(recursive=True)
    assert kids and all(os.getpgid(k.pid) != os.getpgid(0) for k in kids), "Ray in the driver's group"
    os.kill(os.getpid(), signal.SIGTERM)
    deadline = time.time() + 10
    while not got and time.time() < deadline:
        time.sleep(0.05)
    print("handled", got, "ray alive", all(k.is_running() for k in kids), flush=True)
"""


@pytest.mark.slow
def test_a_local_ray_leaves_the_drivers_sigterm_handler_and_runs_in_its_own_process_groups() -> None:
    """`ray.init` installs its own SIGTERM handlers (exit without cleanup, stack lines): the driver's
    is put back, so a real SIGTERM reaches it; Ray's processes are outside the driver's process group,
    so `timeout`'s group signal does not kill them under the driver. The driver is a process of its
    own, as a sweep's is: a signal sent to the test runner would meet whatever handlers earlier
    tests' native libraries left installed there."""
    import signal

    done = subprocess.run([sys.executable, "-c", SIGTERM_DRIVER], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    # handled by the driver's handler (the process lived on to print it), Ray's processes untouched
    assert f"handled [{int(signal.SIGTERM)}] ray alive True" in done.stdout, done.stdout + done.stderr[-2000:]


def _connect(address: str, envs: list[dict[str, str]], home: Path) -> list[subprocess.CompletedProcess[str]]:
    """Separate client processes (another local user's, say), one per environment in `envs`, each
    joining the Ray at `address` and running one task; all at once (a refused client spends most
    of its time in Ray's connection retries)."""
    code = (
        f"import ray; ray.init(address={address!r}, log_to_driver=False); "
        "print('RAN', ray.get(ray.remote(lambda: 6 * 7).remote()))"
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return _run_at_once(
        [[sys.executable, "-c", code]] * len(envs),
        [{**clean, "HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0", **env} for env in envs],
        timeout=120,
    )


def _run_at_once(
    argvs: list[list[str]], envs: list[dict[str, str]], timeout: float
) -> list[subprocess.CompletedProcess[str]]:
    """Run every argv (with its environment) at the same time; their results, in order."""
    procs = [
        subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for argv, env in zip(argvs, envs, strict=True)
    ]
    try:
        outputs = [proc.communicate(timeout=timeout) for proc in procs]  # (stdout, stderr) each
        return [
            subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
            for proc, (out, err) in zip(procs, outputs, strict=True)
        ]
    finally:
        for proc in procs:  # none left behind when one ran past the timeout
            if proc.poll() is None:
                proc.kill()


@pytest.mark.slow
def test_the_private_ray_refuses_a_client_without_its_token(tmp_path, monkeypatch) -> None:
    """The private local Ray runs with token auth and a token only this run has: a Tune run works
    in it, while a client without the token (no token, or a wrong one) is refused; the same client
    with the token gets in. Afterwards the token is gone and the driver's variables are back."""
    import stat

    import ray
    from ray import tune

    (tmp_path / "bootstrap").mkdir()
    bootstrap_home = ray_env.private_home(tmp_path / "bootstrap")  # the outsider skips cloud probes too
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # what the driver had before: put back afterwards
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert ray_env.init(num_cpus=1) is True
    try:
        token_file = Path(os.environ["RAY_AUTH_TOKEN_PATH"])
        home = token_file.parent
        assert os.environ["RAY_AUTH_MODE"] == "token" and home.name.startswith("embedtune-rayhome-")
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600 and len(token_file.read_text()) == 64
        assert stat.S_IMODE(home.stat().st_mode) == 0o700
        address = ray.get_runtime_context().gcs_address

        def trainable(config):
            tune.report({"score": config["x"] * 2})

        grid = tune.Tuner(trainable, param_space={"x": tune.grid_search([1, 2])},
                          run_config=tune.RunConfig(storage_path=str(tmp_path / "tune"))).fit()  # fmt: skip
        assert sorted(r.metrics["score"] for r in grid) == [2, 4] and not grid.errors

        refused_envs = [
            {"RAY_AUTH_MODE": "disabled"},
            {},
            {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64},
        ]
        allowed_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}
        *refused_clients, allowed = _connect(address, [*refused_envs, allowed_env], bootstrap_home)
        for env, refused in zip(refused_envs, refused_clients, strict=True):
            assert refused.returncode != 0 and "RAN" not in refused.stdout, (env, refused.stdout)
            assert "uthentication" in refused.stderr + refused.stdout, (env, refused.stderr[-2000:])
        assert "RAN 42" in allowed.stdout, allowed.stderr[-2000:]
    finally:
        ray_env.shutdown()
    assert not token_file.exists() and not home.exists()
    assert os.environ["RAY_AUTH_MODE"] == "disabled" and "RAY_AUTH_TOKEN_PATH" not in os.environ


# ------------------------------------------------------------------ a joined cluster's trial workers

QUIET_IN_WORKERS = {
    "TQDM_DISABLE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}


def _without_verbosity(environ: dict[str, str]) -> dict[str, str]:
    from embedtune.env import _QUIET

    return {k: v for k, v in environ.items() if k not in _QUIET and k != "EMBEDTUNE_VERBOSE"}


def test_a_joining_driver_gives_its_workers_the_quiet_settings_unless_verbose(monkeypatch) -> None:
    from embedtune import env

    for key in [*env._QUIET, "EMBEDTUNE_VERBOSE", "RAY_JOB_CONFIG_JSON_ENV_VAR"]:
        monkeypatch.delenv(key, raising=False)
    assert ray_env.joined_runtime_env() == {}  # nothing chosen yet: nothing passed on
    env.set_verbose(False)
    quiet = ray_env.joined_runtime_env()["env_vars"]
    assert QUIET_IN_WORKERS.items() <= quiet.items() and quiet["EMBEDTUNE_VERBOSE"] == "0"
    # a submitted job's own runtime env wins: Ray refuses to merge a variable both set
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", '{"runtime_env": {"env_vars": {"TQDM_DISABLE": "0"}}}')
    assert "TQDM_DISABLE" not in ray_env.joined_runtime_env()["env_vars"]
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    for key in env._QUIET:
        monkeypatch.delenv(key, raising=False)
    env.set_verbose(True)
    assert ray_env.joined_runtime_env() == {"env_vars": {"EMBEDTUNE_VERBOSE": "1"}}


DRIVER = """
import json, os, sys
import ray
from embedtune import env, ray_env
env.set_verbose(sys.argv[2] == "1")
ray_env.init(address=sys.argv[1])
keys = json.loads(sys.argv[3])
print("ENV", json.dumps(ray.get(ray.remote(lambda: {k: os.environ.get(k) for k in keys}).remote())))
ray_env.shutdown()
"""


@pytest.mark.slow
def test_a_joined_clusters_workers_get_the_drivers_verbosity(tmp_path) -> None:
    """A Ray head started elsewhere (its raylet's environment has no quiet settings): the workers of
    a driver that joins it run with TQDM_DISABLE etc. unless the driver is --verbose."""
    import json
    import signal
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    home = ray_env.private_home(tmp_path / "home")
    base = _without_verbosity(dict(os.environ))
    base = {k: v for k, v in base.items() if not k.startswith("RAY_")}
    node_env = {**base, **ray_env.ray_process_env(home)}
    temp = Path("/tmp") / f"etrj-{os.getpid()}"
    head = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", f"--port={port}",
         "--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0", "--include-dashboard=false",
         f"--temp-dir={temp}"],
        env=node_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        keys = json.dumps([*QUIET_IN_WORKERS, "EMBEDTUNE_VERBOSE"])
        seen: dict[str, dict] = {}
        for _ in range(60):  # the head takes a while to come up on a busy machine
            todo = [verbose for verbose in ("0", "1") if verbose not in seen]  # quiet and --verbose
            runs = _run_at_once(
                [[sys.executable, "-c", DRIVER, f"127.0.0.1:{port}", verbose, keys] for verbose in todo],
                [{**node_env, "HOME": str(home)}] * len(todo),
                timeout=180,
            )
            errors = {verbose: run.stderr for verbose, run in zip(todo, runs, strict=True)}
            for verbose, run in zip(todo, runs, strict=True):
                line = next((x for x in run.stdout.splitlines() if x.startswith("ENV ")), None)
                if line:
                    seen[verbose] = json.loads(line.removeprefix("ENV "))
            if len(seen) == 2 or head.poll() is not None:
                break
            time.sleep(2)
        assert len(seen) == 2, errors
        assert seen["0"] == {**QUIET_IN_WORKERS, "EMBEDTUNE_VERBOSE": "0"}
        assert seen["1"] == {**dict.fromkeys(QUIET_IN_WORKERS), "EMBEDTUNE_VERBOSE": "1"}
    finally:
        # `ray start --block` takes half a minute to stop on SIGTERM; its whole group is ours to kill
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        import shutil

        shutil.rmtree(temp, ignore_errors=True)
