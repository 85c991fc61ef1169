"""Score a classifier on many texts and compare models and cascades on labeled data."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from serving.classify.classifier import Classifier
from serving.contracts.threshold import should_escalate


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
    escalate = should_escalate(confidence, threshold)
    answer = np.where(escalate, teacher.argmax(axis=1), student.argmax(axis=1))
    return CascadeFigures(
        escalation_rate=float(escalate.mean()),
        accuracy=float((answer == gold).mean()),
        agreement=float((answer == teacher.argmax(axis=1)).mean()),
    )


def escalation_needed(
    student: np.ndarray,
    teacher: np.ndarray,
    gold_rows: np.ndarray,
    gold: np.ndarray,
    *,
    accuracy_gap: float = 0.01,
    min_agreement: float = 0.98,
) -> float:
    """The smallest share of inputs to escalate (least confident first) so that the cascade
    is within ``accuracy_gap`` of the teacher's gold accuracy on the ``gold_rows`` and agrees
    with the teacher on at least ``min_agreement`` of all rows."""
    n = len(student)
    order = np.argsort(student.max(axis=1), kind="stable")
    s_label, t_label = student.argmax(1)[order], teacher.argmax(1)[order]
    is_gold = gold_rows[order]
    gold_full = np.full(n, -1)
    gold_full[np.flatnonzero(gold_rows)] = gold
    g = gold_full[order]
    # escalating the first k rows: those answer as the teacher, the rest as the student
    teacher_right = np.concatenate([[0], np.cumsum((t_label == g) & is_gold)])
    student_right = np.concatenate([np.cumsum(((s_label == g) & is_gold)[::-1])[::-1], [0]])
    agree_rest = np.concatenate([np.cumsum((s_label == t_label)[::-1])[::-1], [0]])
    k = np.arange(n + 1)
    accuracy = (teacher_right + student_right) / max(1, is_gold.sum())
    agreement = (k + agree_rest) / n
    teacher_accuracy = teacher_right[-1] / max(1, is_gold.sum())
    ok = (accuracy >= teacher_accuracy - accuracy_gap - 1e-12) & (
        agreement >= min_agreement - 1e-12
    )
    return float(np.flatnonzero(ok)[0] / n)


def bootstrap_interval(
    figure: Callable[[np.ndarray], float], n: int, draws: int = 200, seed: int = 0
) -> tuple[float, float]:
    """A 95 % percentile interval of ``figure(rows)`` over resamples of the n rows."""
    rng = np.random.default_rng(seed)
    values = [figure(rng.integers(0, n, n)) for _ in range(draws)]
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)
