"""The demo's fixed BBC yardstick beside the live-traffic estimates: 320 gold holdout
headlines and 2,000 holdout-article sentences that no model trained or calibrated on.

A student version is judged as it serves (its own threshold, from its manifest) and by
the target figure: the escalation rate needed for a cascade within 1 point of the
teacher's gold accuracy that agrees with the teacher on at least 98 % of the inputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from distill.eval_sets import cached_probs
from distill.evaluate import bootstrap_interval, cascade_figures, escalation_needed
from protege import bbc
from serving.classify.classifier import Classifier
from serving.classify.scorers import get_scorer
from serving.config import CascadeConfig
from serving.contracts.threshold import resolve_threshold


class Holdout:
    def __init__(self, cache: Path, scores: Path, sentences: int = 2000) -> None:
        examples = bbc.holdout_traffic(cache / "data", sentences)
        self.texts = [e.text for e in examples]
        self.gold_rows = np.array([e.kind == "headline" for e in examples])
        self.gold = np.array([bbc.LABELS.index(e.label) for e in examples])
        self.scores = scores
        teacher = Classifier(cache / "models" / "teacher")
        self.teacher = cached_probs(teacher, self.texts, scores, "bbc-holdout")

    def figures(self, folder: Path, scorer: str = "max_prob") -> dict[str, Any]:
        student = Classifier(folder)
        probs = cached_probs(student, self.texts, self.scores, "bbc-holdout")
        rule = resolve_threshold(CascadeConfig(scorer=scorer), student.manifest)
        confidence = get_scorer(scorer)(probs)
        rows = self.gold_rows
        served = cascade_figures(probs, self.teacher, confidence, rule.value, self.gold)
        on_gold = cascade_figures(
            probs[rows], self.teacher[rows], confidence[rows], rule.value, self.gold[rows]
        )

        def needed(idx: np.ndarray) -> float:
            return escalation_needed(
                probs[idx], self.teacher[idx], rows[idx], self.gold[idx][rows[idx]]
            )

        return {
            "version": student.version,
            "threshold": rule.value,
            "escalation_rate": served.escalation_rate,
            "cascade_agreement": served.agreement,
            "cascade_gold_accuracy": on_gold.accuracy,
            "student_gold_accuracy": float((probs[rows].argmax(1) == self.gold[rows]).mean()),
            "escalation_needed": needed(np.arange(len(self.texts))),
            "escalation_needed_95": bootstrap_interval(needed, len(self.texts)),
        }

    @property
    def teacher_gold_accuracy(self) -> float:
        rows = self.gold_rows
        return float((self.teacher[rows].argmax(1) == self.gold[rows]).mean())
