"""Confidence scorers of the classification kind.

A scorer maps a probability vector to a confidence in [0, 1] (higher means trust the
student); the threshold rule that turns confidences into escalations is shared by every
kind (:mod:`serving.contracts.threshold`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import numpy as np
from pydantic import AfterValidator

Scorer = Callable[[np.ndarray], np.ndarray]
"""Takes probabilities of shape (n, k) and returns confidences of shape (n,)."""


def max_probability(probs: np.ndarray) -> np.ndarray:
    """Top-1 probability (in [1/k, 1])."""
    return np.clip(probs.max(axis=-1), 0.0, 1.0)


def margin(probs: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 probability."""
    top2 = np.sort(probs, axis=-1)[..., -2:]
    return np.clip(top2[..., 1] - top2[..., 0], 0.0, 1.0)


def negative_entropy(probs: np.ndarray) -> np.ndarray:
    """1 - H(p) / log(k): 0 for a uniform distribution, 1 for a one-hot one."""
    k = probs.shape[-1]
    p = np.clip(probs, 1e-12, 1.0)
    entropy = -(p * np.log(p)).sum(axis=-1)
    return np.clip(1.0 - entropy / np.log(k), 0.0, 1.0)


SCORERS: dict[str, Scorer] = {
    "max_prob": max_probability,
    "margin": margin,
    "neg_entropy": negative_entropy,
}


def get_scorer(name: str) -> Scorer:
    """The scorer registered under ``name``; unknown names list the known ones."""
    try:
        return SCORERS[name]
    except KeyError:
        known = ", ".join(sorted(SCORERS))
        raise ValueError(f"unknown scorer {name!r}; known scorers: {known}") from None


def known_scorer(name: str) -> str:
    """``name`` if a scorer is registered under it (a validator for config fields)."""
    get_scorer(name)
    return name


ScorerName = Annotated[str, AfterValidator(known_scorer)]
"""A config field holding a registered scorer's name."""
