"""One distillation run at a time, across machines that share the registry's folder: a
lease with an owner, a host and an expiry, renewed while the run lives.

The lease is a small JSON record in one file next to the registry. Taking, renewing and
releasing it are read-check-write steps on that file's own handle under an advisory lock
(``fcntl.lockf``, held for microseconds; on NFS the lock also makes the client re-read the
file), with a thread lock beside it for the renewal thread. So two runs started at once on
different machines cannot both take it. A lease is taken over only a full TTL after its
expiry (its holder stopped renewing: crashed or cut off; the grace covers clocks that
disagree by up to a TTL), or at once when its holder is a dead process on this same host.
A run whose lease was lost is told so before it publishes anything.
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
from typing import IO

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


_PROCESS_LOCKS: dict[Path, threading.Lock] = {}
_PROCESS_LOCKS_GUARD = threading.Lock()


def _process_lock(path: Path) -> threading.Lock:
    """One lock per lease file in this process: fcntl locks belong to the process, so they
    neither exclude its threads nor survive another handle of the file being closed."""
    with _PROCESS_LOCKS_GUARD:
        return _PROCESS_LOCKS.setdefault(path.resolve(), threading.Lock())


class Lease:
    def __init__(self, path: Path, ttl_s: float = DEFAULT_TTL_S, host: str | None = None) -> None:
        self.path = Path(path)
        self.ttl_s = ttl_s
        self.host = host or socket.gethostname()
        self.owner = uuid.uuid4().hex
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread_lock = _process_lock(self.path)  # lockf does not exclude threads
        self._renewer: threading.Thread | None = None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[IO[str]]:
        """The lease file's handle, locked against every other holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._thread_lock, open(self.path, "a+") as handle:
            fcntl.lockf(handle, fcntl.LOCK_EX)
            try:
                yield handle
            finally:
                fcntl.lockf(handle, fcntl.LOCK_UN)

    @staticmethod
    def _read(handle: IO[str]) -> Holder | None:
        handle.seek(0)
        text = handle.read()
        if not text.strip():
            return None  # free (never taken, or released)
        try:
            return Holder(**json.loads(text))
        except (ValueError, TypeError):
            return None  # a torn record: its writer died mid-write, nobody holds it

    def _write(self, handle: IO[str], holder: Holder | None) -> None:
        handle.seek(0)
        handle.truncate()
        if holder is not None:
            handle.write(json.dumps(asdict(holder)))
        handle.flush()
        os.fsync(handle.fileno())

    def _mine(self) -> Holder:
        return Holder(self.owner, self.host, os.getpid(), time.time() + self.ttl_s)

    def _free(self, holder: Holder | None) -> bool:
        if holder is None or holder.owner == self.owner:
            return True
        if holder.expires_at + self.ttl_s < time.time():
            return True
        return holder.host == self.host and not _alive(holder.pid)

    def acquire(self) -> None:
        with self._locked() as handle:
            holder = self._read(handle)
            if not self._free(holder):
                assert holder is not None
                raise LockedError(
                    f"another distillation run holds {self.path}: {holder.describe()}"
                )
            self._write(handle, self._mine())
        self._renewer = threading.Thread(target=self._renew_loop, daemon=True, name="lease")
        self._renewer.start()

    def renew(self) -> bool:
        """Extend the lease if it is still ours; False (and ``lost`` set) if it is not."""
        with self._locked() as handle:
            holder = self._read(handle)
            if holder is None or holder.owner != self.owner:
                self.lost.set()
                return False
            self._write(handle, self._mine())
            return True

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            with contextlib.suppress(OSError):
                if not self.renew():
                    return

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=30)
        with self._locked() as handle:
            holder = self._read(handle)
            if holder is not None and holder.owner == self.owner:
                self._write(handle, None)


@contextlib.contextmanager
def run_lock(path: Path, ttl_s: float = DEFAULT_TTL_S, host: str | None = None) -> Iterator[Lease]:
    """Hold the lease for the duration of a run."""
    lease = Lease(path, ttl_s, host)
    lease.acquire()
    try:
        yield lease
    finally:
        lease.release()
