"""The escalation log: durable, append-only JSON-lines segments, and a reader for them.

Every escalated or audited input becomes one :class:`EscalationRecord` that carries the
probability with which its input was logged (1 for an escalation, the audit fraction for
an audited confident input), so the log is a weighted sample of all served traffic. An
input chosen for logging is logged even when the teacher failed or was not asked (its
teacher fields are then empty and the distillation job labels it offline): skipping it
would make the recorded probabilities false. Each writer (one
per replica) owns its own segment files, so lines never interleave. A record is written
and flushed to the kernel at once (it survives a crash of the process) and fsynced on a
short interval and on close (it survives a crash of the machine). A segment rotates when
it would pass ``max_segment_bytes``. A torn or corrupt line (a crash mid-write) is
skipped and counted on read, never fatal.

Schema versions: 1 had no inclusion probability (it may train, never evaluate); 2 added it
and ``teacher_status``; 3 adds ``request_key`` (the server's key for the request, shared by
all its records: the bootstrap resamples requests, not inputs) and the teacher status
``cancelled``; 4 adds ``kind``: ``classify`` (this module's :class:`EscalationRecord`,
otherwise unchanged) or ``generate``
(:class:`~serving.contracts.generation_records.GenerationRecord`). A line without ``kind``
is a classification record. Readers read every version in :data:`READABLE_VERSIONS` and both
kinds from one log; a generation record's top-k log-probabilities (the heavy field) are
read only when asked (``with_top_k=True``, for training).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Container, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from serving.contracts.generation_records import GenerationRecord
from serving.contracts.record_fields import (
    KINDS,
    READABLE_VERSIONS,
    SCHEMA_VERSION,
    Kind,
    Reason,
    TeacherStatus,
    nan_from_null,
)

__all__ = [
    "KINDS",
    "READABLE_VERSIONS",
    "SCHEMA_VERSION",
    "EscalationLogWriter",
    "EscalationRecord",
    "GenerationRecord",
    "Kind",
    "LogRecord",
    "ReadStats",
    "Reason",
    "TeacherStatus",
    "iter_records",
    "iter_segment",
    "list_segments",
    "read_from",
]

SEGMENT_GLOB = "escalations-*.jsonl"


class EscalationRecord(BaseModel):
    """One escalated or audited input with both models' full distributions."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: int = SCHEMA_VERSION
    kind: Literal["classify"] = "classify"
    record_id: str = Field(description="Made by the server, unique per logged input")
    request_id: str = Field(description="The request's id (the client's x-request-id if sent)")
    request_key: str | None = Field(
        default=None,
        description="Made by the server, one per request and shared by all its records "
        "(escalations and audits): the unit the gate's bootstrap resamples. Never the "
        "client's x-request-id, which a client may reuse (None only before version 3)",
    )
    timestamp: float = Field(description="Unix seconds when the record was made")
    text: str
    reason: Reason
    inclusion_probability: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Probability with which this input was logged: 1 for an escalation, the "
        "audit fraction for an audited confident input (None only in version 1 records)",
    )
    labels: list[str] = Field(description="Label names, the order of both vectors")
    student_version: str
    student_probs: list[float]
    scorer: str
    confidence: float
    threshold: float
    teacher_status: TeacherStatus = Field(
        default="answered",
        description="'answered', or why the teacher fields are empty (labelled offline)",
    )
    teacher_version: str | None = None
    teacher_probs: list[float] | None = None
    teacher_label: str | None = None
    gold_label: str | None = None

    @field_validator("confidence", mode="before")
    @classmethod
    def _nan_confidence(cls, value: object) -> object:
        return nan_from_null(value)

    @field_validator("student_probs", "teacher_probs", mode="before")
    @classmethod
    def _nan_probs(cls, value: object) -> object:
        if isinstance(value, list):
            return [float("nan") if v is None else v for v in value]
        return value

    @model_validator(mode="after")
    def _consistent(self) -> EscalationRecord:
        answered = self.teacher_probs is not None
        if answered != (self.teacher_status == "answered"):
            raise ValueError(
                f"teacher_status {self.teacher_status!r} with "
                f"{'a' if answered else 'no'} teacher distribution"
            )
        if self.schema_version >= 2 and self.inclusion_probability is None:
            raise ValueError("version 2 records need inclusion_probability")
        if self.schema_version >= 3 and not self.request_key:
            raise ValueError("version 3 records need request_key")
        if self.schema_version < 3 and self.teacher_status == "cancelled":
            raise ValueError(
                f"teacher_status 'cancelled' in a version {self.schema_version} record"
            )
        return self

    @property
    def evaluable(self) -> bool:
        """Whether the record can weigh in an estimate over the whole traffic."""
        return self.inclusion_probability is not None

    @property
    def split_text(self) -> str:
        """What the split hash reads: the input text."""
        return self.text


LogRecord = EscalationRecord | GenerationRecord
"""A record of either kind, as the reader yields them (dispatch on ``kind``)."""


@dataclass
class _Segment:
    path: Path
    fd: int
    size: int = 0
    opened_at: float = field(default_factory=time.monotonic)


class EscalationLogWriter:
    """Appends records to this writer's own rotating segment files (thread-safe).

    Each append is one or more ``os.write`` calls of whole lines on the segment's file
    descriptor (no user-space buffer: what ``append`` returned from is in the kernel). A
    write that fails part-way (a full disk) is truncated back to the last whole line, so a
    failed append leaves no partial record behind it."""

    def __init__(
        self,
        directory: Path,
        *,
        writer_id: str | None = None,
        max_segment_bytes: int = 64 * 1024 * 1024,
        fsync_interval_s: float = 1.0,
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        safe_id = "".join(c if c.isalnum() else "_" for c in (writer_id or uuid.uuid4().hex[:8]))
        self._prefix = f"escalations-{int(time.time() * 1000):013d}-{safe_id}-{os.getpid()}"
        self._max_bytes = max_segment_bytes
        self._lock = threading.Lock()
        self._sequence = 0
        self._segment = self._open_segment()
        self._dirty = False
        self._closed = threading.Event()
        self.records_written = 0
        self.bytes_written = 0
        self.rotations = 0
        self._syncer = threading.Thread(
            target=self._sync_loop, args=(fsync_interval_s,), daemon=True, name="log-fsync"
        )
        self._syncer.start()

    @property
    def current_segment(self) -> Path:
        return self._segment.path

    def append(self, records: Sequence[LogRecord]) -> tuple[int, int]:
        """Write records as whole lines, in the kernel before returning; returns the bytes
        written and the rotations made (0 or 1) by this call."""
        if not records:
            return 0, 0
        payload = "".join(r.model_dump_json() + "\n" for r in records).encode()
        retired = None
        with self._lock:
            if self._closed.is_set():
                raise RuntimeError("escalation log writer is closed")
            if self._segment.size > 0 and self._segment.size + len(payload) > self._max_bytes:
                # the new segment opens first: if that fails, the old one stays in use
                retired, self._segment = self._segment, self._open_segment(sync_directory=False)
                self.rotations += 1
            _write_whole(self._segment, payload)
            self._dirty = True
            self.records_written += len(records)
            self.bytes_written += len(payload)
        if retired is not None:  # outside the lock: a slow disk holds up only this call
            self._retire(retired)
        return len(payload), int(retired is not None)

    def segment_age(self) -> float:
        """Seconds since the open segment's first write (0 while it is empty)."""
        with self._lock:
            segment = self._segment
            return time.monotonic() - segment.opened_at if segment.size else 0.0

    def rotate(self) -> bool:
        """Finish the open segment now if it holds anything (so it can be shipped)."""
        with self._lock:
            if self._closed.is_set() or self._segment.size == 0:
                return False
            retired, self._segment = self._segment, self._open_segment(sync_directory=False)
            self.rotations += 1
        self._retire(retired)
        return True

    def sync(self) -> None:
        """fsync the open segment if anything was written since the last sync.

        The fsync runs on a duplicate of the file descriptor, outside the append lock, so a
        slow disk never holds up an append (and so a request)."""
        with self._lock:
            if not self._dirty or self._closed.is_set():
                return
            fd = os.dup(self._segment.fd)
            self._dirty = False
        try:
            os.fsync(fd)
        except OSError:
            with self._lock:
                self._dirty = True  # try again next interval
            raise
        finally:
            os.close(fd)

    def close(self) -> None:
        """fsync and close; idempotent."""
        with self._lock:
            if self._closed.is_set():
                return
            self._closed.set()
            try:
                os.fsync(self._segment.fd)
            finally:
                os.close(self._segment.fd)
        self._syncer.join(timeout=5)

    def _open_segment(self, sync_directory: bool = True) -> _Segment:
        self._sequence += 1
        path = self.directory / f"{self._prefix}-{self._sequence:06d}.jsonl"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        # held while the segment is open: a shipper ships only segments nobody holds
        fcntl.flock(fd, fcntl.LOCK_EX)
        if sync_directory:
            fsync_directory(self.directory)  # the new name survives a machine crash
        return _Segment(path, fd, os.fstat(fd).st_size)

    def _retire(self, segment: _Segment) -> None:
        """A rotated-out segment: its data and the new segment's name reach the disk."""
        try:
            os.fsync(segment.fd)
        finally:
            os.close(segment.fd)
        fsync_directory(self.directory)

    def _sync_loop(self, interval: float) -> None:
        while not self._closed.wait(interval):
            with contextlib.suppress(OSError, ValueError):  # closed during shutdown
                self.sync()


def _write_whole(segment: _Segment, payload: bytes) -> None:
    """All of ``payload`` at the segment's end, or nothing (a partial write is cut off)."""
    if segment.size == 0:
        segment.opened_at = time.monotonic()  # its age counts from the first record
    done = 0
    try:
        while done < len(payload):
            done += os.write(segment.fd, payload[done:])
    except OSError:
        if done:
            with contextlib.suppress(OSError):
                os.ftruncate(segment.fd, segment.size)
        raise
    segment.size += len(payload)


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class ReadStats:
    """What a read found besides the records it returned."""

    segments: int = 0
    records: int = 0
    skipped_lines: int = 0
    skipped_reasons: list[str] = field(default_factory=list)
    kinds: Counter[str] = field(default_factory=Counter)  # records read, per kind


def list_segments(directory: Path) -> list[Path]:
    """Segment files in write order (names start with the writer's start time)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"escalation log folder {directory} does not exist")
    return sorted(directory.glob(SEGMENT_GLOB))


def iter_segment(
    path: Path, stats: ReadStats | None = None, *, with_top_k: bool = False
) -> Iterator[LogRecord]:
    """Records of one segment; torn, corrupt or foreign-schema lines are skipped and counted."""
    yield from read_from(path, 0, stats, with_top_k=with_top_k)[0]


def read_from(
    path: Path,
    offset: int,
    stats: ReadStats | None = None,
    end: int | None = None,
    *,
    with_top_k: bool = False,
    top_k_for: Container[str] | None = None,
) -> tuple[list[LogRecord], int]:
    """Whole lines of a segment from byte ``offset`` (to ``end``, default the file's end):
    (records of both kinds, offset after the last complete line). A torn last line is left
    unconsumed (its writer is gone: a restarted writer opens a new segment), so it is
    counted each time and never half-read.

    A generation record's top-k log-probabilities are left out (never validated nor held)
    unless ``with_top_k``, or its record id is in ``top_k_for``: evaluation reads lean,
    training asks for them."""
    stats = stats if stats is not None else ReadStats()
    stats.segments += 1
    records: list[LogRecord] = []
    with open(path, "rb") as handle:
        handle.seek(offset)
        data = handle.read(-1 if end is None else max(0, end - offset))
    whole = data.rfind(b"\n") + 1
    for number, raw in enumerate(data[:whole].splitlines(keepends=True), start=1):
        record, problem = _parse(raw, with_top_k, top_k_for)
        if record is not None:
            records.append(record)
            stats.records += 1
            stats.kinds[record.kind] += 1
            continue
        stats.skipped_lines += 1
        stats.skipped_reasons.append(f"{path.name}@{offset}+{number}: {problem}")
    if whole < len(data):
        stats.skipped_lines += 1
        stats.skipped_reasons.append(
            f"{path.name}: torn line at the end (the writer crashed mid-write)"
        )
    return records, offset + whole


def iter_records(
    directory: Path, stats: ReadStats | None = None, *, with_top_k: bool = False
) -> Iterator[LogRecord]:
    """Every readable record of every segment in ``directory``, in write order."""
    for path in list_segments(directory):
        yield from iter_segment(path, stats, with_top_k=with_top_k)


def _parse(
    raw: bytes, with_top_k: bool, top_k_for: Container[str] | None = None
) -> tuple[LogRecord | None, str]:
    """The record on a whole line, or why it cannot be read (torn last lines are caught by
    the caller)."""
    try:
        fields: Any = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        fields = None
    if not isinstance(fields, dict):
        return None, "corrupt line (not a JSON object)"
    version = fields.get("schema_version")
    if version not in READABLE_VERSIONS:
        return None, f"schema version {version!r}, this reader understands {READABLE_VERSIONS}"
    kind = fields.get("kind", "classify")
    try:
        if kind == "classify":
            return EscalationRecord.model_validate_json(raw), ""
        if kind == "generate":
            keep = with_top_k or (top_k_for is not None and fields.get("record_id") in top_k_for)
            return GenerationRecord.from_log(raw, fields, with_top_k=keep), ""
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "record"
        return None, (
            f"invalid record of kind {kind} ({exc.error_count()} errors; first: "
            f"{where}: {first['msg']})"
        )
    return None, f"kind {kind!r}, this reader understands {KINDS}"
