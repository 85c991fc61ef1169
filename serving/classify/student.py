"""Loading a classification student for the slot: load, validate, calibrate."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from serving.classify.classifier import Classifier
from serving.config import CascadeConfig
from serving.contracts.threshold import resolve_threshold
from serving.hot_swap import ActiveStudent


def load_student(
    folder: Path,
    cascade: CascadeConfig,
    device: str,
    max_tokens: int | None,
    labels: list[str] | None,
) -> ActiveStudent:
    """Load, validate and calibrate one student version; raises with the reason if unfit."""
    model = Classifier(folder, device=device, max_tokens=max_tokens)
    if labels is not None and model.labels != labels:
        raise ValueError(f"labels {model.labels} differ from the serving labels {labels}")
    probs = model.predict(["warm-up input", "a second, longer warm-up input for the batch"]).probs
    if probs.shape != (2, len(model.labels)) or not np.isfinite(probs).all():
        raise ValueError(
            f"warm-up produced {probs.shape} outputs, expected (2, {len(model.labels)})"
        )
    if not np.allclose(probs.sum(axis=1), 1.0, atol=1e-3):
        raise ValueError("warm-up probabilities do not sum to 1")
    return ActiveStudent(model, resolve_threshold(cascade, model.manifest))
