"""Score a classifier on many texts and compare models and cascades on labeled data."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from serving.classifier import Classifier


def predict_all(
    model: Classifier, texts: list[str], batch_size: int = 64, desc: str = ""
) -> np.ndarray:
    """Probabilities for every text, batched by length (less padding), in input order."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    probs = np.zeros((len(texts), len(model.labels)), dtype=np.float32)
    for start in tqdm(
        range(0, len(order), batch_size), desc=desc or f"score {model.version}", unit="batch"
    ):
        batch = order[start : start + batch_size]
        probs[batch] = model.predict([texts[i] for i in batch]).probs
    return probs


@dataclass(frozen=True)
class CascadeFigures:
    escalation_rate: float
    accuracy: float
    agreement: float


def accuracy(probs: np.ndarray, gold: np.ndarray) -> float:
    return float((probs.argmax(axis=1) == gold).mean())


def cascade_figures(
    student: np.ndarray,
    teacher: np.ndarray,
    confidence: np.ndarray,
    threshold: float,
    gold: np.ndarray,
) -> CascadeFigures:
    """What the cascade answers at ``threshold``: its accuracy on ``gold`` and its agreement
    with the teacher's own answers."""
    escalate = confidence < threshold
    answer = np.where(escalate, teacher.argmax(axis=1), student.argmax(axis=1))
    return CascadeFigures(
        escalation_rate=float(escalate.mean()),
        accuracy=float((answer == gold).mean()),
        agreement=float((answer == teacher.argmax(axis=1)).mean()),
    )
