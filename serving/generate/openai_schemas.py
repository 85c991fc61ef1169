"""Wire types of the OpenAI-compatible routes (``/v1/chat/completions``, ``/v1/completions``).

The request models accept what protege implements and refuse the rest by name: a
parameter of OpenAI's API that protege does not implement (``tools``, ``n`` other than 1,
the penalties ...) is an ``unsupported_parameter`` error naming it, unless it carries its
neutral value (``n: 1``, ``presence_penalty: 0``, ``null`` ...), which changes nothing and
is dropped; any other unknown field is refused by the schema (``extra_forbidden``). The
routes turn every validation error into a 400 in OpenAI's shape
(:mod:`serving.generate.openai_api`).

The response models follow OpenAI's objects field for field, with protege's routing
metadata in an extra ``protege`` object (the official client keeps unknown fields:
``completion.protege`` or ``completion.model_extra["protege"]``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    Tag,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from serving.generate.generation import FinishReason
from serving.schemas import Tier

ONE, MANY = "one", "many"  # the tags of a "string or list" field (hidden in error locations)
MAX_STOP = 4
MAX_CHAT_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5


def _whole(value: Any) -> Any:
    """JSON (and its schema) counts 1710.0 as an integer; a bool stays a bool (refused)."""
    if isinstance(value, float) and not isinstance(value, bool) and value.is_integer():
        return int(value)
    return value


SEED_MIN, SEED_MAX = -(2**53), 2**53  # torch takes more; these a JSON schema states exactly
DEFAULT_TEMPERATURE = 0.0
"""protege's default (OpenAI's is 1): greedy, the setting thresholds are calibrated on and
the only one where the teacher starts from the student's draft."""


def _unsupported(field: str | None, why: str) -> PydanticCustomError:
    """A parameter protege does not implement; ``field``, when raised by the model holding
    it, is appended to the error's location by the routes."""
    ctx = {"why": why} | ({"field": field} if field else {})
    return PydanticCustomError("unsupported_parameter", "not supported by protege ({why})", ctx)


def _refused(kind: str, field: str, message: str) -> PydanticCustomError:
    """A field that contradicts another, raised by the model holding both."""
    return PydanticCustomError(kind, message, {"field": field})


def _json(value: Any) -> str:
    return json.dumps(value)


def _shape(value: Any) -> str | None:
    return ONE if isinstance(value, str) else MANY if isinstance(value, list) else None


def _string_or_list(item: Any, max_items: int | None, what: str) -> Any:
    """``item`` (a string) or a list of them; the branches' tags are hidden in errors."""
    many = Annotated[list[item], Field(min_length=1, max_length=max_items)]
    return Annotated[
        Annotated[item, Tag(ONE)] | Annotated[many, Tag(MANY)],
        Discriminator(
            _shape, custom_error_type="invalid_type", custom_error_message=f"must be {what}"
        ),
    ]


StopString = Annotated[StrictStr, Field(min_length=1, max_length=256)]
Stop = _string_or_list(StopString, MAX_STOP, f"a string or a list of up to {MAX_STOP} strings")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: StrictBool = Field(
        default=False,
        description="Send one more chunk before `data: [DONE]`: empty `choices` and the "
        "whole request's `usage`",
    )


class ProtegeOptions(_Strict):
    """protege's routing overrides (``extra_body={"protege": {...}}`` in the official
    client); a key allowed the overrides is needed, else a 403."""

    force_tier: Tier | None = Field(
        default=None, description="Answer with this tier ('teacher' is logged as forced)"
    )
    threshold: StrictFloat | None = Field(
        default=None, ge=0, le=1, description="Override the escalation threshold"
    )

    @property
    def overrides(self) -> list[str]:
        return [f for f in ("force_tier", "threshold") if getattr(self, f) is not None]


class _Neutral:
    """Parameters of OpenAI's API that protege does not implement, each with the values
    that ask for nothing (accepted and dropped); any other value is refused by name."""

    UNSUPPORTED: ClassVar[Mapping[str, tuple[Any, ...]]] = {}

    @classmethod
    def _drop_neutral(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        kept = dict(data)
        for name, neutral in cls.UNSUPPORTED.items():
            if name not in kept:
                continue
            value = kept.pop(name)
            if value is not None and not any(_same(value, n) for n in neutral):
                shown = ", ".join(_json(n) for n in neutral)
                why = f"send it as {shown} or null, or leave it out" if neutral else "leave it out"
                raise _unsupported(name, why)
        return kept


def _same(value: Any, neutral: Any) -> bool:
    # 0 == False and 1 == True in Python: the JSON types must match too
    return type(value) is type(neutral) and value == neutral


class TextPart(_Strict):
    type: Literal["text"]
    text: StrictStr


Content = Annotated[
    Annotated[StrictStr, Tag(ONE)] | Annotated[list[TextPart], Tag(MANY)],
    Discriminator(
        _shape,
        custom_error_type="invalid_type",
        custom_error_message="must be a string or a list of text parts",
    ),
]


class ChatMessage(_Strict, _Neutral):
    UNSUPPORTED: ClassVar[Mapping[str, tuple[Any, ...]]] = {
        "tool_calls": ([],),
        "function_call": (),
        "audio": (),
        "refusal": (),
        "annotations": ([],),
    }

    role: Literal["system", "developer", "user", "assistant"] = Field(
        description="`developer` is served as `system`; tool and function messages are "
        "not supported"
    )
    content: Content = Field(description="A string, or a list of text parts (joined)")
    name: StrictStr | None = Field(default=None, description="Accepted and ignored")

    @model_validator(mode="before")
    @classmethod
    def _refuse(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("role") in ("tool", "function"):
            raise _unsupported("role", f"{data['role']!r} messages need tools")
        if isinstance(data, dict) and isinstance(data.get("content"), list):
            for part in data["content"]:
                if isinstance(part, dict) and part.get("type") not in ("text", None):
                    raise _unsupported("content", f"{part['type']} parts: send text only")
        return cls._drop_neutral(data)

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def as_prompt(self) -> dict[str, str]:
        """What the chat template takes: ``{"role", "content"}``."""
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text}


class GenerationFields(_Strict, _Neutral):
    """The fields both routes take."""

    model: StrictStr = Field(
        min_length=1, max_length=256, description="A generative cascade from GET /v1/models"
    )
    stream: StrictBool = Field(default=False, description="Answer as server-sent events")
    stream_options: StreamOptions | None = Field(default=None, description="Only with stream")
    max_tokens: StrictInt | None = Field(
        default=None,
        ge=1,
        description="The most new tokens; clamped to the version's max_new_tokens (the "
        "clamp is reported in `protege`); default: that maximum",
    )
    temperature: StrictFloat | None = Field(
        default=None,
        ge=0,
        le=2,
        description="0 (protege's default) is greedy: thresholds are calibrated on greedy "
        "answers, and only then does the teacher start from the student's draft",
    )
    top_p: StrictFloat | None = Field(default=None, gt=0, le=1, description="Nucleus sampling")
    stop: Stop | None = Field(  # type: ignore[valid-type]
        default=None, description="Up to 4 strings that end the answer (left out of it)"
    )
    seed: StrictInt | None = Field(
        default=None, ge=SEED_MIN, le=SEED_MAX, description="Repeatable sampling, best effort"
    )
    user: StrictStr | None = Field(default=None, description="Accepted and ignored")
    protege: ProtegeOptions | None = Field(
        default=None, description="protege's routing overrides (need a key allowed them)"
    )

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        data = cls._drop_neutral(data)
        if isinstance(data, dict):  # 3.0 is the integer 3, as JSON Schema counts it
            whole = ("max_tokens", "max_completion_tokens", "seed", "top_logprobs", "logprobs")
            data = {k: _whole(v) if k in whole else v for k, v in data.items()}
        return data

    @property
    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def overrides(self) -> list[str]:
        return self.protege.overrides if self.protege else []

    @property
    def new_tokens(self) -> int | None:
        """The new tokens asked for (None: the version's maximum)."""
        return self.max_tokens

    @property
    def top_logprobs_k(self) -> int | None:
        """None: no log-probabilities; k >= 0: each token's, with the top k."""
        raise NotImplementedError

    prompt_param: ClassVar[str] = "prompt"
    """The field holding the prompt (what a context_length_exceeded error names)."""

    def prompt_fields(self) -> dict[str, Any]:
        """The prompt as the generation service takes it: ``messages=`` or ``prompt=``."""
        raise NotImplementedError


PENALTIES = ("presence_penalty", "frequency_penalty")


class ChatCompletionRequest(GenerationFields):
    """``POST /v1/chat/completions``."""

    UNSUPPORTED: ClassVar[Mapping[str, tuple[Any, ...]]] = {
        "n": (1,),
        "presence_penalty": (0, 0.0),
        "frequency_penalty": (0, 0.0),
        "logit_bias": ({},),
        "tools": ([],),
        "tool_choice": ("none",),
        "functions": ([],),
        "function_call": ("none",),
        "parallel_tool_calls": (),
        "response_format": ({"type": "text"},),
        "audio": (),
        "modalities": (["text"],),
        "prediction": (),
        "reasoning_effort": (),
        "web_search_options": (),
        "store": (False,),
        "metadata": (),
        "service_tier": (),
    }

    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far")
    max_completion_tokens: StrictInt | None = Field(
        default=None, ge=1, description="The same as max_tokens (OpenAI's newer name)"
    )
    logprobs: StrictBool | None = Field(
        default=None, description="Return each answer token's log-probability"
    )
    top_logprobs: StrictInt | None = Field(
        default=None,
        ge=0,
        le=MAX_CHAT_TOP_LOGPROBS,
        description="The most likely tokens at each position (0-20); used only with logprobs: true",
    )

    @property
    def new_tokens(self) -> int | None:
        """The smaller of the two when both are sent: a JSON schema cannot tie them, so both
        are accepted, and neither budget is exceeded."""
        given = [n for n in (self.max_tokens, self.max_completion_tokens) if n is not None]
        return min(given) if given else None

    @property
    def top_logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    prompt_param: ClassVar[str] = "messages"

    def prompt_fields(self) -> dict[str, Any]:
        return {"messages": [m.as_prompt() for m in self.messages]}


class CompletionRequest(GenerationFields):
    """``POST /v1/completions`` (one prompt a request)."""

    UNSUPPORTED: ClassVar[Mapping[str, tuple[Any, ...]]] = {
        "n": (1,),
        "best_of": (1,),
        "echo": (False,),
        "suffix": ("",),
        "presence_penalty": (0, 0.0),
        "frequency_penalty": (0, 0.0),
        "logit_bias": ({},),
    }

    prompt: StrictStr = Field(min_length=1, description="One prompt (a list is refused)")
    logprobs: StrictInt | None = Field(
        default=None,
        ge=0,
        le=MAX_COMPLETION_LOGPROBS,
        description="Return each token's log-probability and the top N (0-5) at each position",
    )

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, value: Any) -> Any:
        if isinstance(value, list):
            raise _unsupported(None, "a list of prompts or of token ids: send one string")
        return value

    @property
    def top_logprobs_k(self) -> int | None:
        return self.logprobs

    def prompt_fields(self) -> dict[str, Any]:
        return {"prompt": self.prompt}


# --- responses ---------------------------------------------------------------------------


class ProtegeInfo(BaseModel):
    """protege's routing metadata of one answer. What is known when the tier is final is
    also in the ``x-protege-*`` headers (and on a stream's first chunk); the last fields
    only once the answer is finished (the body, a stream's last chunks)."""

    request_id: str
    tier: Tier = Field(description="The model that answered")
    escalated: bool = Field(
        description="The cascade chose the teacher (a `degraded` answer escalated, but the "
        "student answered)"
    )
    degraded: bool = Field(
        description="Escalated, but the teacher was busy, out of time, or failed before its "
        "first token: the student's answer stands"
    )
    reason: str | None = Field(
        description="Why it escalated: low_confidence or forced (null when kept)"
    )
    confidence: float | None = Field(
        description="The student's confidence over its own tokens (null: none, e.g. an "
        "empty answer, which always escalates)"
    )
    threshold: float = Field(description="Escalate when confidence < threshold")
    student_version: str
    teacher_version: str | None = Field(description="null until the teacher was asked once")
    draft: str = Field(
        description="Whether the teacher started from the student's draft: verified, or why "
        "not (not_asked, disabled, sampling, tokenizer, teacher, low_confidence ...)"
    )
    draft_tokens: int | None = Field(
        description="The draft's length, when the teacher verified it (else null)"
    )
    max_tokens: int = Field(description="The new-token budget the answer had, after the clamp")
    max_tokens_clamped: bool = Field(
        description="The request asked for more than the version's max_new_tokens"
    )
    prompt_tokens: int
    draft_accepted: int | None = Field(
        default=None, description="Draft tokens the teacher kept (when it verified one)"
    )
    accepted_draft_share: float | None = Field(
        default=None, description="draft_accepted / draft_tokens"
    )
    teacher_seconds: float | None = Field(
        default=None, description="The teacher's time for this answer"
    )
    teacher_seconds_saved: float | None = Field(
        default=None,
        description="The teacher's estimate of the time the draft saved (negative when a "
        "rejected draft cost more than none)",
    )
    logged: bool | None = Field(
        default=None,
        description="Whether this request's log record was written (false: the log could "
        "not be written, the answer stands; null: nothing to log)",
    )


class CompletionTokensDetails(BaseModel):
    """Who generated what. ``completion_tokens`` are the answer's, written by the tier that
    answered; an escalated answer also cost the student's draft, counted here apart."""

    student_tokens: int = Field(description="Tokens the student generated (its whole answer)")
    teacher_tokens: int = Field(description="Tokens of the teacher's answer (0: not asked)")
    accepted_prediction_tokens: int = Field(
        description="Draft tokens the teacher kept (OpenAI's name for a prediction's accepted "
        "tokens; 0 without a verified draft)"
    )
    rejected_prediction_tokens: int = Field(description="Draft tokens the teacher rejected")


class PromptTokensDetails(BaseModel):
    teacher_prompt_tokens: int = Field(
        description="The prompt in the teacher's tokens (0: not asked)"
    )


class Usage(BaseModel):
    prompt_tokens: int = Field(description="The prompt, in the student's tokens")
    completion_tokens: int = Field(description="Tokens of the answer returned")
    total_tokens: int
    completion_tokens_details: CompletionTokensDetails
    prompt_tokens_details: PromptTokensDetails


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    protege: ProtegeInfo


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChunkDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event's data (``data: {json}``); the stream ends with
    ``data: [DONE]``, or with ``data: {"error": {...}}`` if the answer failed midway."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    protege: ProtegeInfo | None = Field(
        default=None, description="On the first chunk (routing) and the last ones (all of it)"
    )


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason | None


class Completion(BaseModel):
    """The body, and each chunk of a stream (``usage`` and ``protege`` as in chat)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    protege: ProtegeInfo | None = None
