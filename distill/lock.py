"""One distillation run at a time, across machines that share the registry: a lease with
an owner, a host and an expiry, renewed while the run lives.

The lease is one small JSON object beside the registry (a file, or an object in the same
store). Taking, renewing and releasing it are compare-and-set updates of that object
(``Store.update``: an advisory lock around read and replace locally, ``If-Match`` on an
object store), so two runs started at once on different machines cannot both take it. A
lease is taken over only a full TTL after its expiry (its holder stopped renewing: crashed
or cut off; the grace covers clocks that disagree by up to a TTL), or at once when its
holder is a dead process on this same host.

Renewal (every quarter of the TTL) never gives up on a store error: it tries again every
tenth of the TTL, so an outage of up to 1.65 TTL (expiry and grace, less a renewal interval
and a retry; less any clock skew) leaves the lease with its run. The lease is lost only
when another run took it over (or took it and released it); a lease taken over never
returns to its old owner, so ``renew()`` answers from the store exactly, and the run asks
it just before it publishes and just before it promotes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

from serving.contracts.storage import Store

logger = logging.getLogger(__name__)
DEFAULT_TTL_S = 60.0
LEASE_KEY = "distill.lock"


class LockedError(RuntimeError):
    """Another run holds the lease."""


class _Lost(Exception):
    """Raised inside an update: the lease is no longer ours."""


@dataclass(frozen=True)
class Holder:
    owner: str
    host: str
    pid: int
    expires_at: float  # Unix seconds

    def describe(self, now: float) -> str:
        left = self.expires_at - now
        return f"{self.owner} (pid {self.pid} on {self.host}, lease for {left:.0f} s more)"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _parse(data: bytes | None) -> Holder | None:
    if not data or not data.strip():
        return None  # free (never taken, or released)
    try:
        return Holder(**json.loads(data))
    except (ValueError, TypeError):
        return None  # a torn record: its writer died mid-write, nobody holds it


class Lease:
    def __init__(
        self,
        store: Store,
        key: str = LEASE_KEY,
        ttl_s: float = DEFAULT_TTL_S,
        host: str | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``clock`` gives the Unix seconds that expiries are written and read in (every
        run sharing the lease must agree on it to within a TTL: the grace); a test passes
        its own to move time."""
        self.store, self.key = store, key
        self.where = f"{store.uri}/{key}"
        self.ttl_s = ttl_s
        self.host = host or socket.gethostname()
        self.owner = uuid.uuid4().hex
        self.clock = clock
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _mine(self) -> bytes:
        holder = Holder(self.owner, self.host, os.getpid(), self.clock() + self.ttl_s)
        return json.dumps(asdict(holder)).encode()

    def _free(self, holder: Holder | None) -> bool:
        if holder is None or holder.owner == self.owner:
            return True
        if holder.expires_at + self.ttl_s < self.clock():
            return True
        return holder.host == self.host and not _alive(holder.pid)

    def acquire(self) -> None:
        def take(data: bytes | None) -> bytes:
            holder = _parse(data)
            if not self._free(holder):
                assert holder is not None
                raise LockedError(
                    f"another distillation run holds {self.where}: {holder.describe(self.clock())}"
                )
            return self._mine()

        self.store.update(self.key, take)
        self._renewer = threading.Thread(target=self._renew_loop, daemon=True, name="lease")
        self._renewer.start()

    def renew(self) -> bool:
        """Whether this run still holds the lease, answered by the store: True when the
        record still names this run and was just extended (compare-and-set, so nobody took
        it in between); False, for good, once another run holds it or it was released (a
        lease taken over never comes back, so ``lost`` is set and stays set). A store that
        cannot be reached raises its error: the caller cannot know, so it must not publish.
        """
        if self.lost.is_set():
            return False

        def extend(data: bytes | None) -> bytes:
            holder = _parse(data)
            if holder is None or holder.owner != self.owner:
                raise _Lost
            return self._mine()

        try:
            self.store.update(self.key, extend)
        except _Lost:
            self.lost.set()
            return False
        return True

    def _renew_loop(self) -> None:
        """Renew every quarter of the TTL until released or taken over. A store error never
        ends it: it tries again every tenth of the TTL for as long as the run lives (the
        store decides, once it answers, whether the lease is still this run's)."""
        every, retry = self.ttl_s / 4, self.ttl_s / 10
        wait, renewed_at, warned_at = every, time.monotonic(), 0.0
        while not self._stop.wait(wait):
            try:
                if not self.renew():
                    logger.error(
                        "lease %s was taken over by another run: this run publishes and "
                        "promotes nothing",
                        self.where,
                    )
                    return
                wait, renewed_at = every, time.monotonic()
            except Exception as exc:  # any store error (botocore's are not all OSError)
                wait = retry
                unrenewed = time.monotonic() - renewed_at
                if time.monotonic() - warned_at >= self.ttl_s:  # once a TTL, not every try
                    warned_at = time.monotonic()
                    past = " (past its expiry: another run may take it over)"
                    logger.warning(
                        "lease %s not renewed for %.0f s%s, trying again: %s",
                        self.where,
                        unrenewed,
                        past if unrenewed > self.ttl_s else "",
                        exc,
                    )

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=30)

        def free(data: bytes | None) -> bytes | None:
            holder = _parse(data)
            return b"" if holder is not None and holder.owner == self.owner else None

        for attempt in range(3):
            try:
                self.store.update(self.key, free)
                return
            except Exception as exc:  # the lease runs out by itself: never fail the run here
                logger.warning("lease %s not released (try %d): %s", self.where, attempt + 1, exc)
                if attempt < 2:
                    time.sleep(2**attempt)


@contextlib.contextmanager
def run_lock(
    store: Store, key: str = LEASE_KEY, ttl_s: float = DEFAULT_TTL_S, host: str | None = None
) -> Iterator[Lease]:
    """Hold the lease for the duration of a run."""
    lease = Lease(store, key, ttl_s, host)
    lease.acquire()
    try:
        yield lease
    finally:
        lease.release()
