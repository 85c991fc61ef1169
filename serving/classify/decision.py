"""The cascade decision, free of any transport: which inputs escalate, and what is answered.

The gateway asks the student, calls :func:`decide`, sends the escalated inputs to the
teacher, and turns the results into outputs and escalation records with the helpers here.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

from serving.classify.scorers import get_scorer
from serving.contracts.records import EscalationRecord, Reason, TeacherStatus
from serving.contracts.threshold import should_escalate
from serving.schemas import ClassifyOutput, Tier


@dataclass(frozen=True)
class Decision:
    confidence: np.ndarray  # (n,)
    escalate: np.ndarray  # (n,) bool
    reason: Reason | None  # why the escalated ones escalate


def decide(
    probs: np.ndarray, scorer: str, threshold: float | np.ndarray, force_tier: Tier | None = None
) -> Decision:
    confidence = get_scorer(scorer)(probs)
    if force_tier == "teacher":
        return Decision(confidence, np.ones(len(probs), dtype=bool), "forced")
    if force_tier == "student":
        return Decision(confidence, np.zeros(len(probs), dtype=bool), None)
    return Decision(confidence, should_escalate(confidence, threshold), "low_confidence")


def make_output(
    probs: np.ndarray,
    labels: list[str],
    *,
    confidence: float,
    tier: Tier,
    version: str,
    escalated: bool,
    degraded: bool = False,
    truncated: bool = False,
) -> ClassifyOutput:
    return ClassifyOutput(
        label=labels[int(np.argmax(probs))],
        probabilities={label: round(float(p), 6) for label, p in zip(labels, probs, strict=True)},
        confidence=round(float(confidence), 6),
        tier=tier,
        model_version=version,
        escalated=escalated,
        degraded=degraded,
        truncated=truncated,
    )


def make_record(
    *,
    request_id: str,
    request_key: str,
    text: str,
    reason: Reason,
    inclusion_probability: float,
    labels: list[str],
    student_version: str,
    student_probs: np.ndarray,
    scorer: str,
    confidence: float,
    threshold: float,
    teacher: dict[str, Any] | None,
    teacher_status: TeacherStatus = "answered",
) -> EscalationRecord:
    """One log record; the server makes its id and ``request_key`` (one key per request,
    shared by its records; a client's request id never is either). ``teacher`` is the
    teacher's answer, or None when it failed, timed out, was not asked or was cancelled."""
    probs = None if teacher is None else [float(p) for p in teacher["probs"]]
    return EscalationRecord(
        record_id=uuid.uuid4().hex,
        request_id=request_id,
        request_key=request_key,
        timestamp=time.time(),
        text=text,
        reason=reason,
        inclusion_probability=inclusion_probability,
        labels=labels,
        student_version=student_version,
        student_probs=[float(p) for p in student_probs],
        scorer=scorer,
        confidence=float(confidence),
        threshold=float(threshold),
        teacher_status="answered" if teacher is not None else teacher_status,
        teacher_version=None if teacher is None else teacher["version"],
        teacher_probs=probs,
        teacher_label=None if probs is None else labels[int(np.argmax(probs))],
    )
