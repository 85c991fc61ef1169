"""Shipping finished escalation-log segments to shared storage, one new object each.

An object store has no append, so a replica keeps writing whole lines to a local segment
(in the kernel before the response, as ever) and ships a segment once it is finished: when
it rotates by size, or at the latest ``ship_every_s`` after it was opened (the shipper
rotates it). A segment becomes one object under its own name, created only if absent, so
an object is never rewritten; the local file is removed only after the object exists. A
live writer holds an advisory lock on its open segment, so any other segment in the folder
is finished: a writer that restarts (or another replica on the same node) ships what a
crashed writer left behind. A failed upload is counted and tried again with backoff; the
segment stays on local disk meanwhile, so an outage of the store loses nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import logging
import os
import random
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from serving.contracts.records import SEGMENT_GLOB, EscalationLogWriter, fsync_directory
from serving.contracts.storage import Store

logger = logging.getLogger("ray.serve")
MAX_BACKOFF_S = 60.0


class ShipMetrics(Protocol):
    def inc(self, name: str, value: float = 1.0, **tags: str) -> None: ...

    def set(self, name: str, value: float, **tags: str) -> None: ...


class ShipConflict(RuntimeError):
    """An object with the segment's name exists with other content."""


class SegmentShipper:
    def __init__(
        self,
        directory: Path,
        store: Store,
        *,
        ship_every_s: float,
        writer: Callable[[], EscalationLogWriter | None] = lambda: None,
        metrics: ShipMetrics | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.store = store
        self.ship_every_s = ship_every_s
        self._writer = writer
        self._metrics = metrics
        self._lock = threading.Lock()  # one shipping pass at a time in this process
        self.shipped = 0
        self.failures = 0

    def ship_once(self) -> int:
        """Rotate an open segment that is old enough, then ship every finished segment;
        returns how many were shipped. A segment that fails stays and the others still
        ship; the first failure is raised at the end (so it is counted and backed off)."""
        errors: list[Exception] = []
        writer = self._writer()
        if writer is not None and writer.segment_age() >= self.ship_every_s:
            try:
                writer.rotate()
            except OSError as exc:  # a full disk: shipping what exists frees space
                errors.append(exc)
        shipped = 0
        with self._lock:
            for path in sorted(self.directory.glob(SEGMENT_GLOB)):
                try:
                    shipped += self._ship(path)
                except Exception as exc:
                    errors.append(exc)
            self.shipped += shipped
            if self._metrics is not None:
                if shipped:
                    self._metrics.inc("protege_log_segments_shipped", shipped)
                self._metrics.set("protege_log_unshipped_bytes", self.unshipped_bytes())
        if errors:
            raise errors[0]
        return shipped

    def unshipped_bytes(self) -> int:
        total = 0
        for path in self.directory.glob(SEGMENT_GLOB):
            with contextlib.suppress(FileNotFoundError):
                total += path.stat().st_size
        return total

    def _ship(self, path: Path) -> bool:
        """Ship one segment if it is finished (no writer holds it) and not empty."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return False  # shipped meanwhile by another replica's shipper
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # a live writer's open segment
            if not path.exists():
                return False  # removed after we opened it: shipped by another shipper
            data = _read_all(fd)
            if not data:
                return False  # a writer that has not written yet (or never will)
            if not self.store.create(path.name, data) and not self.store.matches(path.name, data):
                raise ShipConflict(f"{self.store.uri}/{path.name} exists with other content")
            path.unlink()
            fsync_directory(self.directory)
            return True
        finally:
            os.close(fd)

    def run(self, stop: threading.Event) -> None:
        """Ship until ``stop`` is set, backing off (with jitter) while the store fails."""
        tick = min(5.0, self.ship_every_s)
        wait = tick
        while not stop.wait(wait):
            try:
                self.ship_once()
                wait = tick
            except Exception as exc:
                self.failures += 1
                if self._metrics is not None:
                    self._metrics.inc("protege_log_ship_errors")
                wait = min(MAX_BACKOFF_S, max(wait, 0.5) * 2) * random.uniform(0.8, 1.2)
                logger.warning("log shipping failed, again in %.0f s: %s", wait, exc)


def _read_all(fd: int) -> bytes:
    chunks = []
    while block := os.read(fd, 1 << 20):
        chunks.append(block)
    return b"".join(chunks)


def fetch_shipped(store: Store, local: Path) -> Path:
    """Download the shipped segments that ``local`` lacks; returns ``local``, a folder the
    log reader reads like any other (shipped segments are finished and never change)."""
    local.mkdir(parents=True, exist_ok=True)
    for key in store.list(""):
        if "/" not in key and fnmatch.fnmatch(key, SEGMENT_GLOB) and not (local / key).exists():
            store.download(key, local / key)
    return local
