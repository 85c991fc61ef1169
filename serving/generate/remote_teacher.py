"""A teacher behind an OpenAI-compatible server (vLLM, a hosted API, another protege).

:class:`RemoteTeacher` is a :class:`~serving.generate.teacher_engine.TeacherClient` that
streams an escalated answer from ``POST {url}/chat/completions`` (a chat) or
``{url}/completions`` (a completion prompt), asked with ``logprobs`` so that the log still
gets the teacher's top-k. Such an API offers no verification pass over a given draft, so
this teacher always generates from scratch (:class:`TeacherInfo` says it verifies no
drafts, and the response's ``draft`` metadata says ``teacher``).

The API names tokens by their text; the log stores token ids. A text is named by its id
when it reads ``token_id:N`` (vLLM's ``--return-tokens-as-token-ids``), or when
``tokenizer`` (a local copy of the served model's tokenizer) has exactly one token with
that text (:class:`TokenIds`); the record's top-k keeps the alternatives every position
names (see ``serving.generate.service``), and none without a tokenizer. A completion's
top-k is capped at 5, the legacy API's bound.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncGenerator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from serving.generate.generation import FinishReason
from serving.generate.teacher_engine import (
    TeacherChunk,
    TeacherDone,
    TeacherInfo,
    TeacherItem,
    TeacherRequest,
)

logger = logging.getLogger("ray.serve")
UNKNOWN_ID = -1  # a token text the local tokenizer cannot name: no top-k is logged
MAX_CHAT_TOP_LOGPROBS = 20  # OpenAI's bound on top_logprobs
MAX_COMPLETION_LOGPROBS = 5  # the legacy completions API's bound on logprobs
CONNECT_TIMEOUT_S = 10.0


class RemoteTeacherError(RuntimeError):
    """The remote teacher refused or broke an answer; the message says how."""


class TokenIds:
    """Token text -> id for the texts that name exactly one token of a tokenizer (a text
    shared by several ids, as the replacement character of partial UTF-8, names none)."""

    def __init__(self, tokenizer: Any) -> None:
        ids: dict[str, int] = {}
        shared: set[str] = set()
        for i in range(len(tokenizer)):
            text = str(tokenizer.decode([i], clean_up_tokenization_spaces=False))
            if text in ids:
                shared.add(text)
            ids[text] = i
        self._ids = {text: i for text, i in ids.items() if text not in shared}

    def __call__(self, text: str) -> int:
        return self._ids.get(text, UNKNOWN_ID)


def id_named(text: str) -> int:
    """The id in a ``token_id:N`` text (vLLM's ``--return-tokens-as-token-ids``)."""
    prefix, _, number = text.partition(":")
    return int(number) if prefix == "token_id" and number.isdigit() else UNKNOWN_ID


def api_key(variable: str | None) -> str | None:
    """The key in environment variable ``variable``; a named variable that is unset or
    empty is an error, never an unauthenticated call."""
    if variable is None:
        return None
    key = os.environ.get(variable, "")
    if not key:
        raise ValueError(
            f"the remote teacher's key variable {variable} is unset or empty: export it, "
            "or drop api_key_env for a server that needs no key"
        )
    return key


class RemoteTeacher:
    """:class:`~serving.generate.teacher_engine.TeacherClient` over an OpenAI-compatible
    server at ``url`` (ending in ``/v1``) serving ``model``."""

    def __init__(
        self,
        url: str,
        model: str,
        key: str | None = None,
        tokenizer_path: Path | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.model = model
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._tokenizer_path = tokenizer_path
        self._token_ids: TokenIds | None = None
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._info: TeacherInfo | None = None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:  # made in the loop that uses it
            timeout = httpx.Timeout(None, connect=CONNECT_TIMEOUT_S)  # the service times steps
            self._client = httpx.AsyncClient(
                headers=self._headers, timeout=timeout, transport=self._transport
            )
        return self._client

    async def info(self) -> TeacherInfo:
        """The model's entry in ``GET /models`` (an error when the server does not list
        it), and the token map once loaded."""
        if self._info is not None:
            return self._info
        response = await self._http().get(f"{self.url}/models")
        if response.status_code != 200:
            raise RemoteTeacherError(_refusal("GET /models", response.status_code, response.text))
        listed = [str(entry.get("id")) for entry in response.json().get("data", [])]
        if self.model not in listed:
            raise RemoteTeacherError(
                f"the remote teacher at {self.url} does not serve model {self.model!r}; "
                f"it lists {listed}"
            )
        if self._tokenizer_path is not None and self._token_ids is None:
            self._token_ids = await asyncio.to_thread(_load_token_ids, self._tokenizer_path)
        self._info = TeacherInfo(self.model, tokenizer_digest=None, verifies_drafts=False)
        return self._info

    async def stream(self, request: TeacherRequest) -> AsyncGenerator[TeacherItem, None]:
        began = time.perf_counter()
        chat = request.messages is not None
        path, body = self._body(request)
        answer = _Answer()
        async with self._http().stream("POST", f"{self.url}{path}", json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                raise RemoteTeacherError(_refusal(f"POST {path}", response.status_code, text))
            async for event in _events(response):
                if "error" in event:
                    raise RemoteTeacherError(f"the remote teacher failed mid-answer: {event}")
                answer.usage(event.get("usage"))
                for choice in event.get("choices") or []:
                    chunk = self._chunk(choice, request, chat)
                    answer.reason = choice.get("finish_reason") or answer.reason
                    if chunk is not None:
                        answer.tokens += len(chunk.logprobs)
                        yield chunk
        if answer.reason is None:
            raise RemoteTeacherError("the remote teacher's stream ended without a finish reason")
        yield TeacherDone(
            finish_reason=_finish(answer.reason),
            prompt_tokens=answer.prompt_tokens,
            completion_tokens=answer.completion_tokens or answer.tokens,
            version=self.model,
            seconds=time.perf_counter() - began,
        )

    def _body(self, request: TeacherRequest) -> tuple[str, dict[str, Any]]:
        settings = request.settings
        want = max(request.top_k, request.text_top_k or 0)
        body: dict[str, Any] = {
            "model": self.model,
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": settings.max_new_tokens,
            "temperature": settings.temperature,
            "top_p": settings.top_p,
        }
        if settings.stop:
            body["stop"] = list(settings.stop)
        if settings.seed is not None:
            body["seed"] = settings.seed
        if request.messages is not None:
            body["messages"] = [dict(m) for m in request.messages]
            body["logprobs"] = True
            body["top_logprobs"] = min(want, MAX_CHAT_TOP_LOGPROBS)
            return "/chat/completions", body
        body["prompt"] = request.prompt
        body["logprobs"] = min(want, MAX_COMPLETION_LOGPROBS)
        return "/completions", body

    def _chunk(
        self, choice: Mapping[str, Any], request: TeacherRequest, chat: bool
    ) -> TeacherChunk | None:
        if chat:
            text = str((choice.get("delta") or {}).get("content") or "")
            tokens = _chat_tokens(choice.get("logprobs"))
        else:
            text = str(choice.get("text") or "")
            tokens = _completion_tokens(choice.get("logprobs"))
        if not text and not tokens:
            return None
        name = self._name
        want = max(request.top_k, request.text_top_k or 0)
        top = [[(name(t), lp) for t, lp in alternatives[:want]] for _, _, alternatives in tokens]
        shown = request.text_top_k
        return TeacherChunk(
            text=text,
            token_ids=[name(token) for token, _, _ in tokens],
            logprobs=[logprob for _, logprob, _ in tokens],
            top_logprobs=top if want else None,
            tokens=None if shown is None else [token for token, _, _ in tokens],
            top_tokens=None
            if not shown
            else [[t for t, _ in alternatives[:want]] for _, _, alternatives in tokens],
        )

    def _name(self, text: str) -> int:
        token = id_named(text)
        if token == UNKNOWN_ID and self._token_ids is not None:
            return self._token_ids(text)
        return token


class _Answer:
    """What the stream told of the whole answer."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.tokens = 0  # counted from the log-probabilities
        self.prompt_tokens = 0
        self.completion_tokens = 0  # from the usage chunk, when the server sends one

    def usage(self, usage: Mapping[str, Any] | None) -> None:
        if usage:
            self.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            self.completion_tokens = int(usage.get("completion_tokens") or 0)


Token = tuple[str, float, list[tuple[str, float]]]  # text, log-probability, alternatives


def _chat_tokens(logprobs: Mapping[str, Any] | None) -> list[Token]:
    tokens: list[Token] = []
    for item in (logprobs or {}).get("content") or []:
        alternatives = sorted(  # most likely first, whatever the server's order
            ((str(a["token"]), float(a["logprob"])) for a in item.get("top_logprobs") or []),
            key=lambda pair: -pair[1],
        )
        tokens.append((str(item["token"]), float(item["logprob"]), alternatives))
    return tokens


def _completion_tokens(logprobs: Mapping[str, Any] | None) -> list[Token]:
    if not logprobs:
        return []
    texts: Sequence[str] = logprobs.get("tokens") or []
    values: Sequence[float] = logprobs.get("token_logprobs") or []
    tops: Sequence[Mapping[str, float] | None] = logprobs.get("top_logprobs") or [None] * len(texts)
    tokens: list[Token] = []
    for text, value, top in zip(texts, values, tops, strict=True):
        ranked = sorted((top or {}).items(), key=lambda pair: -pair[1])
        tokens.append((str(text), float(value), [(str(t), float(lp)) for t, lp in ranked]))
    return tokens


async def _events(response: httpx.Response) -> AsyncGenerator[dict[str, Any], None]:
    """The JSON objects of a server-sent event stream, until ``[DONE]``."""
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            return
        try:
            yield json.loads(data)
        except json.JSONDecodeError:
            raise RemoteTeacherError(
                f"the remote teacher sent an event that is not JSON: {data[:200]!r}"
            ) from None


def _finish(reason: str) -> FinishReason:
    return "length" if reason == "length" else "stop"


def _refusal(call: str, status: int, text: str) -> str:
    try:
        message = json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = text[:300]
    return f"the remote teacher answered {call} with {status}: {message}"


def _load_token_ids(path: Path) -> TokenIds:
    from serving.generate.models import load_tokenizer

    return TokenIds(load_tokenizer(path))
