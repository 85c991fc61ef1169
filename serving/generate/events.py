"""What the HTTP layer hands the generation service, and what streams back.

A request is :class:`GenerationRequest`; :meth:`GenerationService.stream
<serving.generate.service.GenerationService.stream>` yields, in this order:

1. one :class:`Routed`: the tier is final (a kept answer was generated whole and decided;
   an escalated one has the teacher's first token, or the teacher failed before it and the
   student's answer stands, ``degraded``);
2. :class:`TextDelta` items, whose texts make the answer;
3. one :class:`Finished` (finish reason, usage, draft figures), or one :class:`Failed` (the
   teacher failed after its first token: the answer is cut short).

An exception raised before :class:`Routed` (the student failed; a prompt beyond the limit,
:class:`PromptTooLong`) means nothing was decided and nothing logged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from serving.contracts.record_fields import Reason
from serving.generate.decision import DraftUse, Tier
from serving.generate.generation import FinishReason, SamplingSettings
from serving.generate.models import Message

MAX_LOGPROBS = 20  # alternatives per token a client may ask for (OpenAI's bound)


class PromptTooLong(ValueError):
    """The prompt has more tokens than the serving version takes (a 400,
    ``context_length_exceeded``): never cut silently."""

    def __init__(self, tokens: int, limit: int) -> None:
        self.tokens, self.limit = tokens, limit
        super().__init__(
            f"the prompt is {tokens} tokens long; this model takes at most {limit} "
            "prompt tokens: shorten the prompt (or the messages)"
        )


@dataclass(frozen=True)
class GenerationRequest:
    """One chat (``messages``) or completion (``prompt``) to answer.

    ``prompt_ids`` come from :meth:`GenerationService.prompt_ids`; ``settings`` carry
    ``max_new_tokens`` already clamped to :meth:`GenerationService.max_new_tokens`;
    ``requested_max_tokens`` is what the client asked for (None: nothing), so that
    :attr:`Routed.clamped` can say whether the clamp lowered it. ``logprobs`` is
    the number of alternatives to return per token (0: the tokens' own log-probabilities
    only; None: no log-probabilities). ``force_tier`` and ``threshold`` are the routing
    overrides; ``deadline`` is a ``time.monotonic()`` by which the answer is due.
    """

    request_id: str
    prompt_ids: Sequence[int]
    settings: SamplingSettings
    messages: Sequence[Message] | None = None
    prompt: str | None = None
    logprobs: int | None = None
    force_tier: Tier | None = None
    threshold: float | None = None
    deadline: float | None = None
    requested_max_tokens: int | None = None

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("a generation request holds exactly one of messages and prompt")
        if not self.prompt_ids:
            raise ValueError("prompt_ids is empty: render the prompt with prompt_ids()")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must lie in 0..{MAX_LOGPROBS}, got {self.logprobs}")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must lie in [0, 1], got {self.threshold}")

    @property
    def steered(self) -> bool:
        """The client chose the routing: its escalations are logged as forced."""
        return self.force_tier == "teacher" or self.threshold is not None


@dataclass(frozen=True)
class TokenLogprob:
    """One answer token's text, its log-probability (raw logits, temperature 1) and the
    alternatives the client asked for as ``(text, log-probability)``, most likely first;
    ``token_id`` and ``top_ids`` are the same tokens' ids. A token ending inside a UTF-8
    character has U+FFFD in its text (OpenAI's API does the same)."""

    token: str
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)
    token_id: int = -1
    top_ids: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Routed:
    """The tier is final. ``escalated``: the cascade chose the teacher (a ``degraded``
    answer is the student's although it escalated: the bulkhead was full, the deadline
    spent, or the teacher failed before its first token). ``reason``: why it escalated
    (None when kept). ``draft``: whether the teacher checks the student's draft of
    ``draft_tokens`` tokens (``verified``) or why not; ``draft_accepted`` is known only
    at the end (:class:`Usage`). ``max_new_tokens`` is the answer's token budget after
    the clamp (``clamped``: lower than the client asked, or than the request's settings
    when a swap lowered the limit)."""

    tier: Tier
    escalated: bool
    degraded: bool
    reason: Reason | None
    confidence: float
    threshold: float
    student_version: str
    teacher_version: str | None
    draft: DraftUse
    draft_tokens: int
    draft_accepted: int | None
    max_new_tokens: int
    clamped: bool
    prompt_tokens: int


@dataclass(frozen=True)
class TextDelta:
    text: str
    logprobs: list[TokenLogprob] | None = None  # one a token, when the request asked


@dataclass(frozen=True)
class Usage:
    """What one answer cost. ``completion_tokens`` are the answer's (the tier that
    answered); the student always generated ``student_tokens`` (its draft, when the
    teacher answered); the teacher's own counts are apart (0 when it was not asked or
    failed; ``teacher_prompt_tokens`` in its own tokenizer).

    The draft figures are set when the teacher checked the student's draft (None
    otherwise): ``draft_accepted`` tokens of it were the answer's first tokens,
    ``draft_rejected`` were not, ``accepted_draft_share`` is accepted over drafted.
    ``teacher_seconds`` is the teacher's time for this answer, ``teacher_seconds_saved``
    its estimate of what the draft saved (negative for a rejected one; None when not
    measured).
    """

    prompt_tokens: int
    completion_tokens: int
    student_tokens: int
    teacher_tokens: int = 0
    teacher_prompt_tokens: int = 0
    draft_accepted: int | None = None
    draft_rejected: int | None = None
    accepted_draft_share: float | None = None
    teacher_seconds: float | None = None
    teacher_seconds_saved: float | None = None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Finished:
    """The answer is complete. ``logged``: None when nothing was to be logged, False
    when the log write failed (the answer stands)."""

    finish_reason: FinishReason
    usage: Usage
    logged: bool | None = None


@dataclass(frozen=True)
class Failed:
    """The teacher failed after its first token: the answer stops here (an error event)."""

    message: str
    kind: Literal["failed", "timeout"] = "failed"
    logged: bool | None = None


Event = Routed | TextDelta | Finished | Failed
