"""The fixed evaluation and calibration traffic, and the teacher's answers on it (cached).

- calibration: the train headlines (the seed student never saw them) topped up with
  article sentences of seed and train articles;
- holdout: the holdout headlines (gold labels) and a sample of holdout-article sentences
  (weak labels): thousands of inputs, so a threshold does not hinge on a few items.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from distill import bbc
from distill.evaluate import predict_all
from serving.classifier import Classifier


def sample(examples: list[bbc.Example], n: int, seed: int) -> list[bbc.Example]:
    return examples if len(examples) <= n else random.Random(seed).sample(examples, n)


def calibration_set(data: Path, size: int) -> list[bbc.Example]:
    headlines = bbc.read_split(data, "train")[: size // 3]
    sentences = bbc.read_split(data, "seed_sentences") + bbc.read_split(data, "train_sentences")
    return headlines + sample(sentences, size - len(headlines), seed=2)


def holdout_set(data: Path, sentences: int) -> list[bbc.Example]:
    return bbc.read_split(data, "holdout") + sample(
        bbc.read_split(data, "holdout_sentences"), sentences, seed=4
    )


def cached_probs(
    model: Classifier, examples: list[bbc.Example], cache: Path, name: str
) -> np.ndarray:
    """A model's probabilities on a fixed set, computed once per version (versions are
    immutable and content-addressed, so the cache never goes stale)."""
    path = cache / model.version / f"{name}-{len(examples)}.npy"
    if path.exists():
        return np.load(path)
    probs = predict_all(model, [e.text for e in examples], desc=f"{model.version}: {name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial.npy")
    np.save(tmp, probs)
    tmp.replace(path)
    return probs


def gold(examples: list[bbc.Example]) -> np.ndarray:
    return np.array([bbc.LABELS.index(e.label) for e in examples])
