"""When the teacher should skip the student's draft.

A draft the teacher rejects costs more than none: the verification pass reads it for
nothing. A draft pays when its accepted share is at least the break-even share ``b``, the
share at which verifying it costs what plain generation costs
(:func:`break_even_share` computes it from measured times).

The issue's own prototype (2 cores, one thread, SmolLM2-135M-Instruct teacher, a 20-token
draft) took 2.77 s with none of the draft accepted, 1.61 s with half, 0.86-1.07 s with
all of it, against 1.92-2.10 s for plain generation: ``b = 0.29``. This module's
verification (:mod:`serving.generate.draft`) wastes less on a rejected draft: its only
extra work is the draft's tokens in the one pass that plain generation spends on the
prompt alone. Measured the same way on a loaded 2-core machine, each time relative to
plain generation of the same prompt (medians of 12 paired runs, 148-165-token prompts)::

    accepted share      0       0.5     1
    time / plain        1.06    0.71    0.31

so ``b = 0.5 * (1.06 - 1) / (1.06 - 0.71) = 0.09``; :data:`DEFAULT_BREAK_EVEN` = 0.1
rounds it up. ``protege bench --task generate`` measures the same table on the default
pair and computes ``b`` from it (docs/generation.md). Set it from your own hardware's
figures: a GPU reads extra tokens in a pass almost for free, which lowers ``b`` further.

With the time saved linear in the accepted share ``s``, a draft of confidence ``c`` saves
in expectation in proportion to ``E[s | c] - b``. The rule keeps drafts whose confidence is
at least a cut, and :func:`draft_cut` picks the cut that maximises the saving summed over
the calibration records: ``sum over c_i >= cut of w_i (s_i - b)``. When the expected share
rises with confidence, that is the cut where it crosses ``b``; it needs no binning, and
records of equal confidence stay on the same side.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

DEFAULT_BREAK_EVEN = 0.1

SKIP_ALL = float(np.nextafter(1.0, np.inf))
"""The cut that skips every draft: above every confidence a scorer yields, and finite
(written into manifests and JSON as a number)."""

Values = Sequence[float] | np.ndarray


def break_even_share(points: Sequence[tuple[float, float]], plain_seconds: float) -> float:
    """The accepted share at which verifying a draft costs ``plain_seconds``, interpolated
    piecewise linearly between measured ``(accepted share, seconds)`` points (cost falling
    with the share). 0.0 when even a rejected draft is no dearer than plain generation,
    1.0 when even a fully accepted one is not cheaper."""
    shares, seconds = zip(*sorted(points), strict=True)
    if len(shares) < 2 or any(b > a for a, b in itertools.pairwise(seconds)):
        raise ValueError(
            "need two or more (share, seconds) points whose cost falls as the share rises"
        )
    if seconds[0] <= plain_seconds:
        return 0.0
    if seconds[-1] >= plain_seconds:
        return 1.0
    # np.interp wants increasing x: interpolate share over the reversed (rising) costs
    return float(np.interp(plain_seconds, seconds[::-1], shares[::-1]))


def draft_cut(
    confidences: Values,
    accepted_shares: Values,
    break_even: float = DEFAULT_BREAK_EVEN,
    weights: Values | None = None,
) -> float:
    """The confidence at and above which the teacher verifies the student's draft.

    ``confidences`` are the student's on calibration records, ``accepted_shares`` the
    share of each record's draft the teacher accepted (0..1), ``weights`` the records'
    weights (1 / inclusion probability; unit when none). The cut is the lowest
    confidence of the drafts kept (drafts below every calibration confidence are
    skipped), or :data:`SKIP_ALL` when no cut saves time. NaN confidences are always
    skipped (see :func:`use_draft`) and do not move the cut.
    """
    if not 0.0 <= break_even <= 1.0:
        raise ValueError(f"break_even must lie in [0, 1], got {break_even}")
    conf = np.asarray(confidences, dtype=float)
    share = np.asarray(accepted_shares, dtype=float)
    w = np.ones_like(conf) if weights is None else np.asarray(weights, dtype=float)
    if conf.size == 0 or conf.shape != share.shape or conf.shape != w.shape:
        raise ValueError("need one accepted share (and weight) per confidence, at least one")
    if ((share < 0) | (share > 1) | ~np.isfinite(share)).any():
        raise ValueError("accepted shares must lie in [0, 1]")
    if (w <= 0).any() or not np.isfinite(w).all():
        raise ValueError("weights must be positive and finite")
    finite = ~np.isnan(conf)
    conf, gain = conf[finite], (w * (share - break_even))[finite]
    if conf.size == 0:
        return SKIP_ALL
    order = np.argsort(conf, kind="stable")
    conf, gain = conf[order], gain[order]
    saved = np.cumsum(gain[::-1])[::-1]  # saved[i]: keep the drafts from i upwards
    starts = np.concatenate([[True], conf[1:] > conf[:-1]])  # no tie straddles the cut
    candidates = np.flatnonzero(starts)
    values = saved[candidates]
    if values.max() <= 0:
        return SKIP_ALL
    # the highest cut among those saving the most (the fewest drafts for the same saving)
    return float(conf[candidates[values == values.max()][-1]])


def use_draft(confidence: float | np.ndarray, cut: float) -> bool | np.ndarray:
    """Verify the draft when ``confidence >= cut``; a NaN confidence never uses it."""
    result = np.asarray(confidence, dtype=float) >= cut
    return bool(result) if result.ndim == 0 else result
