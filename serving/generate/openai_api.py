"""The OpenAI-compatible routes: ``POST /v1/chat/completions`` and ``POST /v1/completions``.

Thin routes over a generative cascade (:class:`Generator`, the generation service): the
request is validated (:mod:`serving.generate.openai_schemas`), the prompt rendered and
measured (a prompt over the version's limit is a 400 ``context_length_exceeded``, never
cut), and the service's events turned into OpenAI's objects:

- ``Routed`` comes first, once the tier is final: its metadata goes into the
  ``x-protege-*`` headers and the ``protege`` field. A stream's headers leave with its
  first byte, so a stream never starts before the tier is known;
- ``TextDelta`` is a piece of the answer (a chunk when streaming);
- ``Finished`` ends it (finish reason, usage); ``Failed`` after the first byte of a stream
  is an error event, ``data: {"error": {...}}`` (which OpenAI's client raises as an
  ``APIError``), and the stream ends without ``data: [DONE]``.

Every error these routes write is in OpenAI's shape (``{"error": {"message", "type",
"param", "code"}}``, :mod:`serving.generate.openai_errors`), validation errors included
(a 400 naming the parameter). A client that leaves closes the service's stream (shielded from the
cancellation), so the service can log the request as cancelled.

No ``from __future__ import annotations``: FastAPI reads the route signatures.
"""

import logging
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from typing import Annotated, Any, Protocol

import anyio
from fastapi import APIRouter, FastAPI, Header, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.types import Receive, Scope, Send

from serving.access import Caller, Gatekeeper
from serving.config import LimitsConfig
from serving.errors import NotHosted
from serving.generate.events import (
    Event,
    Failed,
    Finished,
    GenerationRequest,
    PromptTooLong,
    Routed,
    TextDelta,
)
from serving.generate.generation import SamplingSettings
from serving.generate.models import Message
from serving.generate.openai_errors import (
    OpenAIFailure,
    OpenAIRoute,
    internal_error,
    openai_responses,
)
from serving.generate.openai_format import (
    DONE,
    ChatFormat,
    CompletionFormat,
    Format,
    ScoredToken,
    metadata_headers,
    sse,
)
from serving.generate.openai_schemas import (
    DEFAULT_TEMPERATURE,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    CompletionTokensDetails,
    GenerationFields,
    PromptTokensDetails,
    ProtegeInfo,
    ProtegeOptions,
    Usage,
)

logger = logging.getLogger("ray.serve")
MAX_TIMEOUT_MS = 600_000
CHAT_PATH, COMPLETIONS_PATH = "/v1/chat/completions", "/v1/completions"
GENERATE_KIND = "generate"


class Generator(Protocol):
    """What the routes need of one generative cascade (the generation service)."""

    def prompt_ids(
        self, messages: Sequence[Message] | None = None, prompt: str | None = None
    ) -> list[int]:
        """The prompt's token ids; :class:`PromptTooLong` beyond the version's limit."""
        ...

    def max_new_tokens(self) -> int:
        """The serving version's most new tokens (a request's max_tokens is clamped to it)."""
        ...

    def stream(self, request: GenerationRequest) -> AsyncIterator[Event]:
        """``Routed`` once the tier is final, then ``TextDelta``s, then ``Finished`` or
        ``Failed``."""
        ...


class OpenAIBackend(Protocol):
    """What the routes need of the replica."""

    def hosted(self) -> dict[str, str]:
        """Every cascade this gateway hosts: its name (model id) to its kind."""
        ...

    def generator(self, name: str) -> Generator:
        """The generative cascade ``name`` (one that :meth:`hosted` lists as generate)."""
        ...

    def request_id(self, given: str | None) -> str: ...


# --- the routes ---------------------------------------------------------------------------


RequestId = Annotated[str, Header(max_length=128)]
TimeoutMs = Annotated[
    int,
    Header(
        ge=1,
        le=MAX_TIMEOUT_MS,
        description="The most this client waits, in ms: the teacher is waited on for its "
        "first token only while time is left, then the student's answer is returned, "
        "marked degraded",
    ),
]


def add_openai_routes(
    api: FastAPI,
    backend: OpenAIBackend,
    limits: LimitsConfig,
    gatekeeper: Gatekeeper,
    auth: list[Any],
) -> None:
    """Add ``POST /v1/chat/completions`` and ``POST /v1/completions`` to ``api``.

    ``auth`` documents the key in the OpenAPI document (the guard checks it before the
    body is read); ``gatekeeper`` decides who may send routing overrides."""
    router = APIRouter(route_class=OpenAIRoute, dependencies=auth)
    keys = gatekeeper.enabled

    @router.post(
        CHAT_PATH,
        response_model=ChatCompletion,
        responses=openai_responses(limits, keys, "chat completion"),
    )
    async def chat_completions(
        body: ChatCompletionRequest,
        request: Request,
        # headers typed without None so the schema says what one holds
        x_request_id: RequestId = None,  # type: ignore[assignment]
        x_protege_timeout_ms: TimeoutMs = None,  # type: ignore[assignment]
    ) -> Response:
        return await _answer(backend, gatekeeper, body, request, x_request_id, x_protege_timeout_ms)

    @router.post(
        COMPLETIONS_PATH,
        response_model=Completion,
        responses=openai_responses(limits, keys, "completion"),
    )
    async def completions(
        body: CompletionRequest,
        request: Request,
        x_request_id: RequestId = None,  # type: ignore[assignment]
        x_protege_timeout_ms: TimeoutMs = None,  # type: ignore[assignment]
    ) -> Response:
        return await _answer(backend, gatekeeper, body, request, x_request_id, x_protege_timeout_ms)

    api.include_router(router)


# --- one request: the prompt, the service's events, the answer ----------------------------


def _generator(backend: OpenAIBackend, name: str) -> Generator:
    hosted = backend.hosted()
    if hosted.get(name) != GENERATE_KIND:
        raise NotHosted(name, GENERATE_KIND, hosted)
    return backend.generator(name)


def _prompt_ids(generator: Generator, body: GenerationFields) -> list[int]:
    """The prompt's token ids; a prompt over the version's limit is a 400, never cut."""
    try:
        return generator.prompt_ids(**body.prompt_fields())
    except PromptTooLong as exc:
        raise _too_long(body, exc) from None
    except ValueError as exc:  # e.g. a chat to a model without a chat template
        raise OpenAIFailure(400, f"{body.prompt_param}: {exc}", body.prompt_param) from None


def _too_long(body: GenerationFields, exc: PromptTooLong) -> OpenAIFailure:
    param = body.prompt_param
    return OpenAIFailure(400, f"{param}: {exc}", param, "context_length_exceeded")


def _settings(body: GenerationFields, limit: int) -> SamplingSettings:
    asked = body.new_tokens
    return SamplingSettings(
        max_new_tokens=limit if asked is None else min(asked, limit),
        temperature=DEFAULT_TEMPERATURE if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        stop=body.stops,
        seed=body.seed,
    )


def _format(body: GenerationFields, request_id: str) -> Format:
    created = int(time.time())
    if isinstance(body, ChatCompletionRequest):
        return ChatFormat(f"chatcmpl-{request_id}", created, body.model, body.include_usage)
    return CompletionFormat(f"cmpl-{request_id}", created, body.model, body.include_usage)


async def _answer(
    backend: OpenAIBackend,
    gatekeeper: Gatekeeper,
    body: GenerationFields,
    request: Request,
    given_id: str | None,
    timeout_ms: int | None,
) -> Response:
    generator = _generator(backend, body.model)
    caller: Caller = request.scope["state"]["caller"]
    gatekeeper.check_overrides(caller, body.overrides)
    request_id = backend.request_id(given_id)
    options = body.protege or ProtegeOptions()
    generation = GenerationRequest(
        request_id=request_id,
        prompt_ids=_prompt_ids(generator, body),
        settings=_settings(body, generator.max_new_tokens()),
        logprobs=body.top_logprobs_k,
        force_tier=options.force_tier,
        threshold=options.threshold,
        deadline=None if timeout_ms is None else time.monotonic() + timeout_ms / 1000,
        requested_max_tokens=body.new_tokens,
        **body.prompt_fields(),
    )
    fmt = _format(body, request_id)
    events: AsyncIterator[Event] | None = generator.stream(generation)
    try:
        assert events is not None
        try:
            first = await anext(events, None)
        except PromptTooLong as exc:  # a swap to a version with a lower limit
            raise _too_long(body, exc) from None
        if not isinstance(first, Routed):
            raise RuntimeError(f"the generation service sent {first!r} before Routed")
        info = _info(first, request_id)
        want_logprobs = body.top_logprobs_k is not None
        if body.stream:
            stream, events = _stream(events, fmt, info, want_logprobs, body.include_usage), None
            return EventStream(stream, metadata_headers(info))
        return await _whole(events, fmt, info, want_logprobs)
    finally:
        if events is not None:  # not handed to a stream: this request is done with it
            await _close(events)


async def _whole(
    events: AsyncIterator[Event], fmt: Format, info: ProtegeInfo, want_logprobs: bool
) -> Response:
    """The answer as one body, once it is finished."""
    texts: list[str] = []
    tokens: list[ScoredToken] | None = [] if want_logprobs else None
    headers = metadata_headers(info)
    async for event in events:
        if isinstance(event, TextDelta):
            texts.append(event.text)
            if tokens is not None:
                tokens += _scored(event)
        elif isinstance(event, Finished):
            final = _finished_info(info, event)
            content = fmt.body("".join(texts), tokens, event.finish_reason, _usage(event), final)
            return JSONResponse(content, headers=metadata_headers(final))
        elif isinstance(event, Failed):
            return _failure(event).response(headers)
    return _unfinished().response(headers)


async def _stream(
    events: AsyncIterator[Event],
    fmt: Format,
    info: ProtegeInfo,
    want_logprobs: bool,
    include_usage: bool,
) -> AsyncGenerator[bytes, None]:
    """The answer as server-sent events; a failure after the first byte is an error event
    and the end of the stream (no ``[DONE]``)."""
    try:
        yield fmt.first_chunk(info)
        async for event in events:
            if isinstance(event, TextDelta):
                scored = _scored(event) if want_logprobs else None
                if event.text or scored:
                    yield fmt.text_chunk(event.text, scored)
            elif isinstance(event, Finished):
                final = _finished_info(info, event)
                yield fmt.last_chunk(event.finish_reason, final)
                if include_usage:
                    yield fmt.usage_chunk(_usage(event), final)
                yield DONE
                return
            elif isinstance(event, Failed):
                yield sse(_failure(event).body())
                return
        yield sse(_unfinished().body())
    except Exception:
        logger.exception("a generation stream failed after its first byte")
        yield sse(internal_error().body())
    finally:
        await _close(events)


class EventStream(StreamingResponse):
    """Server-sent events that are closed when the response ends, however it ends: a
    client that leaves cancels the response mid-send, and Starlette leaves the events to
    the garbage collector; closing them here, shielded, runs the service's cleanup now."""

    def __init__(self, events: AsyncGenerator[bytes, None], headers: Mapping[str, str]) -> None:
        headers = {**headers, "cache-control": "no-cache"}
        super().__init__(events, media_type="text/event-stream", headers=headers)
        self._events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await _close(self._events)


async def _close(events: AsyncIterator[Any]) -> None:
    """Close the service's stream, also when the request is being cancelled (a client that
    left): the service logs the request then, and that must not be cut short."""
    close = getattr(events, "aclose", None)
    if close is not None:
        with anyio.CancelScope(shield=True):
            await close()


def _unfinished() -> OpenAIFailure:
    logger.error("the generation service's stream ended before Finished or Failed")
    return internal_error()


# --- the service's events as OpenAI's fields ------------------------------------------------


def _info(routed: Routed, request_id: str) -> ProtegeInfo:
    verified = routed.draft == "verified"
    return ProtegeInfo(
        request_id=request_id,
        tier=routed.tier,
        escalated=routed.escalated,
        degraded=routed.degraded,
        reason=routed.reason,
        confidence=routed.confidence if math.isfinite(routed.confidence) else None,
        threshold=routed.threshold,
        student_version=routed.student_version,
        teacher_version=routed.teacher_version,
        draft=routed.draft,
        draft_tokens=routed.draft_tokens if verified else None,
        max_tokens=routed.max_new_tokens,
        max_tokens_clamped=routed.clamped,
        prompt_tokens=routed.prompt_tokens,
    )


def _finished_info(info: ProtegeInfo, finished: Finished) -> ProtegeInfo:
    usage = finished.usage
    return info.model_copy(
        update={
            "draft_accepted": usage.draft_accepted,
            "accepted_draft_share": usage.accepted_draft_share,
            "teacher_seconds": usage.teacher_seconds,
            "teacher_seconds_saved": usage.teacher_seconds_saved,
            "logged": finished.logged,
        }
    )


def _usage(finished: Finished) -> Usage:
    usage = finished.usage
    return Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
        completion_tokens_details=CompletionTokensDetails(
            student_tokens=usage.student_tokens,
            teacher_tokens=usage.teacher_tokens,
            accepted_prediction_tokens=usage.draft_accepted or 0,
            rejected_prediction_tokens=usage.draft_rejected or 0,
        ),
        prompt_tokens_details=PromptTokensDetails(
            teacher_prompt_tokens=usage.teacher_prompt_tokens
        ),
    )


def _failure(failed: Failed) -> OpenAIFailure:
    """The teacher failed after its first token (its reason is in the replica's log, never
    in the answer)."""
    if failed.kind == "timeout":
        return OpenAIFailure(
            504,
            "the teacher ran out of time mid-answer: the answer is cut short; retry, with a "
            "longer x-protege-timeout-ms if you set one",
            code="teacher_timeout",
        )
    return OpenAIFailure(
        502,
        "the teacher failed mid-answer: the answer is cut short; retry (the replica's log "
        "says why)",
        code="teacher_failed",
    )


def _scored(delta: TextDelta) -> list[ScoredToken]:
    return [ScoredToken(t.token, t.logprob, list(t.top)) for t in delta.logprobs or ()]
