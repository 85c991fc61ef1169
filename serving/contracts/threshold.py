"""The one rule every kind's cascade shares, and the thresholds derived for it.

The cascade escalates an input exactly when ``confidence < threshold`` (NaN escalates).
Thresholds are derived from calibration scores, never hard-coded: for a target escalation
rate (a quantile, as RouteLLM does) or for a target agreement with the teacher. They take
per-record confidences and agreement flags, so a classification and a generation cascade
calibrate the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from serving.contracts.manifest import ModelManifest


class ThresholdSettings(Protocol):
    """What a cascade's config says about its threshold (a serve config's cascade section,
    or :class:`FixedTarget`)."""

    @property
    def scorer(self) -> str: ...
    @property
    def threshold(self) -> float | None: ...
    @property
    def target_escalation_rate(self) -> float | None: ...
    @property
    def target_agreement(self) -> float | None: ...


def check_one_rule(settings: ThresholdSettings) -> None:
    """A cascade's config gives at most one of a fixed threshold and the two targets."""
    given = {
        k: v
        for k, v in (
            ("threshold", settings.threshold),
            ("target_escalation_rate", settings.target_escalation_rate),
            ("target_agreement", settings.target_agreement),
        )
        if v is not None
    }
    if len(given) > 1:
        raise ValueError(
            f"give at most one of threshold, target_escalation_rate, target_agreement; got {given}"
        )


@dataclass(frozen=True)
class FixedTarget:
    """A threshold target given outside any config (the optimiser, tests)."""

    scorer: str
    threshold: float | None = None
    target_escalation_rate: float | None = None
    target_agreement: float | None = None


def should_escalate(confidence: np.ndarray, threshold: float | np.ndarray) -> np.ndarray:
    """The one rule of the cascade: escalate when confidence < threshold (or is NaN: a
    confidence that cannot be computed is no reason to trust the student)."""
    return ~(np.asarray(confidence) >= threshold)


Values = Sequence[float] | np.ndarray


def _sorted(
    confidences: Values, weights: Values | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(confidences ascending with NaN first, their weights, order, the cuts): unit weights
    when none are given.

    ``cuts[i]`` says whether escalating exactly the ``i`` lowest (``i`` in 0..n) is
    expressible as a threshold: no tie straddles the cut, and no NaN is kept (a NaN
    confidence escalates at any threshold, see :func:`should_escalate`).
    """
    conf = np.asarray(confidences, dtype=float)
    if conf.size == 0:
        raise ValueError("cannot derive a threshold from an empty calibration set")
    w = np.ones_like(conf) if weights is None else np.asarray(weights, dtype=float)
    if w.shape != conf.shape or (w <= 0).any() or not np.isfinite(w).all():
        raise ValueError("calibration weights must be positive, finite, one per confidence")
    nan = np.isnan(conf)
    key = np.where(nan, -np.inf, conf)
    order = np.argsort(key, kind="stable")
    key = key[order]
    cuts = np.concatenate([[True], key[1:] > key[:-1], [True]])
    cuts[: int(nan.sum())] = False
    return conf[order], w[order], order, cuts


ALL_NAN_THRESHOLD = float(np.nextafter(1.0, np.inf))
"""The threshold calibrated on NaN confidences alone: above every confidence a scorer
yields (they lie in [0, 1]), so everything escalates, and finite, so it is written into
records and JSON as a number (``+inf`` would be written as null)."""


def _escalating(scores: np.ndarray, i: int) -> float:
    """The threshold that escalates exactly the ``i`` lowest of ``scores`` (sorted as
    :func:`_sorted` sorts them, ``i`` one of its cuts): never NaN."""
    if i < scores.size:
        return float(scores[i])  # finite: a cut never keeps a NaN
    if np.isnan(scores[-1]):
        return ALL_NAN_THRESHOLD
    return float(np.nextafter(scores[-1], np.inf))


def threshold_for_rate(
    confidences: Values, target_rate: float, weights: Values | None = None
) -> float:
    """Smallest threshold that escalates at most ``target_rate`` of the (weighted)
    calibration inputs.

    Ties are kept together: every input sharing a confidence escalates or none does. A NaN
    confidence escalates at any threshold: when the NaN inputs alone weigh more than the
    target, the threshold escalates them and nothing else (the lowest finite confidence).
    """
    if not 0.0 <= target_rate <= 1.0:
        raise ValueError(f"target_rate must lie in [0, 1], got {target_rate}")
    scores, w, _, cuts = _sorted(confidences, weights)
    escalated_weight = np.concatenate([[0.0], np.cumsum(w)])  # escalating the i lowest
    within = escalated_weight <= target_rate * w.sum() * (1 + 1e-12)
    # the largest cut within the budget, else the first cut (the NaN inputs alone)
    allowed = np.flatnonzero(within & cuts)
    return _escalating(scores, int(allowed[-1]) if allowed.size else int(cuts.argmax()))


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
    the lowest threshold reaching the target is returned. A NaN confidence escalates at
    any threshold (as in :func:`should_escalate`), so NaN inputs come first and are never
    kept; the threshold is never NaN (:data:`ALL_NAN_THRESHOLD` when every input is NaN).
    """
    if not 0.0 <= target_agreement <= 1.0:
        raise ValueError(f"target_agreement must lie in [0, 1], got {target_agreement}")
    if len(agrees) != len(confidences):
        raise ValueError("confidences and agrees must be non-empty and of equal length")
    conf, w, order, cuts = _sorted(confidences, weights)
    agree = np.asarray(agrees, dtype=bool)[order]
    needed = target_agreement * w.sum() - 1e-9 * w.sum()
    # agreement when the i lowest are escalated: their weight + agreeing weight of the rest
    escalated = np.concatenate([[0.0], np.cumsum(w)])
    kept_agree = np.concatenate([np.cumsum((w * agree)[::-1])[::-1], [0.0]])
    reached = (escalated + kept_agree >= needed) & cuts  # escalating all always reaches
    return _escalating(conf, int(reached.argmax()))


@dataclass(frozen=True)
class ThresholdRule:
    value: float
    description: str


def resolve_threshold(cascade: ThresholdSettings, manifest: ModelManifest | None) -> ThresholdRule:
    """The threshold for this student version: given in the config, or derived from the
    version's calibration for the config's target (else the target stored with it)."""
    if cascade.threshold is not None:
        return ThresholdRule(cascade.threshold, f"fixed threshold {cascade.threshold}")
    rate, agreement = cascade.target_escalation_rate, cascade.target_agreement
    if rate is None and agreement is None and manifest and manifest.default_target:
        rate = manifest.default_target.target_escalation_rate
        agreement = manifest.default_target.target_agreement
    if rate is None and agreement is None:
        raise ValueError(
            "no threshold: set cascade.threshold, cascade.target_escalation_rate or "
            "cascade.target_agreement (the student's protege.json records no default target)"
        )
    if manifest is None or manifest.calibration is None:
        raise ValueError(
            "cascade targets need a student with calibration data in protege.json; "
            "this student has none, so set cascade.threshold instead"
        )
    value = manifest.calibration.threshold(
        cascade.scorer, target_escalation_rate=rate, target_agreement=agreement
    )
    target = f"escalation rate {rate}" if rate is not None else f"teacher agreement {agreement}"
    return ThresholdRule(value, f"calibrated for {target} on {manifest.calibration.source}")
