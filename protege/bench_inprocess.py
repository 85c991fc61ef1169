"""The models' own cost, in process and without HTTP: the limit every served row of
``protege bench`` is compared to, and the threshold at which the cascade's accuracy stays
within a point of the teacher's.

Run before the serving stack starts, at the thread count a replica gets, so the limit
and the served rows share the machine's conditions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from distill.evaluate import predict_all
from distill.optimize import rate
from serving.classify.classifier import Classifier
from serving.classify.scorers import get_scorer
from serving.contracts.threshold import should_escalate

BATCH_SIZES = (1, 32)


@dataclass(frozen=True)
class InProcess:
    """One model measured in process: inputs/s per batch size, its answers on the texts."""

    name: str
    version: str
    rates: dict[int, float]
    probs: np.ndarray
    runtime: str = "torch"


def measure(name: str, model: Classifier, texts: list[str], seconds: float = 10.0) -> InProcess:
    rates = {b: round(rate(model, texts, b, seconds), 1) for b in BATCH_SIZES}
    return InProcess(name, model.version, rates, predict_all(model, texts), model.runtime)


@dataclass(frozen=True)
class CascadePoint:
    threshold: float
    accuracy: float
    teacher_accuracy: float
    escalation_rate: float


def threshold_near_teacher(
    student_probs: np.ndarray,
    teacher_probs: np.ndarray,
    gold: np.ndarray,
    scorer: str,
    points: float = 0.01,
) -> CascadePoint:
    """The lowest threshold whose cascade (student kept above it, teacher below) is at most
    ``points`` less accurate than the teacher alone on these labelled inputs."""
    confidence = get_scorer(scorer)(student_probs)
    student_right = student_probs.argmax(1) == gold
    teacher_right = teacher_probs.argmax(1) == gold
    teacher_accuracy = float(teacher_right.mean())
    candidates = np.unique(np.append(confidence, np.nextafter(confidence.max(), np.inf)))
    for threshold in candidates:  # ascending: the first that is good enough escalates least
        escalate = should_escalate(confidence, threshold)
        accuracy = float(np.where(escalate, teacher_right, student_right).mean())
        if accuracy >= teacher_accuracy - points - 1e-12:
            return CascadePoint(
                float(threshold), accuracy, teacher_accuracy, float(escalate.mean())
            )
    raise AssertionError("escalating every input matches the teacher")  # pragma: no cover
