"""One distillation run at a time, across machines that share the registry's folder: a
lease with an owner, a host and an expiry, renewed while the run lives.

The lease is a small JSON file next to the registry. Taking, renewing and releasing it are
read-check-write steps done under an advisory file lock (``fcntl.lockf``, held for
microseconds), so two runs started at once on different machines cannot both take it. A
lease is taken over only after its expiry (its holder stopped renewing: crashed or cut
off), or at once when its holder is a dead process on this same host. A run whose lease
was lost (it could not renew in time) is told so before it promotes anything.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

DEFAULT_TTL_S = 60.0


class LockedError(RuntimeError):
    """Another run holds the lease."""


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


class Lease:
    def __init__(self, path: Path, ttl_s: float = DEFAULT_TTL_S, host: str | None = None) -> None:
        self.path = Path(path)
        self.ttl_s = ttl_s
        self.host = host or socket.gethostname()
        self.owner = uuid.uuid4().hex
        self.lost = threading.Event()
        self._stop = threading.Event()

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".guard"), "a") as handle:
            fcntl.lockf(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.lockf(handle, fcntl.LOCK_UN)

    def _read(self) -> Holder | None:
        try:
            return Holder(**json.loads(self.path.read_text()))
        except (OSError, ValueError, TypeError):
            return None  # none, or unreadable: nobody holds it

    def _write(self) -> None:
        holder = Holder(self.owner, self.host, os.getpid(), time.time() + self.ttl_s)
        tmp = self.path.with_name(f".{self.path.name}.{self.owner}.tmp")
        tmp.write_text(json.dumps(asdict(holder)))
        os.replace(tmp, self.path)

    def _free(self, holder: Holder | None) -> bool:
        if holder is None or holder.owner == self.owner or holder.expires_at < time.time():
            return True
        return holder.host == self.host and not _alive(holder.pid)

    def acquire(self) -> None:
        with self._guard():
            holder = self._read()
            if not self._free(holder):
                assert holder is not None
                raise LockedError(
                    f"another distillation run holds {self.path}: {holder.describe()}"
                )
            self._write()
        threading.Thread(target=self._renew_loop, daemon=True, name="lease-renewal").start()

    def renew(self) -> bool:
        """Extend the lease if it is still ours; False (and ``lost`` set) if it is not."""
        with self._guard():
            holder = self._read()
            if holder is None or holder.owner != self.owner:
                self.lost.set()
                return False
            self._write()
            return True

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            with contextlib.suppress(OSError):
                if not self.renew():
                    return

    def release(self) -> None:
        self._stop.set()
        with self._guard():
            holder = self._read()
            if holder is not None and holder.owner == self.owner:
                self.path.unlink(missing_ok=True)


@contextlib.contextmanager
def run_lock(path: Path, ttl_s: float = DEFAULT_TTL_S, host: str | None = None) -> Iterator[Lease]:
    """Hold the lease for the duration of a run."""
    lease = Lease(path, ttl_s, host)
    lease.acquire()
    try:
        yield lease
    finally:
        lease.release()
