"""The HTTP API of a gateway replica: thin routes over the replica, behind the guard.

Built per replica (``Gateway.__serve_build_asgi_app__``) because its schema carries the
configured limits, and its OpenAPI document lists every answer a route gives, with its body.
No ``from __future__ import annotations`` here: FastAPI reads the route signatures, and the
request model is made at run time.
"""

import logging
import time
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Protocol

from fastapi import Depends, FastAPI, Header, Request, Response
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel, Field

from serving.access import Caller, Gatekeeper
from serving.classify.service import Answer, Routing
from serving.config import LimitsConfig
from serving.errors import NotHosted, install_error_handlers
from serving.guard import Guard
from serving.schemas import (
    ClassifyResponse,
    ErrorBody,
    ModelList,
    OpenAIError,
    OpenAIErrorBody,
    request_model,
)

logger = logging.getLogger("ray.serve")
MAX_TIMEOUT_MS = 600_000
MODELS_UNAVAILABLE = "teacher unavailable: try again shortly (the replica's log says why)"


class Readiness(BaseModel):
    status: str = Field(description="'ready' or 'not ready'")
    reason: str | None = Field(default=None, description="Why not ready")
    student: str | None = None
    teacher: str | None = None


class Backend(Protocol):
    """What the routes need from the replica."""

    async def classify(self, texts: list[str], request_id: str, routing: Routing) -> Answer: ...

    async def models(self) -> ModelList: ...

    def hosted(self) -> dict[str, str]:
        """Every cascade this gateway hosts: its name (model id) to its kind."""
        ...

    async def readiness(self) -> Readiness: ...

    def request_id(self, given: str | None) -> str: ...


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorBody, "description": description}


def _serve_text(description: str) -> dict[str, Any]:
    """An answer Ray Serve's proxy gives before the request reaches a replica (plain text)."""
    return {"description": description, "content": {"text/plain": {"schema": {"type": "string"}}}}


def classify_responses(limits: LimitsConfig, auth: bool) -> dict[int | str, dict[str, Any]]:
    responses: dict[int | str, dict[str, Any]] = {
        400: _error("The body is not JSON"),
        413: _error(f"The body is larger than {limits.body_bytes} bytes"),
        422: _error(
            f"The body breaks the schema: 1 to {limits.max_inputs} texts of 1 to "
            f"{limits.max_chars} characters, not only whitespace; a bad header"
        ),
        503: _serve_text(
            "Overloaded: the replica's queue is full (max_queued_requests); retry after the "
            "Retry-After header's seconds"
        ),
        408: _serve_text("Not answered within the request timeout (request_timeout_s)"),
    }
    responses[403] = _error("Routing overrides (force_tier, threshold) are not allowed")
    responses[404] = _error(
        "`model` names no classification cascade this gateway hosts (or, without `model`, "
        "the gateway hosts none); the message names the models hosted"
    )
    if auth:
        responses[401] = _error("No API key, or one that is not recognised")
    return responses


RouteAdder = Callable[[FastAPI, list[Any]], None]
"""Adds a kind's own routes to the app, given the dependencies that document the key (the
generative cascade's OpenAI-compatible routes)."""


def build_api(
    backend: Backend,
    limits: LimitsConfig,
    gatekeeper: Gatekeeper,
    on_reject: Callable[[], None],
    routes: Sequence[RouteAdder] = (),
) -> FastAPI:
    api = FastAPI(
        title="protege",
        summary="A student answers; the unsure inputs escalate to the teacher.",
        version="1",
    )
    install_error_handlers(api)
    # documents the key (the guard checks it before the body is read)
    auth = [Depends(HTTPBearer(auto_error=False))] if gatekeeper.enabled else []
    _add_probes(api, backend)
    _add_models(api, backend, auth, gatekeeper.enabled)
    _add_classify(api, backend, limits, gatekeeper, auth)
    for add in routes:
        add(api, auth)
    api.add_middleware(
        Guard, gatekeeper=gatekeeper, max_body_bytes=limits.body_bytes, on_reject=on_reject
    )
    return api


def _add_probes(api: FastAPI, backend: Backend) -> None:
    @api.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @api.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
    async def readyz() -> Any:
        state = await backend.readiness()
        return JSONResponse(state.model_dump(), status_code=200 if state.status == "ready" else 503)


def _openai_error(description: str) -> dict[str, Any]:
    return {"model": OpenAIErrorBody, "description": description}


def _add_models(api: FastAPI, backend: Backend, auth: list[Any], keys: bool) -> None:
    """OpenAI's list of models: one entry per cascade, protege's fields in ``protege``."""
    responses: dict[int | str, dict[str, Any]] = {
        503: _openai_error("The teacher is not reachable")
    }
    if keys:
        responses[401] = _openai_error("No API key, or one that is not recognised")

    @api.get("/v1/models", response_model=ModelList, dependencies=auth, responses=responses)
    async def models() -> Any:
        try:
            return await backend.models()
        except Exception:  # the teacher is not up (yet): its error is logged, never returned
            logger.warning("/v1/models: the teacher is unavailable", exc_info=True)
            error = OpenAIError(
                message=MODELS_UNAVAILABLE, type="server_error", code="teacher_unavailable"
            )
            return JSONResponse(OpenAIErrorBody(error=error).model_dump(), status_code=503)


def _add_classify(
    api: FastAPI, backend: Backend, limits: LimitsConfig, gatekeeper: Gatekeeper, auth: list[Any]
) -> None:
    body_model = request_model(limits.max_inputs, limits.max_chars)

    @api.post(
        "/v1/classify",
        response_model=ClassifyResponse,
        dependencies=auth,
        responses=classify_responses(limits, gatekeeper.enabled),
    )
    async def classify(
        body: body_model,  # type: ignore[valid-type]
        request: Request,
        response: Response,
        # typed without None so the schema says what a header holds (a number, not "null")
        x_request_id: Annotated[str, Header(max_length=128)] = None,  # type: ignore[assignment]  # noqa: RUF013
        x_protege_timeout_ms: Annotated[
            int,  # noqa: RUF013
            Header(
                ge=1,
                le=MAX_TIMEOUT_MS,
                description="The most this client waits, in ms: the teacher is waited on only "
                "while time is left, then the student's answer is returned, marked degraded",
            ),
        ] = None,  # type: ignore[assignment]
    ) -> ClassifyResponse:
        _check_model(backend, body.model)  # type: ignore[attr-defined]
        caller: Caller = request.scope["state"]["caller"]
        gatekeeper.check_overrides(caller, body.overrides)  # type: ignore[attr-defined]
        deadline = None
        if x_protege_timeout_ms is not None:
            deadline = time.monotonic() + x_protege_timeout_ms / 1000
        routing = Routing(body.threshold, body.force_tier, deadline)  # type: ignore[attr-defined]
        request_id = backend.request_id(x_request_id)
        answer = await backend.classify(body.texts, request_id, routing)  # type: ignore[attr-defined]
        if len(answer.outputs) == 1:
            response.headers["x-protege-tier"] = answer.outputs[0].tier
            response.headers["x-protege-model-version"] = answer.outputs[0].model_version
        return ClassifyResponse(request_id=request_id, outputs=answer.outputs, logged=answer.logged)


def _check_model(backend: Backend, name: str | None) -> None:
    """A ``model`` given must name a classification cascade hosted here, and without one
    the gateway must host one (else a 404 naming the models hosted)."""
    hosted = backend.hosted()
    if name is None and "classify" not in hosted.values():
        raise NotHosted(None, "classify", hosted)
    if name is not None and hosted.get(name) != "classify":
        raise NotHosted(name, "classify", hosted)
