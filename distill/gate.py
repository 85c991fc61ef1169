"""Evaluate a student against the teacher and decide whether a candidate replaces the current.

Each model is judged as it would serve: at its own threshold, calibrated on the
calibration traffic for the same target agreement with the teacher. The candidate is
promoted when it needs clearly fewer escalations (``min_rate_drop``) for a cascade that is
no less accurate (within ``accuracy_tolerance``), or, at about the same escalation rate,
a clearly more accurate cascade.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from distill.config import GateConfig
from distill.evaluate import cascade_figures
from serving.manifest import Calibration
from serving.scoring import SCORERS


@dataclass(frozen=True)
class ModelEval:
    version: str
    threshold: float
    gold_accuracy: float  # the student alone, on gold-labelled holdout headlines
    teacher_agreement: float  # the student alone, on all holdout traffic
    escalation_rate: float  # the cascade at `threshold`, on all holdout traffic
    cascade_accuracy: float  # on the gold headlines
    cascade_agreement: float  # with the teacher, on all holdout traffic

    def as_dict(self) -> dict[str, float | str]:
        return asdict(self)


def make_calibration(student: np.ndarray, teacher: np.ndarray, source: str) -> Calibration:
    return Calibration(
        source=source,
        confidences={
            name: [round(float(c), 6) for c in fn(student)] for name, fn in SCORERS.items()
        },
        agrees_with_teacher=(student.argmax(1) == teacher.argmax(1)).tolist(),
    )


def evaluate(
    version: str,
    calibration: Calibration,
    student: np.ndarray,
    teacher: np.ndarray,
    gold: np.ndarray,
    gold_rows: np.ndarray,
    target_agreement: float,
) -> ModelEval:
    """``student``/``teacher``: probabilities on the holdout traffic; ``gold_rows`` marks
    the rows with gold labels (headlines), ``gold`` their labels."""
    threshold = calibration.threshold("max_prob", target_agreement=target_agreement)
    confidence = SCORERS["max_prob"](student)
    everything = cascade_figures(student, teacher, confidence, threshold, teacher.argmax(1))
    on_gold = cascade_figures(
        student[gold_rows], teacher[gold_rows], confidence[gold_rows], threshold, gold
    )
    return ModelEval(
        version=version,
        threshold=threshold,
        gold_accuracy=float((student[gold_rows].argmax(1) == gold).mean()),
        teacher_agreement=float((student.argmax(1) == teacher.argmax(1)).mean()),
        escalation_rate=everything.escalation_rate,
        cascade_accuracy=on_gold.accuracy,
        cascade_agreement=everything.agreement,
    )


def gate(candidate: ModelEval, current: ModelEval, config: GateConfig) -> tuple[bool, str]:
    """(promote?, why) in words a person can check against the figures."""
    drop = current.escalation_rate - candidate.escalation_rate
    accuracy_change = candidate.cascade_accuracy - current.cascade_accuracy
    figures = (
        f"escalation {current.escalation_rate:.1%} -> {candidate.escalation_rate:.1%}, "
        f"cascade accuracy {current.cascade_accuracy:.1%} -> {candidate.cascade_accuracy:.1%}"
    )
    if accuracy_change < -config.accuracy_tolerance:
        return (
            False,
            f"cascade accuracy fell by more than {config.accuracy_tolerance:.1%} ({figures})",
        )
    if drop >= config.min_rate_drop:
        return True, f"fewer escalations at no worse accuracy ({figures})"
    if abs(drop) < config.min_rate_drop and accuracy_change >= config.min_rate_drop:
        return True, f"more accurate at about the same escalation rate ({figures})"
    return False, f"not better by the margin of {config.min_rate_drop:.1%} ({figures})"
