"""Model scores on fixed text sets (a task's traffic sample, its gold file), cached.

Versions are immutable and content-addressed, and the cache key covers the texts, so a
cached score never goes stale.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from distill.evaluate import predict_all
from serving.classify.classifier import Classifier


def texts_key(texts: list[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:12]


def cached_probs(model: Classifier, texts: list[str], cache: Path, name: str) -> np.ndarray:
    """A model's probabilities on a fixed set of texts, computed once per version."""
    path = cache / model.version / f"{name}-{len(texts)}-{texts_key(texts)}.npy"
    if path.exists():
        return np.load(path)
    probs = predict_all(model, texts, desc=f"{model.version}: {name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.partial.npy")  # writers never collide
    np.save(tmp, probs)
    tmp.replace(path)
    return probs
