"""A small typed client for the protege HTTP API (sync and async), on httpx.

    from serving.client import ProtegeClient
    with ProtegeClient("http://127.0.0.1:8000", api_key=None) as client:  # or your key
        result = client.classify(["Shares slide as oil prices jump"])
        print(result.outputs[0].label, result.outputs[0].tier)
        print(client.model().protege.student.version)  # the classification cascade's entry

It retries 502/503/504 answers and refused connections with exponential backoff (a
replica starting or draining; at least the ``Retry-After`` an overloaded gateway sends),
never a 4xx: those raise :class:`ProtegeError` with the
server's message.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from typing import Any

import httpx

from serving.schemas import CLASSIFY_CASCADE, ClassifyResponse, ModelEntry, ModelList, Tier

RETRY_STATUS = frozenset({502, 503, 504})


class ProtegeError(RuntimeError):
    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(f"HTTP {status_code}: {message}")
        self.status_code = status_code
        self.message = message


def _body(
    inputs: str | Sequence[str],
    threshold: float | None,
    force_tier: Tier | None,
    model: str | None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"inputs": inputs if isinstance(inputs, str) else list(inputs)}
    if model is not None:
        body["model"] = model
    if threshold is not None:
        body["threshold"] = threshold
    if force_tier is not None:
        body["force_tier"] = force_tier
    return body


def _headers(request_id: str | None) -> dict[str, str]:
    """One request id per call, kept across its retries: a retried escalation shows in the
    log as two records under one request id."""
    return {"x-request-id": request_id or uuid.uuid4().hex}


def _auth(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _delay(backoff_s: float, attempt: int, response: httpx.Response | None) -> float:
    """Exponential backoff, or longer when the server's Retry-After asks for it."""
    delay = backoff_s * 2**attempt
    after = response.headers.get("retry-after", "") if response is not None else ""
    return max(delay, float(after)) if after.isdigit() else delay


def _checked(response: httpx.Response) -> Any:
    if response.is_success:
        return response.json()
    try:
        message = response.json().get("error", response.text)
    except ValueError:
        message = response.text
    if isinstance(message, dict):  # OpenAI's shape (the OpenAI-compatible routes)
        message = message.get("message", response.text)
    raise ProtegeError(response.status_code, str(message))


class ProtegeClient:
    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        retries: int = 4,
        backoff_s: float = 0.2,
    ) -> None:
        self._http = httpx.Client(base_url=base_url, timeout=timeout, headers=_auth(api_key))
        self.retries, self.backoff_s = retries, backoff_s

    def classify(
        self,
        inputs: str | Sequence[str],
        *,
        threshold: float | None = None,
        force_tier: Tier | None = None,
        request_id: str | None = None,
        model: str | None = None,
    ) -> ClassifyResponse:
        response = self._send(
            "POST",
            "/v1/classify",
            json=_body(inputs, threshold, force_tier, model),
            headers=_headers(request_id),
        )
        return ClassifyResponse.model_validate(_checked(response))

    def models(self) -> ModelList:
        """Every cascade the gateway hosts (``GET /v1/models``)."""
        return ModelList.model_validate(_checked(self._send("GET", "/v1/models")))

    def model(self, name: str = CLASSIFY_CASCADE) -> ModelEntry:
        """The ``/v1/models`` entry of cascade ``name`` (its versions, threshold, swap state
        under ``.protege``); a LookupError naming the hosted cascades when there is none."""
        return self.models().entry(name)

    def ready(self) -> bool:
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"gateway at {self._http.base_url} not ready after {timeout_s} s"
                )
            time.sleep(0.25)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ProtegeClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        for attempt in range(self.retries + 1):
            response = None
            try:
                response = self._http.request(method, url, **kwargs)
                if response.status_code not in RETRY_STATUS or attempt == self.retries:
                    return response
            except httpx.ConnectError:
                if attempt == self.retries:
                    raise
            time.sleep(_delay(self.backoff_s, attempt, response))
        raise AssertionError("unreachable")


class AsyncProtegeClient:
    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        retries: int = 4,
        backoff_s: float = 0.2,
        max_connections: int = 100,
    ) -> None:
        limits = httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        )
        self._http = httpx.AsyncClient(
            base_url=base_url, timeout=timeout, limits=limits, headers=_auth(api_key)
        )
        self.retries, self.backoff_s = retries, backoff_s

    async def classify(
        self,
        inputs: str | Sequence[str],
        *,
        threshold: float | None = None,
        force_tier: Tier | None = None,
        request_id: str | None = None,
        model: str | None = None,
    ) -> ClassifyResponse:
        response = await self._send(
            "POST",
            "/v1/classify",
            json=_body(inputs, threshold, force_tier, model),
            headers=_headers(request_id),
        )
        return ClassifyResponse.model_validate(_checked(response))

    async def models(self) -> ModelList:
        """Every cascade the gateway hosts (``GET /v1/models``)."""
        return ModelList.model_validate(_checked(await self._send("GET", "/v1/models")))

    async def model(self, name: str = CLASSIFY_CASCADE) -> ModelEntry:
        """The ``/v1/models`` entry of cascade ``name``; a LookupError naming the hosted
        cascades when there is none."""
        return (await self.models()).entry(name)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncProtegeClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def _send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        for attempt in range(self.retries + 1):
            response = None
            try:
                response = await self._http.request(method, url, **kwargs)
                if response.status_code not in RETRY_STATUS or attempt == self.retries:
                    return response
            except httpx.ConnectError:
                if attempt == self.retries:
                    raise
            await asyncio.sleep(_delay(self.backoff_s, attempt, response))
        raise AssertionError("unreachable")
