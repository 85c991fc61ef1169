"""Confidence scorers and the threshold rule.

A scorer maps a probability vector to a confidence in [0, 1] (higher means trust the
student). The cascade escalates an input exactly when ``confidence < threshold``.
Thresholds are derived from calibration scores, never hard-coded: for a target
escalation rate (a quantile, as RouteLLM does) or for a target agreement with the teacher.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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


def should_escalate(confidence: np.ndarray, threshold: float | np.ndarray) -> np.ndarray:
    """The one rule of the cascade: escalate when confidence < threshold (or is NaN: a
    confidence that cannot be computed is no reason to trust the student)."""
    return ~(np.asarray(confidence) >= threshold)


Values = Sequence[float] | np.ndarray


def _sorted(
    confidences: Values, weights: Values | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(confidences ascending, their weights, order); unit weights when none are given."""
    conf = np.asarray(confidences, dtype=float)
    if conf.size == 0:
        raise ValueError("cannot derive a threshold from an empty calibration set")
    w = np.ones_like(conf) if weights is None else np.asarray(weights, dtype=float)
    if w.shape != conf.shape or (w <= 0).any() or not np.isfinite(w).all():
        raise ValueError("calibration weights must be positive, finite, one per confidence")
    order = np.argsort(conf, kind="stable")
    return conf[order], w[order], order


def threshold_for_rate(
    confidences: Values, target_rate: float, weights: Values | None = None
) -> float:
    """Smallest threshold that escalates at most ``target_rate`` of the (weighted)
    calibration inputs.

    Ties are kept together: every input sharing a confidence escalates or none does.
    """
    if not 0.0 <= target_rate <= 1.0:
        raise ValueError(f"target_rate must lie in [0, 1], got {target_rate}")
    scores, w, _ = _sorted(confidences, weights)
    escalated_weight = np.concatenate([[0.0], np.cumsum(w)])  # escalating the i lowest
    budget = int(np.flatnonzero(escalated_weight <= target_rate * w.sum() * (1 + 1e-12))[-1])
    if budget >= scores.size:
        return float(np.nextafter(scores[-1], np.inf))
    # inputs strictly below the (budget)-th lowest score escalate: at most `budget` of them
    return float(scores[budget])


def threshold_for_agreement(
    confidences: Values,
    agrees: Sequence[bool] | np.ndarray,
    target_agreement: float,
    weights: Values | None = None,
) -> float:
    """Smallest threshold whose cascade agrees with the teacher on ``target_agreement`` of
    the (weighted) calibration inputs.

    An escalated input always agrees (the teacher answers it); a kept one agrees when the
    student's label equals the teacher's. Escalating the least confident inputs first,
    the lowest threshold reaching the target is returned.
    """
    if not 0.0 <= target_agreement <= 1.0:
        raise ValueError(f"target_agreement must lie in [0, 1], got {target_agreement}")
    if len(agrees) != len(confidences):
        raise ValueError("confidences and agrees must be non-empty and of equal length")
    conf, w, order = _sorted(confidences, weights)
    agree = np.asarray(agrees, dtype=bool)[order]
    needed = target_agreement * w.sum() - 1e-9 * w.sum()
    # agreement when the i lowest are escalated: their weight + agreeing weight of the rest
    escalated = np.concatenate([[0.0], np.cumsum(w)])
    kept_agree = np.concatenate([np.cumsum((w * agree)[::-1])[::-1], [0.0]])
    agreement = escalated + kept_agree
    for i in np.flatnonzero(agreement >= needed):
        # escalating the i lowest is only expressible if no tie straddles the cut
        if i == 0:
            return float(conf[0])
        if i == conf.size:
            return float(np.nextafter(conf[-1], np.inf))
        if conf[i] > conf[i - 1]:
            return float(conf[i])
    return float(np.nextafter(conf[-1], np.inf))
