"""Start or join Ray without any traffic off loopback.

At start the Ray head asks cloud metadata addresses (169.254.169.254, metadata.google.internal)
which cloud it runs on, even with usage stats disabled, unless `~/ray_bootstrap_config.yaml`
exists; Ray 2.60 also writes `~/.ray/auth_token` for a new local cluster. So a local cluster is
started with HOME pointing at a private directory that holds a bootstrap config (so the probe is
skipped and nothing lands in the user's home), usage stats off, a private temp dir, and every
address on 127.0.0.1. Loopback is not private: any local user could connect to the Ray and run
code as this one, so token auth is on, with a fresh token that only this run has (a 0600 file in
the private HOME, whose folder is 0700). Only what this process started is shut down, and the
directories it made (the token with them) are removed with it.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import secrets
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from embedtune.env import patched_environ, verbose, worker_env

# Directories made by `init` for the Ray it started; removed by `shutdown`.
_owned_dirs: list[Path] = []
# Marks a directory as made by the embedtune process (PID, start time) written inside.
OWNER_FILE = "embedtune-owner"
TEMP_ROOT = Path("/tmp")  # a private Ray's temp dir (short: Ray's socket paths are length-limited)
TOKEN_FILE = "ray_auth_token"  # the private Ray's token, in its private HOME
_AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
# The driver's Ray auth variables before `init` turned token auth on; put back by `shutdown`.
_saved_auth: list[dict[str, str | None]] = []

BOOTSTRAP = "# written by embedtune: marks a manually started cluster so Ray skips cloud detection\nprovider:\n  type: local\n"


def private_home(base: Path | None = None) -> Path:
    """A HOME for Ray processes holding ray_bootstrap_config.yaml."""
    home = Path(base or tempfile.mkdtemp(prefix="embedtune-rayhome-"))
    home.mkdir(parents=True, exist_ok=True)
    (home / "ray_bootstrap_config.yaml").write_text(BOOTSTRAP)
    return home


def ray_process_env(home: Path) -> dict[str, str]:
    """Environment for Ray processes (also used by tests that start nodes with the CLI)."""
    from embedtune import env

    real_home = Path.home()
    return {
        "HOME": str(home),
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
        # Keep caches where they were before HOME moved.
        "EMBEDTUNE_HOME": str(env.home()),
        "HF_HOME": os.environ.get("HF_HOME", str(real_home / ".cache" / "huggingface")),
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "TOKENIZERS_PARALLELISM": "false",
    }


def joined_runtime_env() -> dict[str, Any]:
    """The job-level runtime env of a driver joining a cluster: the verbosity settings of this
    process (env.worker_env) for the trial workers, which a local Ray's workers inherit but a joined
    cluster's do not. Variables the submitted job's own runtime env sets are left to it: Ray refuses
    to merge a ray.init env var that the job also sets."""
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    taken = set((job.get("runtime_env") or {}).get("env_vars") or {})
    env_vars = {k: v for k, v in worker_env().items() if k not in taken}
    return {"env_vars": env_vars} if env_vars else {}


def is_loopback_address(address: str) -> bool:
    """True for `127.x.x.x:PORT`, `localhost:PORT`, `[::1]:PORT` (a cluster on this machine's loopback)."""
    import ipaddress

    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@contextlib.contextmanager
def _keep_loopback(address: str) -> Iterator[None]:
    """Before connecting, Ray rewrites a loopback address to this machine's outward IP ("remotely
    reachable"), where a cluster started with `--node-ip-address=127.0.0.1` does not listen, so
    the driver would knock on a non-loopback address and time out. While joining a loopback
    address, make Ray keep it as given (what Ray itself does on macOS and Windows)."""
    from ray._private import ray_constants

    if not is_loopback_address(address) or address.startswith("ray://"):
        yield
        return
    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


@contextlib.contextmanager
def _keep_sigterm_handler() -> Iterator[None]:
    """`ray.init` replaces the driver's SIGTERM handler twice: with its own Python one
    (`sys.exit(15)`, no cleanup of ours) and with the C++ failure-signal handler of its core worker
    (which prints `*** SIGTERM received ... PC: @` stack lines). The CLI's handler (SIGTERM treated
    as Ctrl-C, so the sweep saves its state, closes its MLflow runs and frees its lock) is put back
    after it; re-registering through `signal.signal` replaces the C++ one too."""
    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if main and before is not None:
            signal.signal(signal.SIGTERM, before)


@contextlib.contextmanager
def _ray_processes_in_own_group() -> Iterator[None]:
    """Start the local Ray's processes (GCS, raylet, and through it the trial workers) in a process
    group of their own. `timeout`, CI runners and terminals signal the driver's whole group: a SIGTERM
    would otherwise kill the GCS under the driver, whose core worker then aborts the process a minute
    later, before it has saved Tune's state, closed its MLflow runs or freed the run dir. The driver
    stops them itself on the way out, and the kernel still ends them when it dies (Ray's
    PR_SET_PDEATHSIG fate sharing). What Ray does on Windows, done here only where that fate sharing
    exists."""
    from ray._private import services, utils

    if not utils.detect_fate_sharing_support():
        yield
        return
    saved = services.ConsolePopen

    class _OwnGroup(saved):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs) -> None:
            kwargs.setdefault("process_group", 0)
            super().__init__(*args, **kwargs)

    services.ConsolePopen = _OwnGroup
    try:
        yield
    finally:
        services.ConsolePopen = saved


def init(
    address: str | None = None, num_cpus: int | None = None, num_gpus: float | None = None, **kwargs
) -> bool:
    """Join `address` (a running cluster, e.g. on `ray job submit` or `auto`) or start a private local
    Ray on loopback. Returns True when this call started Ray (so the caller should shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        kwargs.setdefault("runtime_env", joined_runtime_env())
        with _keep_loopback(address), _keep_sigterm_handler():
            ray.init(address=address, log_to_driver=True, **kwargs)
        return False
    remove_stale_dirs()
    home = private_home()
    # Set for the whole driver too: worker processes inherit it, and Tune reads ~/ray_bootstrap_config.yaml.
    for key, value in ray_process_env(home).items():
        if key not in ("HOME", "RAY_AUTH_MODE"):
            os.environ.setdefault(key, value)
    _token_auth_on(home)
    temp_dir = Path(tempfile.mkdtemp(prefix="etray-", dir=TEMP_ROOT))
    _owned_dirs.extend([home, temp_dir])
    for made in (home, temp_dir):
        _mark_owned(made)
    with (
        patched_environ({"HOME": str(home)}),
        _undo_on_error(),
        _keep_sigterm_handler(),
        _ray_processes_in_own_group(),
    ):
        ray.init(
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            _temp_dir=str(temp_dir),
            configure_logging=True,
            logging_level="WARNING",
            # the trial workers' own lines (Ray Train's checkpoint notices, library chatter) only
            # with --verbose; errors still reach the driver through Tune
            log_to_driver=verbose(),
            **kwargs,
        )
    return True


@contextlib.contextmanager
def _undo_on_error() -> Iterator[None]:
    """A private Ray that failed to start leaves nothing: its dirs and the auth variables go."""
    try:
        yield
    except BaseException:
        shutdown()
        raise


def _reload_auth_config() -> None:
    """Make this process's Ray see the current RAY_AUTH_* variables: its config and token are
    cached at first use (a driver may start several private Rays, or join a cluster after one).
    The config first: a draining gRPC thread that reloads the token must see the mode it matches."""
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def _token_auth_on(home: Path) -> None:
    """Token auth for the private Ray: a new random token in `home` (0600), named by
    RAY_AUTH_TOKEN_PATH for this driver and every Ray process it starts (they inherit it)."""
    token = home / TOKEN_FILE
    fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(32))
    _saved_auth.append({k: os.environ.get(k) for k in _AUTH_VARS})
    os.environ.pop("RAY_AUTH_TOKEN", None)  # a user's token for another cluster would win over the file
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    _reload_auth_config()


def _token_auth_restore() -> None:
    while _saved_auth:
        for key, value in _saved_auth.pop().items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _reload_auth_config()


def _mark_owned(path: Path) -> None:
    import psutil

    me = psutil.Process()
    (path / OWNER_FILE).write_text(f"{me.pid} {me.create_time()}")


def _owner_alive(path: Path) -> bool:
    import psutil

    try:
        pid, started = (path / OWNER_FILE).read_text().split()
        return abs(psutil.Process(int(pid)).create_time() - float(started)) < 1e-3
    except (OSError, ValueError, psutil.Error):
        return False


def remove_stale_dirs(roots: tuple[Path, ...] | None = None) -> list[Path]:
    """Remove the private HOMEs and temp dirs of local Rays whose embedtune process died without
    `shutdown` (killed: SIGKILL, OOM); Ray's own processes die with it (they share its fate).
    Only directories carrying an owner mark of a dead process are touched."""
    gone = []
    roots = roots or tuple({Path("/tmp"), Path(tempfile.gettempdir())})
    for root, pattern in itertools.product(roots, ("etray-*", "embedtune-rayhome-*")):
        for path in root.glob(pattern):
            if (path / OWNER_FILE).exists() and not _owner_alive(path):
                shutil.rmtree(path, ignore_errors=True)
                gone.append(path)
    return gone


def shutdown() -> None:
    """Disconnect this driver (a joined cluster keeps running) or stop the Ray `init` started, then
    remove the private HOME and temp dir it made (logs, spilled objects, trial scratch)."""
    import ray

    ray.shutdown()
    _token_auth_restore()  # before the token file goes with the private HOME
    while _owned_dirs:
        shutil.rmtree(_owned_dirs.pop(), ignore_errors=True)


@contextlib.contextmanager
def session(address: str | None = None, **kwargs) -> Iterator[bool]:
    """`init` for the duration of a block; yields whether Ray was started here. A Ray the caller
    had already initialised is left as it was."""
    import ray

    if ray.is_initialized():
        yield False
        return
    started = init(address=address, **kwargs)
    try:
        yield started
    finally:
        shutdown()
