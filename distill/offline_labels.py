"""The teacher's answer for every record: as logged, or asked now, in batch.

Audited inputs may be logged with the student's answer only, and an escalation whose
teacher failed, timed out, was skipped, or whose request was cancelled while it waited
(teacher status ``cancelled``) is logged with empty teacher fields; the job labels every
record without this teacher's answer here, whatever its status (it loads the teacher
anyway). Answers are kept per teacher version and record id in the score
cache, so a record is asked once however many runs read it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from distill.evaluate import predict_all
from serving.classify.classifier import Classifier
from serving.contracts.records import EscalationRecord


class OfflineLabels:
    def __init__(self, teacher: Classifier, cache: Path) -> None:
        self.teacher = teacher
        self.labels = teacher.labels
        self.asked = 0  # records labelled by this job (not from the cache)
        self.foreign = 0  # records logged under other labels, left out
        self._path = Path(cache) / teacher.version / "offline_labels.jsonl"
        self._known: dict[str, list[float]] = {}
        if self._path.exists():
            for line in self._path.read_text().splitlines():
                try:
                    row = json.loads(line)
                    self._known[row["record_id"]] = row["probs"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a torn last line from an interrupted run

    def usable(self, records: list[EscalationRecord]) -> list[EscalationRecord]:
        """Records logged under this teacher's labels (others are counted and left out)."""
        kept = [r for r in records if r.labels == self.labels]
        self.foreign += len(records) - len(kept)
        return kept

    def logged(self, record: EscalationRecord) -> list[float] | None:
        """The logged answer, if it is this teacher's (an older teacher's is asked again)."""
        if record.teacher_version != self.teacher.version:
            return None
        return record.teacher_probs

    def probs(self, records: list[EscalationRecord]) -> np.ndarray:
        """(n, k) teacher probabilities, in the records' order."""
        missing = [r for r in records if self.logged(r) is None and r.record_id not in self._known]
        if missing:
            answered = predict_all(self.teacher, [r.text for r in missing], desc="label offline")
            self._remember(missing, answered)
        rows = [self.logged(r) or self._known[r.record_id] for r in records]
        return np.asarray(rows, dtype=np.float32).reshape(len(records), len(self.labels))

    def _remember(self, records: list[EscalationRecord], probs: np.ndarray) -> None:
        self.asked += len(records)
        self._path.parent.mkdir(parents=True, exist_ok=True)
        with open(self._path, "a") as handle:
            for record, row in zip(records, probs, strict=True):
                values = [round(float(p), 6) for p in row]
                self._known[record.record_id] = values
                handle.write(json.dumps({"record_id": record.record_id, "probs": values}) + "\n")
