"""What a distillation run learns from: the escalation records no earlier run consumed,
deduplicated, plus a replay sample so the student does not forget what it knew.

The watermark is, per segment file, the byte offset up to which records were consumed.
Segments are append-only and each has one writer, so "everything after the offset" is
exactly the new records, and a torn last line is never half-read.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from serving.escalation_log import EscalationRecord, ReadStats, list_segments, read_from

WATERMARK_NAME = "watermark.json"


@dataclass
class Window:
    new: list[EscalationRecord]
    replay: list[EscalationRecord]
    watermark: dict[str, int]  # after consuming ``new``
    stats: ReadStats = field(default_factory=ReadStats)
    duplicates: int = 0
    excluded_holdout: int = 0

    def describe(self) -> dict[str, int]:
        return {
            "new_records": len(self.new),
            "replayed_records": len(self.replay),
            "duplicates_dropped": self.duplicates,
            "holdout_texts_dropped": self.excluded_holdout,
            "corrupt_or_torn_lines": self.stats.skipped_lines,
            "segments": len(self.watermark),
        }


def read_watermark(registry: Path) -> dict[str, int]:
    path = Path(registry) / WATERMARK_NAME
    return dict(json.loads(path.read_text())) if path.exists() else {}


def write_watermark(registry: Path, watermark: dict[str, int]) -> None:
    path = Path(registry) / WATERMARK_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(watermark, indent=1, sort_keys=True))
    os.replace(tmp, path)


def read_window(
    log_dir: Path,
    watermark: dict[str, int],
    *,
    exclude_texts: set[str],
    replay: int,
    seed: int,
) -> Window:
    """New records after ``watermark`` (deduplicated by record id, evaluation texts
    dropped) and a seeded sample of ``replay`` earlier ones."""
    window = Window(new=[], replay=[], watermark=dict(watermark))
    seen: set[str] = set()
    earlier: list[EscalationRecord] = []
    for segment in list_segments(log_dir):
        done = watermark.get(segment.name, 0)
        if done:
            consumed, _ = read_from(segment, 0, ReadStats(), end=done)
            earlier.extend(consumed)
            seen.update(r.record_id for r in consumed)
        fresh, end = read_from(segment, done, window.stats)
        window.watermark[segment.name] = end
        for record in fresh:
            if record.record_id in seen:
                window.duplicates += 1
            elif record.text in exclude_texts:
                window.excluded_holdout += 1
            else:
                seen.add(record.record_id)
                window.new.append(record)
    earlier = [r for r in earlier if r.text not in exclude_texts]
    window.replay = random.Random(seed).sample(earlier, min(replay, len(earlier)))
    return window
