"""Defaults shared by serving, the distillation job, `protege init` and the default build.

Each value is written once, here; the pydantic configs of every part read it from here,
so a trained, calibrated and served student all see the same settings.
"""

from __future__ import annotations

MAX_TOKENS = 128
"""Inputs are truncated to this many tokens in training, calibration and serving."""

SCORER = "max_prob"
"""The confidence scorer serving uses, and so the one the gate judges with."""

TARGET_AGREEMENT = 0.97
"""Each student version's threshold is calibrated for this agreement with the teacher."""

AUDIT_FRACTION = 0.02
"""Share of confident inputs logged as a uniform sample (the estimates' evidence)."""

TEMPERATURE = 2.0
"""Distillation temperature: softens both distributions in the KL term."""

ALPHA = 0.7
"""Weight of the soft (KL) term against the hard-label cross-entropy."""

EVAL_SHARE = 0.2
"""Share of logged texts (by a hash of the normalised text) kept for evaluation, never trained on."""

CONFIDENCE = 0.95
"""Confidence level of the gate's one-sided bootstrap bounds and of reported intervals."""
