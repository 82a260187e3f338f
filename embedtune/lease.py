"""The run-dir lease on object storage: one driver at a time, taken and kept with conditional writes.

A local run dir is held with an OS file lock; a run dir on S3 has no such thing, so its driver holds
a small lease object (`lock.json`) instead. Every change of that object is a conditional PUT, so two
drivers can never both believe they hold it:

- take:      PUT If-None-Match: *           (412 when the object exists: someone holds it)
- take over: PUT If-Match: <ETag seen>      (only a lease seen unchanged for `ttl` s, on our clock)
- refresh:   PUT If-Match: <our last ETag>  (every ttl/3 s; 412: someone took it over)
- release:   DELETE If-Match: <our ETag>

Expiry is judged by watching the ETag, not by comparing the holder's clock with ours: a holder that
refreshes changes the ETag (each body carries a new beat), so an ETag unchanged for `ttl` seconds
belongs to a dead driver. The refresher retries transient S3 errors with backoff; when the lease is
lost (taken over, deleted, or not refreshed for `ttl` s), `on_lost` is called once with one line
(the default interrupts the main thread, so the sweep stops as on Ctrl-C) and `hold` then raises
LeaseLost with that line.

S3's conditional writes (AWS since 2024; SeaweedFS for non-versioned buckets) go through boto3:
pyarrow's S3 filesystem has no precondition headers. boto3 takes the endpoint, region and keys from
the same environment variables pyarrow reads (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ...).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlparse

from embedtune.errors import EmbedtuneError

log = logging.getLogger(__name__)

TTL_S = 30.0


class LeaseHeld(EmbedtuneError):
    """Another driver holds the lease and refreshes it."""


class LeaseLost(EmbedtuneError):
    """The lease was taken over or expired while we held it."""


def _interrupt_main(reason: str) -> None:
    # As Ctrl-C: Tune saves its state and stops; the sweep's own KeyboardInterrupt path runs.
    os.kill(os.getpid(), signal.SIGINT)


def _client():
    try:
        import boto3
        from botocore.config import Config
    except ImportError as exc:  # boto3 is in the `cluster` extra
        raise EmbedtuneError(
            "a run dir on S3 needs boto3 for its lease: pip install 'embedtune[cluster]'"
        ) from exc
    # S3-compatible stores (SeaweedFS, MinIO) behind AWS_ENDPOINT_URL want path-style addressing, as
    # pyarrow uses; AWS itself takes either. Short timeouts: the refresher retries on its own.
    style = "path" if os.environ.get("AWS_ENDPOINT_URL") else "auto"
    config = Config(
        s3={"addressing_style": style},
        connect_timeout=5,
        read_timeout=10,
        retries={"max_attempts": 2, "mode": "standard"},
    )
    # A new session each time: boto3's default session keeps the first credentials it resolved for the
    # life of the process, so keys set in the environment later (rotated, another run dir's) would
    # never be used.
    return boto3.session.Session().client("s3", config=config)


def _code(exc: BaseException) -> tuple[str, int]:
    from botocore.exceptions import ClientError

    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        return str(err.get("Code", "")), int(
            exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        )
    return "", 0


def _precondition_failed(exc: BaseException) -> bool:
    code, status = _code(exc)
    return status == 412 or code == "PreconditionFailed"


def _conflict(exc: BaseException) -> bool:
    """AWS's 409: another conditional write on the key is in flight (retry, as the loser of a race)."""
    code, status = _code(exc)
    return status == 409 or code == "ConditionalRequestConflict"


def _not_found(exc: BaseException) -> bool:
    code, status = _code(exc)
    return status == 404 or code in ("NoSuchKey", "NotFound", "404")


class S3Lease:
    """The lease object at `location` (`s3://bucket/key`), held by `owner` (host, pid, ...)."""

    def __init__(self, location: str, owner: dict[str, Any], ttl: float = TTL_S) -> None:
        parsed = urlparse(location)
        if parsed.scheme != "s3":
            raise EmbedtuneError(
                f"run dir lease {location}: only s3:// run dirs can be leased (conditional writes); "
                "use an s3:// storage_path or a local --run-dir"
            )
        self.location = location
        self.bucket, self.key = parsed.netloc, parsed.path.lstrip("/")
        self.owner = {**owner, "token": uuid.uuid4().hex}
        self.ttl = ttl
        self.etag: str | None = None
        self.client = _client()
        self._beats = 0

    # ---------------------------------------------------------------- one conditional request each

    def _body(self) -> bytes:
        self._beats += 1  # a new body each time: the ETag (an MD5 of it) changes with every refresh
        return json.dumps({**self.owner, "beat": time.time(), "beats": self._beats}).encode()

    def _put(self, **condition: str) -> str:
        resp = self.client.put_object(
            Bucket=self.bucket, Key=self.key, Body=self._body(), ContentType="application/json", **condition
        )
        return resp["ETag"]

    def _read(self) -> tuple[str, dict[str, Any]] | None:
        """(ETag, content) of the lease object, or None when there is none."""
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except Exception as exc:
            if _not_found(exc):
                return None
            raise
        raw = resp["Body"].read()
        try:
            content = json.loads(raw)
        except ValueError:
            content = {}
        return resp["ETag"], content if isinstance(content, dict) else {}

    # ---------------------------------------------------------------- take

    def acquire(self, wait: float | None = None, poll: float = 1.0) -> None:
        """Take the lease, or raise LeaseHeld (one line naming the holder). A lease seen unchanged for
        `ttl` s is taken over; one that changes (its holder refreshes it) is refused as soon as it
        does. `wait` bounds the whole attempt (default: ttl + 5 s)."""
        deadline = time.monotonic() + (self.ttl + 5 if wait is None else wait)
        seen: tuple[str, float] | None = None  # (ETag, when first seen on our clock)
        while True:
            try:
                self.etag = self._put(IfNoneMatch="*")
                log.debug("lease %s taken", self.location)
                return
            except Exception as exc:
                if not (_precondition_failed(exc) or _conflict(exc)):
                    raise
            current = self._read()
            if current is None:  # released between our PUT and our read (or a write in flight)
                if time.monotonic() > deadline:
                    raise self._held({})
                time.sleep(min(poll, 0.2))
                continue
            etag, holder = current
            now = time.monotonic()
            if seen is None or seen[0] != etag:
                if seen is not None:  # it changed under our eyes: the holder is alive
                    raise self._held(holder)
                seen = (etag, now)
            elif now - seen[1] >= self.ttl:
                try:
                    self.etag = self._put(IfMatch=etag)
                except Exception as exc:
                    if not (_precondition_failed(exc) or _conflict(exc)):
                        raise
                    raise self._held(self._read_holder()) from None  # another driver took it first
                log.warning(
                    "run dir lease %s: took over the lease of pid %s on %s (not refreshed for %.0f s)",
                    self.location,
                    holder.get("pid"),
                    holder.get("host"),
                    now - seen[1],
                )
                return
            if now > deadline:
                raise self._held(holder)
            time.sleep(poll)

    def _read_holder(self) -> dict[str, Any]:
        current = self._read()
        return current[1] if current else {}

    def _held(self, holder: dict[str, Any]) -> LeaseHeld:
        return LeaseHeld(
            f"run dir {self.location.rsplit('/', 1)[0]} is in use by pid {holder.get('pid')} on "
            f"{holder.get('host')} (its lease is fresh): another sweep runs into it; wait for it to end "
            "or use another name"
        )

    # ---------------------------------------------------------------- keep

    def refresh(self) -> None:
        """One refresh (If-Match on our last ETag). LeaseLost when someone else holds it now or it
        is gone; other errors (S3 away, timeouts) propagate for the caller to retry."""
        assert self.etag is not None
        try:
            self.etag = self._put(IfMatch=self.etag)
        except Exception as exc:
            if _precondition_failed(exc) or _not_found(exc):
                holder = self._read_holder()
                who = (
                    f"pid {holder.get('pid')} on {holder.get('host')}"
                    if holder
                    else "nobody (it was deleted)"
                )
                raise LeaseLost(
                    f"run dir {self.location.rsplit('/', 1)[0]}: lost its lease to {who}; this driver "
                    "stops, the other one owns the run dir now"
                ) from None
            raise

    def release(self) -> None:
        """Delete the lease if it is still ours (If-Match), never someone else's."""
        if self.etag is None:
            return
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=self.etag)
        except Exception as exc:
            if not (_precondition_failed(exc) or _not_found(exc)):
                log.warning(
                    "run dir lease %s not released (%s): it expires in %.0f s", self.location, exc, self.ttl
                )
        self.etag = None


class Heartbeat(threading.Thread):
    """Refreshes `lease` every ttl/3 s; retries transient errors with backoff. When the lease is
    lost (LeaseLost, or no successful refresh for ttl s) it records why and calls `on_lost` once."""

    def __init__(self, lease: S3Lease, on_lost: Callable[[str], None]) -> None:
        super().__init__(name="embedtune-lease", daemon=True)
        self.lease = lease
        self.on_lost = on_lost
        self.stop = threading.Event()
        self.lost: str | None = None
        self.refreshes = 0
        self.failures = 0  # refreshes that failed and were retried, all told
        self.retries = 0  # failures since the last success (the backoff's step)

    def run(self) -> None:
        period = self.lease.ttl / 3
        last_ok = time.monotonic()
        delay = period
        while not self.stop.wait(delay):
            try:
                self.lease.refresh()
            except LeaseLost as exc:
                self._lose(str(exc))
                return
            except Exception as exc:  # noqa: BLE001 - S3 away, a timeout: retry until the ttl is spent
                self.retries += 1
                self.failures += 1
                since = time.monotonic() - last_ok
                if since >= self.lease.ttl:
                    self._lose(
                        f"run dir {self.lease.location.rsplit('/', 1)[0]}: its lease expired (not refreshed "
                        f"for {since:.0f} s; last error: {str(exc).splitlines()[0][:160]}); this driver stops"
                    )
                    return
                # backoff: 0.5 s, 1 s, 2 s, ... never past the ttl
                delay = min(0.5 * 2 ** min(self.retries - 1, 6), max(0.1, self.lease.ttl - since))
                log.warning("run dir lease refresh failed (%s): retrying in %.1f s", exc, delay)
                continue
            self.refreshes += 1
            self.retries = 0
            last_ok = time.monotonic()
            delay = period

    def _lose(self, reason: str) -> None:
        self.lost = reason
        log.error(reason)
        self.on_lost(reason)


@contextlib.contextmanager
def hold(
    location: str,
    owner: dict[str, Any],
    ttl: float = TTL_S,
    on_lost: Callable[[str], None] = _interrupt_main,
) -> Iterator[Heartbeat]:
    """Hold the lease at `location` while the block runs (see the module docstring). A lease lost
    on the way ends the block with LeaseLost (one line), whatever the block raised on its way out."""
    lease = S3Lease(location, owner, ttl)
    lease.acquire()
    beat = Heartbeat(lease, on_lost)
    beat.start()
    try:
        yield beat
    except BaseException as exc:
        if beat.lost:
            raise LeaseLost(beat.lost) from exc
        raise
    finally:
        beat.stop.set()
        beat.join(timeout=20)
        if not beat.lost:
            lease.release()
    if beat.lost:  # the block ended normally after the loss: still not a success
        raise LeaseLost(beat.lost)
