"""One distillation run at a time, across machines that share the registry: a lease with
an owner, a host and an expiry, renewed while the run lives.

The lease is one small JSON object beside the registry (a file, or an object in the same
store). Taking, renewing and releasing it are compare-and-set updates of that object
(``Store.update``: an advisory lock around read and replace locally, ``If-Match`` on an
object store), so two runs started at once on different machines cannot both take it. A
lease is taken over only a full TTL after its expiry (its holder stopped renewing: crashed
or cut off; the grace covers clocks that disagree by up to a TTL), or at once when its
holder is a dead process on this same host. A run whose lease was lost is told so before it
publishes anything.
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
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from serving.storage import Store

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

    def describe(self) -> str:
        left = self.expires_at - time.time()
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
    ) -> None:
        self.store, self.key = store, key
        self.where = f"{store.uri}/{key}"
        self.ttl_s = ttl_s
        self.host = host or socket.gethostname()
        self.owner = uuid.uuid4().hex
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _mine(self) -> bytes:
        holder = Holder(self.owner, self.host, os.getpid(), time.time() + self.ttl_s)
        return json.dumps(asdict(holder)).encode()

    def _free(self, holder: Holder | None) -> bool:
        if holder is None or holder.owner == self.owner:
            return True
        if holder.expires_at + self.ttl_s < time.time():
            return True
        return holder.host == self.host and not _alive(holder.pid)

    def acquire(self) -> None:
        def take(data: bytes | None) -> bytes:
            holder = _parse(data)
            if not self._free(holder):
                assert holder is not None
                raise LockedError(
                    f"another distillation run holds {self.where}: {holder.describe()}"
                )
            return self._mine()

        self.store.update(self.key, take)
        self._renewer = threading.Thread(target=self._renew_loop, daemon=True, name="lease")
        self._renewer.start()

    def renew(self) -> bool:
        """Extend the lease if it is still ours; False (and ``lost`` set) if it is not."""

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
        """Renew every third of the TTL. A store that fails is tried again next time; once
        the lease has run out unrenewed, it counts as lost (another run may take it)."""
        renewed_at = time.time()
        while not self._stop.wait(self.ttl_s / 3):
            try:
                if not self.renew():
                    return
                renewed_at = time.time()
            except Exception as exc:
                logger.warning("lease %s not renewed, trying again: %s", self.where, exc)
                if time.time() > renewed_at + self.ttl_s:
                    self.lost.set()
                    return

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
