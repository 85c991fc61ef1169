"""The replica's side of the escalation log: writes off the event loop, and never a failed
request because of the disk. One sink per cascade, each in its own folder; it writes
records of any kind (:data:`serving.contracts.records.LogRecord`).

An unusable folder (missing, unwritable, full) is counted, alerted on and tried again every
few seconds; serving goes on, and the response says its records were not logged. With
``log.ship_to``, finished segments are shipped to shared storage in the background (see
``serving.contracts.log_shipping``); a store that cannot be reached at start-up stops the replica
with an error naming it, a store that goes away later only delays shipping.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Sequence
from typing import Protocol

from serving.config_sections import LogConfig
from serving.contracts.log_shipping import SegmentShipper
from serving.contracts.records import EscalationLogWriter, LogRecord
from serving.contracts.storage import open_store

logger = logging.getLogger("ray.serve")
RETRY_S = 5.0  # how often an unusable log folder is tried again


class LogMetrics(Protocol):
    def inc(self, name: str, value: float = 1.0, **tags: str) -> None: ...

    def set(self, name: str, value: float, **tags: str) -> None: ...

    def log_written(self, records: int, size: int, rotations: int) -> None: ...


def _close_quietly(writer: EscalationLogWriter) -> None:
    with contextlib.suppress(Exception):
        writer.close()


class LogSink:
    def __init__(
        self,
        config: LogConfig,
        writer_id: str,
        metrics: LogMetrics,
        s3_endpoint: str | None = None,
    ) -> None:
        self.config = config
        self.writer_id = writer_id
        self.metrics = metrics
        self.writer: EscalationLogWriter | None = None
        self._retry_at = 0.0
        self._opening = asyncio.Lock()
        self.shipper: SegmentShipper | None = None
        self._stop_shipping = threading.Event()
        if config.ship_to:
            # one try per request, 10 s at most: the shipper's own loop retries, with
            # backoff, and counts
            store = open_store(config.ship_to, s3_endpoint, attempts=1, request_timeout_s=10)
            store.check()  # unreachable at start-up: a clear error naming the URI
            store.check_conditional_writes()  # segments are created only if absent
            self.shipper = SegmentShipper(
                config.dir,
                store,
                ship_every_s=config.ship_every_s,
                writer=lambda: self.writer,
                metrics=metrics,
            )
        self._open()
        if self.shipper is not None:
            threading.Thread(
                target=self.shipper.run, args=(self._stop_shipping,), daemon=True, name="ship"
            ).start()

    def _open(self) -> None:
        try:
            self.writer = EscalationLogWriter(
                self.config.dir,
                writer_id=self.writer_id,
                max_segment_bytes=self.config.max_segment_bytes,
                fsync_interval_s=self.config.fsync_interval_s,
            )
        except OSError as exc:
            self._retry_at = time.monotonic() + RETRY_S
            self.metrics.inc("protege_log_write_errors")
            logger.error("escalation log folder unusable, serving on without it: %s", exc)

    async def write(self, records: Sequence[LogRecord]) -> bool:
        """Append ``records`` (flushed to the kernel) off the event loop; False when they
        could not be written (counted and alerted; the caller answers anyway)."""
        if not records:
            return True
        if self.writer is None and time.monotonic() >= self._retry_at:
            async with self._opening:  # one reopen at a time (it fsyncs: not on the loop)
                if self.writer is None and time.monotonic() >= self._retry_at:
                    await asyncio.to_thread(self._open)
        writer = self.writer
        if writer is None:
            self.metrics.inc("protege_log_write_errors")
            return False
        try:
            size, rotations = await asyncio.to_thread(writer.append, records)
        except Exception:
            self.metrics.inc("protege_log_write_errors")
            logger.exception("escalation log write failed for %d records", len(records))
            if self.writer is writer:
                self.writer, self._retry_at = None, time.monotonic() + RETRY_S
            await asyncio.to_thread(_close_quietly, writer)  # it fsyncs: not on the loop
            return False
        self.metrics.log_written(len(records), size, rotations)
        return True

    def close(self) -> None:
        """Close the writer and ship what it left (what cannot be shipped now stays on disk
        and is shipped by the next writer in this folder)."""
        self._stop_shipping.set()
        if self.writer is not None:
            self.writer.close()
        if self.shipper is not None:
            try:
                self.shipper.ship_once()
            except Exception as exc:
                logger.warning("segments left unshipped at shutdown: %s", exc)
