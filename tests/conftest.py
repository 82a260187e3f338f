"""Test-wide hygiene: offline hub, telemetry off, a shared cache home, and no sockets off loopback."""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.update(
    EMBEDTUNE_OFFLINE="1",
    HF_HUB_OFFLINE="1",
    HF_DATASETS_OFFLINE="1",
    TRANSFORMERS_OFFLINE="1",
    MLFLOW_DISABLE_TELEMETRY="true",
    RAY_USAGE_STATS_ENABLED="0",
    TOKENIZERS_PARALLELISM="false",
    DO_NOT_TRACK="1",
)
# A user's tracking server or Ray cluster must not catch the tests' runs.
for _var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "RAY_ADDRESS"):
    os.environ.pop(_var, None)
# Models materialise once into this home and are reused by every test (and every test run).
os.environ.setdefault("EMBEDTUNE_HOME", str(REPO / ".embedtune-test-home"))


def _is_loopback(address: object) -> bool:
    if not isinstance(address, tuple) or not address:
        return True  # AF_UNIX paths and the like
    host = str(address[0])
    if host in {"localhost", ""}:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a hostname other than localhost: would need DNS, so it is off-box


class OffLoopbackConnection(AssertionError):
    pass


def _no_egress(event: str, args: tuple) -> None:
    if event == "socket.connect" and len(args) >= 2:
        sock, address = args[0], args[1]
        if getattr(sock, "family", None) in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address):
            raise OffLoopbackConnection(f"test process tried to connect off loopback: {address!r}")


sys.addaudithook(_no_egress)

# What the CLI shows (embedtune's INFO lines, others' warnings), so tests see a sweep's output.
from embedtune.cli import configure_logging  # noqa: E402

configure_logging()


# ---------------------------------------------------------------- skips are counted, and fail CI
# The session ends with how many tests skipped and why (one line per reason). In CI (.ci/run sets
# EMBEDTUNE_CI=1) a skip fails the session unless its reason starts with one of ALLOWED_SKIPS: a
# test that needs data, a package or a server must run there, not skip quietly. Add a reason here
# only for what a CI machine can lack for real.
ALLOWED_SKIPS = (
    "root reads files",  # test_cli_train: a permission test that means nothing as root
    "no GPU",  # GPU checks on a CPU-only machine
    "GPU present",  # the CPU-fallback checks on a GPU machine
    "unshare --",  # a namespace (network, mount) a container may not allow, even to root
)
_SKIPS: dict[str, list[str]] = {}


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    text = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return text.removeprefix("Skipped: ").strip()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        _SKIPS.setdefault(_skip_reason(report), []).append(report.nodeid)


def _disallowed() -> dict[str, list[str]]:
    if os.environ.get("EMBEDTUNE_CI") != "1":
        return {}
    return {r: ids for r, ids in _SKIPS.items() if not r.startswith(ALLOWED_SKIPS)}


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _disallowed() and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    total = sum(len(ids) for ids in _SKIPS.values())
    terminalreporter.write_sep("-", f"{total} test(s) skipped")
    for reason, ids in sorted(_SKIPS.items(), key=lambda kv: -len(kv[1])):
        terminalreporter.write_line(f"{len(ids):4d} skipped: {reason}")
    for reason, ids in _disallowed().items():
        terminalreporter.write_line(
            f"CI (EMBEDTUNE_CI=1): skip not allowed ({reason}): {', '.join(ids)}", red=True, bold=True
        )


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


# Small real data shared by the negatives / train tests: mining and training on the whole medquad
# sample take about a minute each on CPU; this is ~480 pairs (whole groups), 100 held-out
# questions, 256 training pairs, and a ~480-answer eval corpus.
SMALL_DATA = {"source": "medquad-sample", "max_pairs": 480, "eval_size": 100, "max_train_pairs": 256}
SMALL_MINING = {"max_seq_length": 64}


@pytest.fixture(scope="session")
def small_data():
    from embedtune.data import prepare
    from embedtune.specs import DataSpec

    return prepare(DataSpec(**SMALL_DATA))


@pytest.fixture(scope="session")
def negatives_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("negatives-cache")


@pytest.fixture(scope="session")
def small_triplets(small_data, negatives_cache):
    """Triplets mined once per session (into a fresh cache: `.mined` is True), truncating like training."""
    from embedtune.negatives import mine
    from embedtune.specs import MiningSpec

    return mine(small_data, MiningSpec(**SMALL_MINING), cache_dir=negatives_cache)


@pytest.fixture
def sweep_command(tmp_path: Path):
    """make(raw_spec, name) -> (argv of `embedtune sweep SPEC --run-dir RUN --no-final`, RUN):
    the spec written as YAML under tmp_path, for tests that run, kill and rerun the real CLI."""
    import yaml

    def make(raw: dict, name: str = "spec") -> tuple[list[str], Path]:
        spec_file = tmp_path / f"{name}.yaml"
        spec_file.write_text(yaml.safe_dump(raw))
        run_dir = tmp_path / "run"
        cmd = [sys.executable, "-m", "embedtune.cli", "sweep", str(spec_file), "--run-dir", str(run_dir)]
        return [*cmd, "--no-final"], run_dir

    return make


@pytest.fixture(scope="session")
def mlflow_empty_db(tmp_path_factory) -> Path:
    """An MLflow SQLite store with its schema made (MLflow's own migrations), made once: each test's
    server starts on a copy instead of migrating a new file (a quarter of its start time)."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    path = tmp_path_factory.mktemp("mlflow-template") / "empty.db"
    store = SqlAlchemyStore(f"sqlite:///{path}", str(path.parent / "artifacts"))
    store.engine.dispose()
    return path


@pytest.fixture
def mlflow_server(tmp_path: Path, mlflow_empty_db: Path):
    """A real `mlflow server` on a loopback port (SQLite store, local artifacts) for the test; the test
    may `kill()` and `start()` it again (an outage), it is killed at the end."""
    import shutil

    from servers import MlflowServer

    shutil.copyfile(mlflow_empty_db, tmp_path / "server.db")
    server = MlflowServer(f"sqlite:///{tmp_path / 'server.db'}", artifacts=tmp_path / "server-artifacts")
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="session")
def grid_sweep(tmp_path_factory):
    """The 2 models x 2 epoch counts sweep of specs.tiny_spec in separate mode, run once per session (SQLite store,
    models logged): test_sweep checks its records, test_mlflow_ui browses its MLflow store."""
    from types import SimpleNamespace

    from specs import tiny_spec

    from embedtune.specs import parse_spec
    from embedtune.sweep import run_sweep

    # Everything the product names etray-*/embedtune-* in /tmp. Tests keep their own folders there
    # under etest-* (the cluster session runs beside this one), so they are never counted here.
    def leftovers() -> set[Path]:
        return {*Path("/tmp").glob("etray-*"), *Path("/tmp").glob("embedtune-*")}

    # separate mode: one Tune trial per (model, epochs), the study's setup (branch mode: test_sweep)
    spec = parse_spec(
        tiny_spec(
            "grid2x2", search={"epochs": [1, 2], "batch_size": [16], "lr": [5e-5], "epochs_mode": "separate"}
        )
    )
    run_dir = tmp_path_factory.mktemp("grid2x2") / "run"
    before = leftovers()
    result = run_sweep(spec, run_dir, final=False)
    return SimpleNamespace(
        spec=spec, result=result, run_dir=run_dir, leftovers_before=before, leftovers_after=leftovers()
    )
