"""The door of the API: the API key and the body size, checked before a byte is parsed, and
every refused request counted.

A pure ASGI middleware in front of the FastAPI app. For paths under ``/v1/`` it
- authenticates the caller (``serving.access``; 401 before the body is read) and leaves the
  caller in ``scope["state"]["caller"]`` for the routes (which refuse overrides with 403);
- counts the body's bytes as they arrive and answers 413 once they pass the limit (a
  Content-Length check alone lets a chunked body through), before any JSON parsing;
- counts every 4xx answer, whoever gave it (itself, FastAPI's validation, a route), as a
  rejected request.
Its answers are in the route's error shape (``serving.error_shape``: OpenAI's on the
OpenAI-compatible routes). Health, readiness and the OpenAPI document stay open for probes
and tools.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.access import AccessError, Gatekeeper
from serving.error_shape import error_content, route_path

GUARDED_PREFIX = "/v1/"


class ClientGone(Exception):
    """The client disconnected before sending its whole body."""


class Guard:
    def __init__(
        self,
        app: ASGIApp,
        gatekeeper: Gatekeeper,
        max_body_bytes: int,
        on_reject: Callable[[], None],
    ) -> None:
        self.app = app
        self.gatekeeper = gatekeeper
        self.max_body_bytes = max_body_bytes
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not route_path(scope).startswith(GUARDED_PREFIX):
            await self.app(scope, receive, send)
            return
        send = self._counting(send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            caller = self.gatekeeper.caller(headers.get("authorization"))
        except AccessError as exc:
            extra = {"www-authenticate": 'Bearer realm="protege"'}
            content = error_content(scope, exc.status_code, str(exc), code="invalid_api_key")
            await answer(send, exc.status_code, content, extra)
            return
        scope.setdefault("state", {})["caller"] = caller
        try:
            body = await self._read_body(receive, headers.get("content-length"))
        except ClientGone:
            return  # nobody to answer, nothing to count
        if body is None:
            message = f"body: more than the maximum of {self.max_body_bytes} bytes per request"
            await answer(send, 413, error_content(scope, 413, message, code="body_too_large"))
            return
        await self.app(scope, replay(body, receive), send)

    def _counting(self, send: Send) -> Send:
        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start" and 400 <= message["status"] < 500:
                self.on_reject()
            await send(message)

        return counting_send

    async def _read_body(self, receive: Receive, declared: str | None) -> bytes | None:
        """The whole body, or None as soon as it is larger than the limit."""
        numeric = declared is not None and declared.isascii() and declared.isdigit()
        if numeric and int(declared) > self.max_body_bytes:  # type: ignore[arg-type]
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


def replay(body: bytes, then: Receive) -> Receive:
    """The body already read, as one message; then the connection's own messages."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await then()

    return receive


async def answer(
    send: Send, status: int, content: dict[str, Any], headers: dict[str, str] | None = None
) -> None:
    body = json.dumps(content).encode()
    raw: list[Any] = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
