"""The log record of one escalated or audited generation (schema version 4, kind ``generate``).

It holds what the next student learns from and what the gate judges with: the prompt (a
plain ``prompt`` or chat ``messages``), both answers, the student's confidence and
threshold, the sampling settings, whether and how much of the student's draft the teacher
kept, and the teacher's top-k log-probabilities per answer token (the soft targets of
token-level distillation).

The top-k is the heavy part: at 20 answer tokens and k = 8 it is about 2.4 KB of a record's
JSON (ids up to 49,152, log-probabilities rounded to :data:`LOGPROB_DECIMALS` places; a list
of ``{id, logprob}`` objects with full floats would be about 6.7 KB), the rest of the record
about 0.7 KB plus the prompt. Readers that evaluate never need it:
:func:`serving.contracts.records.read_from` drops the field before validation unless asked
``with_top_k=True`` (training), so a lean read never builds it.

Records split into train / calibration / gate by a hash of :attr:`GenerationRecord.split_text`,
the canonical prompt (:func:`canonical_prompt`), so a repeated prompt always lands on the
same side whatever its chat template or whitespace.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Mapping, Sequence
from itertools import pairwise
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from serving.contracts.record_fields import (
    SCHEMA_VERSION,
    Reason,
    TeacherStatus,
    nan_from_null,
)

TOP_K = 8
"""How many of the teacher's most likely tokens a record keeps per answer token."""
MAX_TOP_K = 64
"""More would make a record grow towards the whole vocabulary per token."""
LOGPROB_DECIMALS = 4
"""Log-probabilities are rounded to this many places: a relative error in probability
below 5e-5, far under what distillation can feel, and about a third of the bytes."""
MIN_LOGPROB = -1e4
"""A log-probability of -inf (a token the model rules out) is stored as this: JSON has no
infinity, and exp(-1e4) is 0 in any float."""
TOP_K_FIELD = "teacher_top_logprobs"

_SPACE = re.compile(r"\s+")


def _clean(text: str) -> str:
    return _SPACE.sub(" ", unicodedata.normalize("NFC", text)).strip()


def canonical_prompt(prompt: str | Sequence[Mapping[str, str]]) -> str:
    """The prompt as records hash it into splits: one ``role: content`` line a message
    (a plain prompt is its text alone), NFC, whitespace runs collapsed, role lower-cased,
    no chat template.

    Case is kept (the text stays readable); the split hash folds case itself
    (:func:`distill.splits.normalise`), so prompts that differ only in case, spacing or
    template land in the same split.
    """
    if isinstance(prompt, str):
        return _clean(prompt)
    return "\n".join(f"{_clean(m['role']).lower()}: {_clean(m['content'])}" for m in prompt)


class ChatMessage(BaseModel):
    """One message of a chat prompt, as the client sent it (no template applied)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: str = Field(min_length=1, description="system, user, assistant ...")
    content: str


class Sampling(BaseModel):
    """How both answers were generated (the request's settings, after the clamp)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(ge=0, allow_inf_nan=False, description="0 is greedy")
    top_p: float = Field(gt=0, le=1)
    max_new_tokens: int = Field(ge=1, description="After the clamp to the version's limit")
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class TopKLogprobs(BaseModel):
    """The teacher's k most likely tokens at each position of its answer, stored sparse:
    per position, two parallel lists (ids, then their log-probabilities, most likely
    first). Log-probabilities are natural logs at temperature 1 from the raw logits.

    ``tokens[i]`` is the token the teacher emitted at position ``i``: the first id of that
    position for a greedy answer, possibly none of the k for a sampled one.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    tokens: list[int] = Field(description="The teacher's answer tokens, one per position")
    ids: list[list[int]] = Field(description="Per position, the k most likely token ids")
    logprobs: list[list[float]] = Field(description="Per position, their log-probabilities")

    @classmethod
    def from_pairs(
        cls, tokens: Sequence[int], top: Sequence[Sequence[tuple[int, float]]]
    ) -> TopKLogprobs:
        """From per-position ``(token id, log-probability)`` pairs, most likely first (what
        :class:`serving.generate.generation.Generated` holds in ``top_logprobs``)."""
        return cls(
            tokens=[int(t) for t in tokens],
            ids=[[int(i) for i, _ in position] for position in top],
            logprobs=[[float(lp) for _, lp in position] for position in top],
        )

    @property
    def k(self) -> int:
        return len(self.ids[0]) if self.ids else 0

    def pairs(self) -> list[list[tuple[int, float]]]:
        """Per position, ``(token id, log-probability)`` pairs, most likely first."""
        return [
            list(zip(i, lp, strict=True)) for i, lp in zip(self.ids, self.logprobs, strict=True)
        ]

    @field_validator("logprobs")
    @classmethod
    def _round(cls, rows: list[list[float]]) -> list[list[float]]:
        for row in rows:
            if row and (any(map(math.isnan, row)) or max(row) > 1e-3):
                bad = next(v for v in row if math.isnan(v) or v > 1e-3)
                raise ValueError(
                    f"a log-probability must be a number at most 0, got {bad}: store "
                    "log_softmax of the raw logits, not the logits or probabilities"
                )
        out = []
        for row in rows:
            if row and (min(row) < MIN_LOGPROB or max(row) > 0.0):
                # -inf is kept finite, and a rounding error above 0 is 0
                row = [max(min(v, 0.0), MIN_LOGPROB) for v in row]
            out.append([round(v, LOGPROB_DECIMALS) + 0.0 for v in row])  # + 0.0: no "-0.0"
        return out

    @model_validator(mode="after")
    def _shape(self) -> TopKLogprobs:
        if not len(self.tokens) == len(self.ids) == len(self.logprobs):
            raise ValueError(
                f"top-k covers {len(self.tokens)} tokens but holds {len(self.ids)} id rows "
                f"and {len(self.logprobs)} log-probability rows: one row per answer token"
            )
        k = self.k
        for position, (ids, logprobs) in enumerate(zip(self.ids, self.logprobs, strict=True)):
            if len(ids) != k or len(logprobs) != k:
                raise ValueError(
                    f"top-k position {position} holds {len(ids)} ids and {len(logprobs)} "
                    f"log-probabilities; every position holds the same k ({k})"
                )
            if len(set(ids)) != k or min(ids) < 0:
                raise ValueError(f"top-k position {position}: ids {ids} must be distinct and >= 0")
            if any(a < b for a, b in pairwise(logprobs)):
                raise ValueError(
                    f"top-k position {position}: log-probabilities {logprobs} must be sorted, "
                    "most likely first (as torch.topk returns them)"
                )
        if self.ids and not 1 <= k <= MAX_TOP_K:
            raise ValueError(f"top-k keeps k={k} tokens a position; keep 1 to {MAX_TOP_K}")
        if any(t < 0 for t in self.tokens):
            raise ValueError("top-k tokens must be token ids (>= 0)")
        return self


class GenerationRecord(BaseModel):
    """One escalated or audited generation, with both answers and the teacher's top-k."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: int = SCHEMA_VERSION
    kind: Literal["generate"] = "generate"
    record_id: str = Field(description="Made by the server, unique per logged input")
    request_id: str = Field(description="The request's id (the client's x-request-id if sent)")
    request_key: str = Field(
        description="Made by the server, one per request: the unit the gate's bootstrap resamples"
    )
    timestamp: float = Field(description="Unix seconds when the record was made")
    prompt: str | None = Field(default=None, description="A completion's prompt")
    messages: list[ChatMessage] | None = Field(default=None, description="A chat's messages")
    student_text: str
    student_version: str
    scorer: str
    confidence: float = Field(description="NaN (written as null) always escalates")
    threshold: float
    sampling: Sampling
    reason: Reason
    inclusion_probability: float = Field(
        gt=0,
        le=1,
        description="1 for an escalation, the audit fraction for an audited confident answer",
    )
    teacher_status: TeacherStatus = Field(
        description="'answered', or why the teacher fields are empty (answered offline)"
    )
    teacher_version: str | None = None
    teacher_text: str | None = None
    draft_tokens: int | None = Field(
        default=None,
        ge=0,
        description="Draft tokens the teacher checked; None when no draft was checked "
        "(sampling, different tokenizers, a remote teacher, the skip rule)",
    )
    draft_accepted: int | None = Field(
        default=None, ge=0, description="Of those, the agreeing prefix the teacher kept"
    )
    teacher_top_logprobs: TopKLogprobs | None = Field(
        default=None,
        description="Per teacher answer token, its k most likely tokens (None when the "
        "teacher gave none, or the line was read without them)",
    )
    gold_reference: str | None = None

    _top_k_dropped: bool = PrivateAttr(default=False)

    @classmethod
    def from_log(cls, line: bytes, fields: dict[str, Any], *, with_top_k: bool) -> GenerationRecord:
        """A record from a log line (and its parsed ``fields``); without ``with_top_k``
        the top-k is removed before validation (pydantic never builds it) and
        :attr:`top_k_dropped` says so."""
        if with_top_k or fields.get(TOP_K_FIELD) is None:
            return cls.model_validate_json(line)
        del fields[TOP_K_FIELD]
        record = cls.model_validate(fields)
        record._top_k_dropped = True
        return record

    @property
    def top_k_dropped(self) -> bool:
        """Whether the line held a top-k that this read left out (a lean read)."""
        return self._top_k_dropped

    @property
    def split_text(self) -> str:
        """What the split hash reads: the canonical prompt."""
        if self.messages is not None:
            return canonical_prompt([{"role": m.role, "content": m.content} for m in self.messages])
        return canonical_prompt(self.prompt or "")

    @property
    def evaluable(self) -> bool:
        """Whether the record can weigh in an estimate over the whole traffic (always:
        generation records were born with an inclusion probability)."""
        return True

    @field_validator("confidence", mode="before")
    @classmethod
    def _nan_confidence(cls, value: object) -> object:
        return nan_from_null(value)

    @model_validator(mode="after")
    def _consistent(self) -> GenerationRecord:
        if self.schema_version < 4:
            raise ValueError(
                f"generation records begin at schema version 4, got {self.schema_version}"
            )
        if not self.request_key:
            raise ValueError("generation records need request_key (made by the server)")
        if (self.prompt is None) == (self.messages is None):
            raise ValueError(
                "a generation record holds exactly one of `prompt` (a completion) and "
                f"`messages` (a chat); got {'both' if self.prompt is not None else 'neither'}"
            )
        if self.messages is not None and not self.messages:
            raise ValueError("`messages` is empty: a chat record holds at least one message")
        answered = self.teacher_text is not None
        if answered != (self.teacher_status == "answered"):
            raise ValueError(
                f"teacher_status {self.teacher_status!r} with "
                f"{'a' if answered else 'no'} teacher text"
            )
        if self.teacher_top_logprobs is not None and not answered:
            raise ValueError(
                f"teacher_top_logprobs with teacher_status {self.teacher_status!r}: the "
                "top-k belongs to a teacher answer"
            )
        self._check_draft()
        return self

    def _check_draft(self) -> None:
        tokens, accepted = self.draft_tokens, self.draft_accepted
        if (tokens is None) != (accepted is None):
            raise ValueError(
                f"draft_tokens={tokens} with draft_accepted={accepted}: set both when the "
                "teacher checked a draft, neither when it did not"
            )
        if tokens is None or accepted is None:
            return
        if accepted > tokens:
            raise ValueError(f"draft_accepted={accepted} exceeds draft_tokens={tokens}")
        if not self.sampling.greedy:
            raise ValueError(
                f"a draft checked at temperature {self.sampling.temperature}: drafts are "
                "checked only for greedy answers; record draft_tokens=None when sampling"
            )
        if self.teacher_status == "skipped":
            raise ValueError(
                "a draft checked with teacher_status 'skipped': the teacher was not asked, "
                "so record draft_tokens=None"
            )
