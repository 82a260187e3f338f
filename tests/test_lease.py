"""The run-dir lease on object storage (embedtune/lease.py), against a real S3: SeaweedFS started
by the project's own cluster-local S3 part (cluster/local/cluster_local.py's `start_s3`).

- N processes racing to take a free lease, and N racing to take over a dead one: exactly one wins;
- the heartbeat survives the S3 server being killed and restarted under it;
- a holder whose lease was taken over stops with one line and does not delete the new holder's.

Two real drivers of the same sweep started at once (exactly one runs, the other ends with one
line, MLflow holds one set of trial runs, the lease is gone after): tests/test_cluster_local.py's
twin jobs, on the cluster path.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from embedtune import lease
from embedtune.env import patched_environ
from embedtune.lease import Heartbeat, LeaseHeld, LeaseLost, S3Lease

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "cluster" / "local"))
import cluster_local  # noqa: E402  (the cluster-local S3 part, imported as it is)

BUCKET = cluster_local.BUCKET


class S3:
    """SeaweedFS's S3 gateway in a private state dir, as `make cluster-local` starts it."""

    def __init__(self, state_dir: Path) -> None:
        self.state = cluster_local.State(state_dir)
        runtime = Path(tempfile.mkdtemp(prefix="etcl-", dir="/tmp"))
        (runtime / "tmp").mkdir()
        self.state.data.update(
            {"cluster_id": uuid.uuid4().hex[:12], "services": {}, "runtime_dir": str(runtime)}
        )

    @property
    def env(self) -> dict[str, str]:
        return cluster_local.s3_env(self.state)

    def start(self) -> None:
        cluster_local.start_s3(self.state)

    def kill(self) -> None:
        """SIGKILL every process of the S3 server, as `cluster_local.py restart s3` does."""
        import psutil

        procs = [
            psutil.Process(p) for p, svc in cluster_local.owned_processes(self.state).items() if svc == "s3"
        ]
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(procs, timeout=30)
        for sock in cluster_local.weed_grpc_sockets(self.state):
            sock.unlink(missing_ok=True)

    def stop(self) -> None:
        cluster_local.stop_services(self.state, ("s3",), grace=10)
        import shutil

        shutil.rmtree(self.state.runtime_dir, ignore_errors=True)

    def client(self):
        return cluster_local._s3_client(self.env)


@pytest.fixture(scope="module")
def s3(tmp_path_factory) -> Iterator[S3]:
    server = S3(tmp_path_factory.mktemp("s3"))
    server.start()
    try:
        with patched_environ(server.env):  # what boto3 / pyarrow in this process and its children read
            yield server
    finally:
        server.stop()


def _key() -> str:
    return f"s3://{BUCKET}/leases/{uuid.uuid4().hex}/lock.json"


def _contend(locations: list[str], ttl: float, wait: float, barrier, results) -> None:
    """One contender (in its own process): take the lease at each location once, all contenders
    released together by the barrier each round; report each outcome."""
    for location in locations:
        lz = S3Lease(location, {"host": "test", "pid": os.getpid()}, ttl=ttl)
        barrier.wait()
        try:
            lz.acquire(wait=wait, poll=0.2)
            results.put((location, os.getpid(), "won", lz.owner["token"]))
        except LeaseHeld as exc:
            results.put((location, os.getpid(), "held", str(exc)))
        except Exception as exc:  # noqa: BLE001 - reported to the test, which fails on it
            results.put((location, os.getpid(), "error", repr(exc)))


def _race(locations: list[str], n: int, ttl: float, wait: float) -> dict[str, list[tuple[int, str, str]]]:
    """{location: [(pid, outcome, token or message)]} of `n` processes racing for each location."""
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_contend, args=(locations, ttl, wait, barrier, results)) for _ in range(n)]
    for p in procs:
        p.start()
    out: dict[str, list[tuple[int, str, str]]] = {loc: [] for loc in locations}
    for _ in range(n * len(locations)):
        location, *rest = results.get(timeout=120)
        out[location].append(tuple(rest))
    for p in procs:
        p.join(30)
    return out


def _holder(s3: S3, location: str) -> dict:
    bucket, key = location.removeprefix("s3://").split("/", 1)
    return json.loads(s3.client().get_object(Bucket=bucket, Key=key)["Body"].read())


def test_racing_processes_exactly_one_takes_a_free_lease(s3: S3) -> None:
    # a few rounds: a check-then-write lease lets several win in most of them
    for location, results in _race([_key() for _ in range(3)], n=6, ttl=30, wait=0).items():
        assert not [r for r in results if r[1] == "error"], results
        winners = [r for r in results if r[1] == "won"]
        assert len(winners) == 1, results
        assert _holder(s3, location)["token"] == winners[0][2]  # the object is the winner's
        for _, outcome, line in results:
            if outcome == "held":
                assert "\n" not in line and "in use by pid" in line


def test_racing_processes_exactly_one_takes_over_a_dead_lease(s3: S3) -> None:
    """A lease nobody refreshes (its driver died) is taken over after `ttl` s, by one contender."""
    location = _key()
    dead = S3Lease(location, {"host": "gone", "pid": 1}, ttl=2)
    dead.acquire(wait=0)  # and never refreshed
    results = _race([location], n=5, ttl=2, wait=30)[location]
    assert not [r for r in results if r[1] == "error"], results
    winners = [r for r in results if r[1] == "won"]
    assert len(winners) == 1, results
    assert _holder(s3, location)["token"] == winners[0][2]


def test_a_refreshed_lease_is_refused_and_released_only_by_its_holder(s3: S3) -> None:
    location = _key()
    with lease.hold(location, {"host": "h1", "pid": 111}, ttl=3, on_lost=lambda r: None) as beat:
        t0 = time.monotonic()
        with pytest.raises(LeaseHeld, match="in use by pid 111 on h1"):
            S3Lease(location, {"host": "h2", "pid": 222}, ttl=3).acquire(poll=0.2)
        # refused as soon as a refresh is seen, long before the lease could have expired
        assert time.monotonic() - t0 < 3, "a live holder must not look dead"
        assert beat.refreshes >= 1
    assert not S3Lease(location, {}, ttl=3)._read()  # released: the object is gone
    S3Lease(location, {"host": "h2", "pid": 222}, ttl=3).acquire(wait=0)  # free again at once


def test_heartbeat_survives_an_s3_restart(s3: S3) -> None:
    """The S3 server is SIGKILLed under a held lease and back 6 s later (less than the ttl): the
    heartbeat retries through the outage and keeps the lease; nobody can take it meanwhile."""
    location = _key()
    lost: list[str] = []
    with lease.hold(location, {"host": "h1", "pid": 111}, ttl=15, on_lost=lost.append) as beat:
        s3.kill()
        time.sleep(6)
        s3.start()
        deadline = time.monotonic() + 60
        before = beat.refreshes
        while beat.refreshes < before + 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert beat.failures >= 1, "the outage was not seen: the test did not test the restart"
        assert beat.refreshes >= before + 2 and beat.is_alive() and not lost, (beat.failures, lost)
        with pytest.raises(LeaseHeld):
            S3Lease(location, {"host": "h2", "pid": 222}, ttl=15).acquire(poll=0.5)
    assert not lost


def test_a_holder_whose_lease_was_taken_stops_with_one_line(s3: S3) -> None:
    location = _key()
    lost: list[str] = []
    with pytest.raises(LeaseLost) as info:
        with lease.hold(location, {"host": "h1", "pid": 111}, ttl=3, on_lost=lost.append):
            # another driver took it over (as after a partition longer than the ttl)
            other = S3Lease(location, {"host": "h2", "pid": 222}, ttl=3)
            other.etag = _holder_etag(s3, location)
            other.refresh()
            deadline = time.monotonic() + 20
            while not lost and time.monotonic() < deadline:
                time.sleep(0.2)
    line = str(info.value)
    assert "\n" not in line and "lost its lease to pid 222 on h2" in line
    assert lost == [line]
    assert _holder(s3, location)["pid"] == 222  # the new holder's lease was not released by the loser


def _holder_etag(s3: S3, location: str) -> str:
    bucket, key = location.removeprefix("s3://").split("/", 1)
    return s3.client().head_object(Bucket=bucket, Key=key)["ETag"]


# ---------------------------------------------------------------- the refresher's own logic (unit)


class _FlakyLease:
    """A lease whose refresh fails `failures` times (S3 away), then works; or never does."""

    def __init__(self, failures: int | None, ttl: float = 1.5) -> None:
        self.ttl, self.failures, self.calls, self.location = ttl, failures, 0, "s3://b/run/lock.json"

    def refresh(self) -> None:
        self.calls += 1
        if self.failures is None or self.calls <= self.failures:
            raise ConnectionError("Could not connect to the endpoint URL")


def test_heartbeat_retries_then_goes_on() -> None:
    lost: list[str] = []
    beat = Heartbeat(_FlakyLease(failures=2, ttl=3), lost.append)  # type: ignore[arg-type]
    beat.start()
    time.sleep(3.5)
    beat.stop.set()
    beat.join(5)
    assert not lost and beat.failures == 2 and beat.refreshes >= 1


def test_heartbeat_declares_the_lease_expired_after_ttl_without_a_refresh() -> None:
    lost: list[str] = []
    beat = Heartbeat(_FlakyLease(failures=None, ttl=1.5), lost.append)  # type: ignore[arg-type]
    beat.start()
    beat.join(10)
    assert not beat.is_alive() and len(lost) == 1 and beat.lost == lost[0]
    assert "lease expired" in lost[0] and "Could not connect" in lost[0] and "\n" not in lost[0]


LOST_LEASE_DRIVER = """
import sys, time
from embedtune import lease

class Lost:  # acquired, then never refreshed (S3 away): lost after ttl
    location = "s3://b/run/lock.json"

    def __init__(self, *args):
        self.ttl, self.etag = 1.0, None

    def acquire(self):
        self.etag = "x"

    def refresh(self):
        raise ConnectionError("Could not connect to the endpoint URL")

    def release(self):
        raise AssertionError("a lost lease must not be released")

lease.S3Lease = Lost
try:
    with lease.hold("s3://b/run/lock.json", {}):
        time.sleep(30)  # interrupted by the heartbeat's SIGINT
    print("NOT INTERRUPTED")
except lease.LeaseLost as exc:
    print("LeaseLost:", exc)
except KeyboardInterrupt:
    print("bare KeyboardInterrupt")
"""


def test_hold_turns_the_interrupt_of_a_lost_lease_into_one_line() -> None:
    """The default on_lost interrupts the main thread with a real SIGINT (as Ctrl-C: Tune stops);
    `hold` then raises the loss, not a bare KeyboardInterrupt. In a process of its own, as the
    sweep's driver is: a signal sent to the test runner would meet whatever handlers earlier tests'
    native libraries left installed there."""
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", LOST_LEASE_DRIVER], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("LeaseLost: ") and "lease expired" in done.stdout, done.stdout
    assert len(done.stdout.strip().splitlines()) == 1
    assert time.monotonic() - started < 25  # the sleep was cut short by the interrupt


def test_refresh_tells_a_lost_lease_from_a_transient_error() -> None:
    """412 (someone else's ETag now) and 404 (deleted) mean lost; AWS's 409 (a concurrent
    conditional write in flight) and 5xx are retried by the heartbeat."""
    from botocore.exceptions import ClientError

    def failing(status: int, code: str):
        class Client:
            def put_object(self, **kwargs):
                raise ClientError(
                    {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject"
                )

            def get_object(self, **kwargs):
                raise ClientError(
                    {"Error": {"Code": "NoSuchKey"}, "ResponseMetadata": {"HTTPStatusCode": 404}}, "GetObject"
                )

        lz = S3Lease.__new__(S3Lease)
        lz.location, lz.bucket, lz.key = "s3://b/run/lock.json", "b", "run/lock.json"
        lz.owner, lz.ttl, lz.etag, lz._beats, lz.client = {}, 30.0, '"e"', 0, Client()
        return lz

    for status, code in ((412, "PreconditionFailed"), (404, "NoSuchKey")):
        with pytest.raises(LeaseLost, match="lost its lease to nobody"):
            failing(status, code).refresh()
    for status, code in ((409, "ConditionalRequestConflict"), (503, "SlowDown")):
        with pytest.raises(ClientError):
            failing(status, code).refresh()
