"""OpenAI's objects from a generative answer: bodies, stream chunks, SSE framing, headers.

Pure functions of what the generation service reported, one formatter a request (a
completion's ``text_offset`` runs across chunks). The shapes follow OpenAI's API field
for field, so OpenAI's own client parses them; protege's routing metadata rides along in
``protege`` (:class:`~serving.generate.openai_schemas.ProtegeInfo`) and the
``x-protege-*`` headers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from serving.generate.openai_schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatLogprobs,
    ChunkDelta,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    FinishReason,
    ProtegeInfo,
    TokenLogprob,
    TopLogprob,
    Usage,
)


@dataclass(frozen=True)
class ScoredToken:
    """One answer token's text and log-probability, with the most likely at its position."""

    token: str
    logprob: float
    top: Sequence[tuple[str, float]] = ()


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event: ``data: {json}`` and a blank line."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


DONE = sse("[DONE]")


def metadata_headers(info: ProtegeInfo) -> dict[str, str]:
    """The routing metadata known when the tier is final, as ``x-protege-*`` headers
    (absent: the field is null)."""
    answering = info.student_version if info.tier == "student" else info.teacher_version
    fields: dict[str, object] = {
        "tier": info.tier,
        "escalated": info.escalated,
        "degraded": info.degraded,
        "reason": info.reason,
        "confidence": info.confidence,
        "threshold": info.threshold,
        "model-version": answering,
        "student-version": info.student_version,
        "teacher-version": info.teacher_version,
        "draft": info.draft,
        "draft-tokens": info.draft_tokens,
        "max-tokens": info.max_tokens,
        "max-tokens-clamped": info.max_tokens_clamped,
        "prompt-tokens": info.prompt_tokens,
    }
    return {f"x-protege-{k}": _header(v) for k, v in fields.items() if v is not None}


def _header(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    text = repr(value) if isinstance(value, float) else str(value)
    # header values are latin-1: anything else is replaced, never an error
    return text.encode("latin-1", "replace").decode("latin-1")


def _dump(model: Any, keep_usage: bool) -> dict[str, Any]:
    out: dict[str, Any] = model.model_dump(mode="json")
    if out.get("protege") is None:
        out.pop("protege", None)
    if out.get("usage") is None and not keep_usage:
        out.pop("usage", None)
    return out


@dataclass
class ChatFormat:
    """``chat.completion`` and ``chat.completion.chunk`` objects of one request."""

    id: str
    created: int
    model: str
    include_usage: bool = False

    def _logprobs(self, tokens: Sequence[ScoredToken] | None) -> ChatLogprobs | None:
        if tokens is None:
            return None
        return ChatLogprobs(
            content=[
                TokenLogprob(
                    token=t.token,
                    logprob=t.logprob,
                    bytes=list(t.token.encode()),
                    top_logprobs=[
                        TopLogprob(token=s, logprob=lp, bytes=list(s.encode())) for s, lp in t.top
                    ],
                )
                for t in tokens
            ]
        )

    def body(
        self,
        text: str,
        tokens: Sequence[ScoredToken] | None,
        finish_reason: FinishReason,
        usage: Usage,
        info: ProtegeInfo,
    ) -> dict[str, Any]:
        choice = ChatChoice(
            message=AssistantMessage(content=text),
            logprobs=self._logprobs(tokens),
            finish_reason=finish_reason,
        )
        completion = ChatCompletion(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[choice],
            usage=usage,
            protege=info,
        )
        return _dump(completion, keep_usage=True)

    def _chunk(
        self,
        choices: list[ChatChunkChoice],
        info: ProtegeInfo | None = None,
        usage: Usage | None = None,
    ) -> bytes:
        chunk = ChatCompletionChunk(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=choices,
            usage=usage,
            protege=info,
        )
        out = _dump(chunk, keep_usage=self.include_usage)
        for choice in out["choices"]:  # as OpenAI's: a delta holds only what it changes
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
        return sse(out)

    def first_chunk(self, info: ProtegeInfo) -> bytes:
        return self._chunk([ChatChunkChoice(delta=ChunkDelta(role="assistant", content=""))], info)

    def text_chunk(self, text: str, tokens: Sequence[ScoredToken] | None) -> bytes:
        delta = ChunkDelta(content=text)
        return self._chunk([ChatChunkChoice(delta=delta, logprobs=self._logprobs(tokens))])

    def last_chunk(self, finish_reason: FinishReason, info: ProtegeInfo) -> bytes:
        return self._chunk([ChatChunkChoice(delta=ChunkDelta(), finish_reason=finish_reason)], info)

    def usage_chunk(self, usage: Usage, info: ProtegeInfo) -> bytes:
        return self._chunk([], info, usage)


@dataclass
class CompletionFormat:
    """``text_completion`` objects of one request (the body and each chunk)."""

    id: str
    created: int
    model: str
    include_usage: bool = False
    _offset: int = field(default=0, repr=False)  # where the next token starts in the answer

    def _logprobs(self, tokens: Sequence[ScoredToken] | None) -> CompletionLogprobs | None:
        if tokens is None:
            return None
        offsets = []
        for t in tokens:
            offsets.append(self._offset)
            self._offset += len(t.token)
        return CompletionLogprobs(
            tokens=[t.token for t in tokens],
            token_logprobs=[t.logprob for t in tokens],
            top_logprobs=[dict(t.top) for t in tokens],
            text_offset=offsets,
        )

    def _completion(
        self,
        text: str,
        tokens: Sequence[ScoredToken] | None,
        finish_reason: FinishReason | None,
        usage: Usage | None = None,
        info: ProtegeInfo | None = None,
        choices: bool = True,
    ) -> Completion:
        choice = CompletionChoice(
            text=text, logprobs=self._logprobs(tokens), finish_reason=finish_reason
        )
        return Completion(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[choice] if choices else [],
            usage=usage,
            protege=info,
        )

    def body(
        self,
        text: str,
        tokens: Sequence[ScoredToken] | None,
        finish_reason: FinishReason,
        usage: Usage,
        info: ProtegeInfo,
    ) -> dict[str, Any]:
        return _dump(self._completion(text, tokens, finish_reason, usage, info), keep_usage=True)

    def first_chunk(self, info: ProtegeInfo) -> bytes:
        return sse(_dump(self._completion("", None, None, info=info), self.include_usage))

    def text_chunk(self, text: str, tokens: Sequence[ScoredToken] | None) -> bytes:
        return sse(_dump(self._completion(text, tokens, None), self.include_usage))

    def last_chunk(self, finish_reason: FinishReason, info: ProtegeInfo) -> bytes:
        return sse(_dump(self._completion("", None, finish_reason, info=info), self.include_usage))

    def usage_chunk(self, usage: Usage, info: ProtegeInfo) -> bytes:
        completion = self._completion("", None, None, usage, info, choices=False)
        return sse(_dump(completion, keep_usage=True))


Format = ChatFormat | CompletionFormat
