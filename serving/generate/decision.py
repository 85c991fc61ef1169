"""The generative cascade's decision, free of any transport: whether an answer escalates,
whether it is audited, whether the teacher starts from the student's draft, and the log
record of an escalated or audited answer.

Confidence comes from the log-probabilities of the tokens the student emitted (raw logits,
temperature 1) through the configured scorer; the answer escalates when
``confidence < threshold`` (NaN escalates: :func:`serving.contracts.threshold.should_escalate`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from serving.contracts.generation_records import (
    ChatMessage,
    GenerationRecord,
    Sampling,
    TopKLogprobs,
)
from serving.contracts.record_fields import Reason, TeacherStatus
from serving.contracts.threshold import should_escalate
from serving.generate.draft_rule import use_draft
from serving.generate.generation import SamplingSettings, TopLogprobs
from serving.generate.scorers import get_scorer
from serving.generate.teacher_engine import TeacherInfo

Tier = Literal["student", "teacher"]

DraftUse = Literal[
    "verified",  # the teacher checked the draft and generated only the rest
    "not_asked",  # the teacher was not asked (a kept answer, or a degraded one)
    "disabled",  # draft_reuse is off in the config
    "sampling",  # a sampled answer: the teacher generates from scratch
    "tokenizer",  # the teacher's tokenizer differs from the student's
    "teacher",  # the teacher cannot verify drafts (a remote API)
    "low_confidence",  # the skip rule: a draft this unsure is mostly rejected
    "empty",  # the student's answer has no token
]
"""Whether the escalated answer's teacher started from the student's draft, and if not, why."""


@dataclass(frozen=True)
class Decision:
    confidence: float
    escalate: bool
    reason: Reason | None  # why an escalated answer escalates


def confidence_of(logprobs: Sequence[float], scorer: str) -> float:
    """The student's confidence in its own answer (NaN for an empty answer)."""
    return float(get_scorer(scorer)([list(logprobs)])[0])


def decide(
    logprobs: Sequence[float], scorer: str, threshold: float, force_tier: Tier | None = None
) -> Decision:
    confidence = confidence_of(logprobs, scorer)
    if force_tier == "teacher":
        return Decision(confidence, True, "forced")
    if force_tier == "student":
        return Decision(confidence, False, None)
    escalate = bool(should_escalate(np.asarray(confidence), threshold))
    return Decision(confidence, escalate, "low_confidence" if escalate else None)


def draw_audit(decision: Decision, fraction: float, draw: Callable[[], float]) -> bool:
    """A kept answer is audited with probability ``fraction`` (uniform, drawn when the
    cascade decides, before anything is awaited)."""
    return not decision.escalate and fraction > 0 and draw() < fraction


def draft_use(
    *,
    reuse: bool,
    settings: SamplingSettings,
    draft_tokens: int,
    student_digest: str,
    teacher: TeacherInfo,
    confidence: float,
    cut: float | None,
) -> DraftUse:
    """Whether the teacher verifies the student's draft (``verified``), or why not."""
    if not reuse:
        return "disabled"
    if not teacher.verifies_drafts:
        return "teacher"
    if not settings.greedy:
        return "sampling"
    if teacher.tokenizer_digest is None or teacher.tokenizer_digest != student_digest:
        return "tokenizer"
    if draft_tokens == 0:
        return "empty"
    if cut is not None and not use_draft(confidence, cut):
        return "low_confidence"
    return "verified"


def sampling_of(settings: SamplingSettings) -> Sampling:
    return Sampling(
        temperature=settings.temperature,
        top_p=settings.top_p,
        max_new_tokens=settings.max_new_tokens,
        seed=settings.seed,
        stop=list(settings.stop),
    )


@dataclass(frozen=True)
class TeacherAnswer:
    """What the log keeps of the teacher's answer."""

    text: str
    version: str
    token_ids: list[int]
    top_logprobs: list[TopLogprobs] | None  # per token, at least ``k`` pairs (or None)
    draft_tokens: int | None
    draft_accepted: int | None


def make_record(
    *,
    request_id: str,
    request_key: str,
    prompt: str | None,
    messages: Sequence[Mapping[str, str]] | None,
    student_text: str,
    student_version: str,
    scorer: str,
    confidence: float,
    threshold: float,
    settings: SamplingSettings,
    reason: Reason,
    inclusion_probability: float,
    teacher_status: TeacherStatus,
    teacher: TeacherAnswer | None = None,
    top_k: int = 0,
) -> GenerationRecord:
    """One log record; the server makes its id. ``teacher`` is the teacher's answer when it
    answered (``teacher_status`` is then ``answered``); the record keeps ``top_k`` of its
    alternatives per token."""
    top = None
    if teacher is not None and top_k and teacher.top_logprobs is not None:
        pairs = [position[:top_k] for position in teacher.top_logprobs]
        top = TopKLogprobs.from_pairs(teacher.token_ids, pairs)
    return GenerationRecord(
        record_id=uuid.uuid4().hex,
        request_id=request_id,
        request_key=request_key,
        timestamp=time.time(),
        prompt=prompt,
        messages=None
        if messages is None
        else [ChatMessage(role=m["role"], content=m["content"]) for m in messages],
        student_text=student_text,
        student_version=student_version,
        scorer=scorer,
        confidence=confidence,
        threshold=threshold,
        sampling=sampling_of(settings),
        reason=reason,
        inclusion_probability=inclusion_probability,
        teacher_status="answered" if teacher is not None else teacher_status,
        teacher_version=None if teacher is None else teacher.version,
        teacher_text=None if teacher is None else teacher.text,
        draft_tokens=None if teacher is None else teacher.draft_tokens,
        draft_accepted=None if teacher is None else teacher.draft_accepted,
        teacher_top_logprobs=top,
    )
