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


@pytest.mark.slow
def test_a_local_ray_leaves_the_drivers_sigterm_handler_and_runs_in_its_own_process_groups() -> None:
    """`ray.init` installs its own SIGTERM handlers (exit without cleanup, stack lines): the driver's
    is put back, so a real SIGTERM reaches it; Ray's processes are outside the driver's process group,
    so `timeout`'s group signal does not kill them under the driver."""
    import os
    import signal
    import time

    import psutil

    got: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
    try:
        with ray_env.session(num_cpus=1) as started:
            assert started
            kids = psutil.Process().children(recursive=True)
            assert kids and all(os.getpgid(k.pid) != os.getpgid(0) for k in kids)
            os.kill(os.getpid(), signal.SIGTERM)
            deadline = time.time() + 10
            while not got and time.time() < deadline:
                time.sleep(0.05)
            assert got == [signal.SIGTERM]  # handled by the driver's handler, the process lives on
            assert all(k.is_running() for k in kids)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _connect(address: str, env: dict[str, str], home: Path) -> subprocess.CompletedProcess[str]:
    """A separate client process (another local user's, say) that joins the Ray at `address` and
    runs one task."""
    code = (
        f"import ray; ray.init(address={address!r}, log_to_driver=False); "
        "print('RAN', ray.get(ray.remote(lambda: 6 * 7).remote()))"
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
        env={**clean, "HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0", **env},
    )  # fmt: skip


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

        for env in (
            {"RAY_AUTH_MODE": "disabled"},
            {},
            {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64},
        ):
            refused = _connect(address, env, bootstrap_home)
            assert refused.returncode != 0 and "RAN" not in refused.stdout, (env, refused.stdout)
            assert "uthentication" in refused.stderr + refused.stdout, (env, refused.stderr[-2000:])
        allowed = _connect(
            address, {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}, bootstrap_home
        )
        assert "RAN 42" in allowed.stdout, allowed.stderr[-2000:]
    finally:
        ray_env.shutdown()
    assert not token_file.exists() and not home.exists()
    assert os.environ["RAY_AUTH_MODE"] == "disabled" and "RAY_AUTH_TOKEN_PATH" not in os.environ
