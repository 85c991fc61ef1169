"""What a distillation run learns from and is judged on, read from the escalation log.

- **training**: records of the training split (by a hash of the text, see
  :mod:`distill.splits`) that no earlier run consumed, deduplicated by record id, plus a
  replay sample of consumed ones so the student does not forget what it knew;
- **evaluation**: every readable version-2 record of the calibration and gate splits,
  pooled across runs (the newest ``max_eval``), never trained on or replayed, and not
  deduplicated by text: a repeated text was served twice, and each record stands for
  ``1 / inclusion_probability`` served inputs (only a record written twice, the same
  server-made id, counts once).
  Version-1 records carry no inclusion probability: they may train, never evaluate.

A job reads its own kind only (:func:`read_window` classification records,
:func:`read_generation_window` generation records, with their top-k when asked): a record
of the other kind in the same log is skipped and counted (``other_kind_records``), never
an error. Records split by their ``split_text``: a classification record's text, a
generation record's canonical prompt.

The watermark is, per segment file, the byte offset up to which records were consumed.
Segments are append-only and each has one writer, so "everything after the offset" is
exactly the new records, and a torn last line is never half-read. It moves only by
compare-and-set from the value the run read, so it never moves backwards.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

from distill.splits import Role, normalise, role_of
from serving.contracts.generation_records import GenerationRecord
from serving.contracts.records import (
    EscalationRecord,
    LogRecord,
    ReadStats,
    list_segments,
    read_from,
)
from serving.contracts.storage import Store

WATERMARK_NAME = "watermark.json"
R = TypeVar("R", EscalationRecord, GenerationRecord)


@dataclass
class Window(Generic[R]):
    new: list[R]
    replay: list[R]
    watermark: dict[str, int]  # after consuming ``new``
    read: dict[str, int] = field(default_factory=dict)  # before: the compare-and-set base
    evaluation: dict[Role, list[R]] = field(default_factory=lambda: {"calibration": [], "gate": []})
    stats: ReadStats = field(default_factory=ReadStats)
    duplicates: int = 0
    unweighted_eval_dropped: int = 0  # version-1 records of the evaluation split
    other_kind: int = 0  # records of the other kind after the watermark, skipped
    # normalised split texts of every consumed training record: what the current
    # student's lineage may have trained on (never a calibration text of the fallback)
    consumed_texts: set[str] = field(default_factory=set)

    def describe(self) -> dict[str, int]:
        return {
            "new_records": len(self.new),
            "replayed_records": len(self.replay),
            "duplicates_dropped": self.duplicates,
            "calibration_records": len(self.evaluation["calibration"]),
            "gate_records": len(self.evaluation["gate"]),
            "version1_eval_records_dropped": self.unweighted_eval_dropped,
            "other_kind_records": self.other_kind,
            "corrupt_or_torn_lines": self.stats.skipped_lines,
            "segments": len(self.watermark),
        }


def read_watermark(store: Store) -> dict[str, int]:
    """Per segment name, the byte offset consumed so far (kept beside the registry)."""
    data = store.read(WATERMARK_NAME)
    return dict(json.loads(data)) if data else {}


def write_watermark(
    store: Store, watermark: dict[str, int], read: dict[str, int], attempts: int = 3
) -> bool:
    """Move the watermark to ``watermark`` by compare-and-set: only if the store still holds
    ``read``, the value this run started from. False (nothing written) when it moved
    meanwhile: another run consumed records, and a stale write would move the watermark
    backwards and train those records twice. Finding ``watermark`` already there is this
    run's own write, whose answer was lost (a store error is tried ``attempts`` times)."""
    encoded = json.dumps(watermark, indent=1, sort_keys=True).encode()
    moved = False

    def change(data: bytes | None) -> bytes | None:
        nonlocal moved
        stored = dict(json.loads(data)) if data else {}
        moved = stored not in (read, watermark)
        return None if moved or stored == watermark else encoded

    for attempt in range(attempts - 1):
        try:
            store.update(WATERMARK_NAME, change)
            return not moved
        except OSError:
            time.sleep(0.5 * 2**attempt)
    store.update(WATERMARK_NAME, change)  # the last try's error is the caller's
    return not moved


def read_window(
    log_dir: Path,
    watermark: dict[str, int],
    *,
    eval_share: float,
    replay: int,
    seed: int,
    max_eval: int = 50_000,
) -> Window[EscalationRecord]:
    """New classification records after ``watermark``, a seeded replay sample of earlier
    ones, and the pooled evaluation records."""
    return _read(log_dir, watermark, EscalationRecord, eval_share, replay, seed, max_eval)


def read_generation_window(
    log_dir: Path,
    watermark: dict[str, int],
    *,
    eval_share: float,
    replay: int,
    seed: int,
    max_eval: int = 50_000,
    with_top_k: bool = True,
) -> Window[GenerationRecord]:
    """:func:`read_window` for generation records; ``with_top_k``: the training records
    (new and replayed) keep the teacher's top-k (evaluation records never load it)."""
    window = _read(log_dir, watermark, GenerationRecord, eval_share, replay, seed, max_eval)
    if with_top_k and (window.new or window.replay):
        full = _with_top_k(log_dir, window, {r.record_id for r in window.new + window.replay})
        window.new = [full.get(r.record_id, r) for r in window.new]
        window.replay = [full.get(r.record_id, r) for r in window.replay]
    return window


def _with_top_k(
    log_dir: Path, window: Window[GenerationRecord], wanted: set[str]
) -> dict[str, GenerationRecord]:
    """The ``wanted`` training records again, with their top-k: a second pass that builds
    the top-k of those records only (the rest, evaluation records included, stay lean)."""
    found: dict[str, GenerationRecord] = {}
    for segment in list_segments(log_dir):
        end = window.watermark.get(segment.name)
        lines, _ = read_from(segment, 0, ReadStats(), end=end, top_k_for=wanted)
        for record in lines:
            if isinstance(record, GenerationRecord) and record.record_id in wanted:
                found.setdefault(record.record_id, record)
    return found


def _read(
    log_dir: Path,
    watermark: dict[str, int],
    kind: type[R],
    eval_share: float,
    replay: int,
    seed: int,
    max_eval: int,
) -> Window[R]:
    """Every record read lean (no top-k)."""
    window: Window[R] = Window(new=[], replay=[], watermark=dict(watermark), read=dict(watermark))
    seen: set[str] = set()
    earlier: list[R] = []
    for segment in list_segments(log_dir):
        done = watermark.get(segment.name, 0)
        earlier_lines: list[LogRecord] = []
        if done:
            earlier_lines, _ = read_from(segment, 0, ReadStats(), end=done)
        fresh_lines, end = read_from(segment, done, window.stats)
        window.watermark[segment.name] = end
        consumed, fresh = _of_kind(earlier_lines, kind), _of_kind(fresh_lines, kind)
        window.other_kind += len(fresh_lines) - len(fresh)
        for record in consumed + fresh:
            role = role_of(record.split_text, eval_share)
            if role != "train":
                if record.evaluable:
                    window.evaluation[role].append(record)
                else:
                    window.unweighted_eval_dropped += 1
        consumed = [r for r in consumed if role_of(r.split_text, eval_share) == "train"]
        earlier.extend(consumed)
        seen.update(r.record_id for r in consumed)
        for record in fresh:
            if role_of(record.split_text, eval_share) != "train":
                continue
            if record.record_id in seen:
                window.duplicates += 1
            else:
                seen.add(record.record_id)
                window.new.append(record)
    for role, records in window.evaluation.items():
        unique = list({r.record_id: r for r in records}.values())
        unique.sort(key=lambda r: r.timestamp)
        window.evaluation[role] = unique[-max_eval:]
    window.consumed_texts = {normalise(r.split_text) for r in earlier}
    window.replay = random.Random(seed).sample(earlier, min(replay, len(earlier)))
    return window


def _of_kind(records: list[LogRecord], kind: type[R]) -> list[R]:
    """The records of ``kind`` among ``records`` (the other kind's job reads the rest)."""
    return [r for r in records if isinstance(r, kind)]
