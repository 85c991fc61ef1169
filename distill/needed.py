"""The escalation a student needs to reach a target agreement with the teacher.

Two students calibrated to the same target agreement differ in one thing that matters: the
share of the traffic each must send to the teacher to get there. That share is computed
here from per-record arrays alone (confidence, whether the student's own answer agrees with
the teacher, weight), so every task kind uses it unchanged, and on bootstrap resamples: the
threshold is found again within each resample, as calibration would find it on that
sample, so the in-sample optimism of calibrating and measuring on the same records is in
every draw and cancels when two students are compared on the same draws.

The rule is :func:`serving.classify.scorers.threshold_for_agreement`'s: escalate the least confident
inputs first, ties together (a threshold cannot split equal confidences), until the
weighted agreement (escalated inputs agree: the teacher answers them) reaches the target. A
NaN confidence always escalates, as in serving.
"""

from __future__ import annotations

import numpy as np


def escalation_needed(
    confidence: np.ndarray,
    agrees: np.ndarray,
    weights: np.ndarray,
    target: float,
    counts: np.ndarray | None = None,
) -> np.ndarray:
    """The weighted share of inputs the cascade must escalate to agree with the teacher on
    ``target`` of them, one value per row of ``counts``.

    ``counts`` holds, per resample (row), how many times each record is in it (see
    :meth:`distill.estimate.Bootstrap.record_counts`); None is the sample itself (one row
    of ones).
    """
    if not 0.0 <= target <= 1.0:
        raise ValueError(f"target agreement must lie in [0, 1], got {target}")
    conf = np.asarray(confidence, dtype=float)
    n = conf.size
    if n == 0 or len(agrees) != n or len(weights) != n:
        raise ValueError("confidence, agrees and weights must be non-empty and of equal length")
    always = int(np.isnan(conf).sum())  # a NaN confidence escalates at any threshold
    conf = np.where(np.isnan(conf), -np.inf, conf)
    order = np.argsort(conf, kind="stable")
    conf = conf[order]
    disagrees = ~np.asarray(agrees, dtype=bool)[order]
    w = np.asarray(weights, dtype=float)[order]
    # escalating the i lowest is expressible only where no tie straddles the cut
    cuts = np.flatnonzero(np.concatenate([[True], conf[1:] > conf[:-1], [True]]))
    cuts = cuts[cuts >= always]
    c = np.ones((1, n)) if counts is None else np.asarray(counts, dtype=float)[:, order]
    cw = c * w
    total = cw.sum(1)
    # agreement after escalating the i lowest = agreeing weight + the disagreeing weight
    # among them, so the disagreeing weight escalated must reach `deficit`
    deficit = (target - 1e-9) * total - (total - (cw * disagrees).sum(1))
    recovered = np.concatenate([np.zeros((len(c), 1)), np.cumsum(cw * disagrees, 1)], 1)
    escalated = np.concatenate([np.zeros((len(c), 1)), np.cumsum(cw, 1)], 1)
    reached = recovered[:, cuts] >= deficit[:, None]  # the last cut (all escalated) always is
    first = reached.argmax(1)
    return escalated[:, cuts][np.arange(len(c)), first] / total
