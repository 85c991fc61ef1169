"""Errors of the OpenAI-compatible routes, in OpenAI's shape.

Every refusal these routes write is ``{"error": {"message", "type", "param", "code"}}``,
which OpenAI's clients read (``BadRequestError``, ``NotFoundError`` ...). FastAPI's
validation errors become one 400 naming the parameter (``messages[0].content``,
``protege.threshold``) with a stable ``code``: ``invalid_value``, ``invalid_type``,
``missing_required_parameter``, ``unknown_parameter`` (naming every unknown field and the
fields taken) or ``unsupported_parameter`` (OpenAI's parameters protege does not
implement, :mod:`serving.generate.openai_schemas`). The guard's 401 and 413 take the same
shape through :data:`serving.error_shape.OPENAI_ROUTES`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.access import AccessError
from serving.config import LimitsConfig
from serving.error_shape import openai_type
from serving.errors import NotHosted
from serving.generate.openai_schemas import MANY, ONE, ChatMessage, ProtegeOptions, StreamOptions
from serving.schemas import OpenAIError, OpenAIErrorBody

logger = logging.getLogger("ray.serve")


class OpenAIFailure(Exception):
    """An answer in OpenAI's error shape, raised anywhere in a route."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        error = OpenAIError(
            message=self.message, type=openai_type(self.status), param=self.param, code=self.code
        )
        return OpenAIErrorBody(error=error).model_dump()

    def response(self, headers: Mapping[str, str] | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


# --- validation errors: a 400 naming the parameter --------------------------------------

HIDDEN_LOCATION_PARTS = {"body", ONE, MANY}  # where it came from, and union branches' tags
NESTED: dict[str, type[BaseModel]] = {
    "messages": ChatMessage,
    "protege": ProtegeOptions,
    "stream_options": StreamOptions,
}


def _param(loc: Sequence[Any], field: str | None = None) -> str | None:
    """``("body", "messages", 0, "content")`` as ``messages[0].content``."""
    out = ""
    for part in [*loc, *([field] if field else [])]:
        if part in HIDDEN_LOCATION_PARTS:
            continue
        out += f"[{part}]" if isinstance(part, int) else f"{'.' if out else ''}{part}"
    return out or None


def _code(kind: str) -> str:
    if kind == "missing":
        return "missing_required_parameter"
    if kind == "unsupported_parameter":
        return kind
    if kind.endswith(("_type", "_parsing")):
        return "invalid_type"
    return "invalid_value"


def _unknown(errors: list[dict[str, Any]], body_model: type[BaseModel]) -> tuple[str, str]:
    """The unknown fields' (first name, description naming them all and the known ones)."""
    names = [_param(e["loc"]) or "?" for e in errors]
    top = [p for p in errors[0]["loc"] if p not in HIDDEN_LOCATION_PARTS]
    model = NESTED.get(str(top[0]), body_model) if len(top) > 1 else body_model
    plural = "s" * (len(names) > 1)
    fields = ", ".join(model.model_fields)
    return names[0], f"{', '.join(names)}: unknown parameter{plural}; the fields taken: {fields}"


def _describe(error: dict[str, Any]) -> tuple[str | None, str, str]:
    """(param, description, code) of one validation error."""
    kind = str(error.get("type", ""))
    ctx = error.get("ctx") or {}
    param = _param(error.get("loc", ()), ctx.get("field"))
    if param is None and kind in ("missing", "model_attributes_type", "dict_type"):
        return None, "body: send a JSON object", "invalid_type"
    given = error.get("input")
    shown = "" if isinstance(given, (dict, list)) or given is None else f" (got {given!r:.80})"
    return param, f"{param or 'body'}: {error.get('msg', 'invalid')}{shown}", _code(kind)


def validation_failure(exc: RequestValidationError, body_model: type[BaseModel]) -> OpenAIFailure:
    """One 400 for all of a request's errors, each described; ``param`` and ``code`` are
    the first one's. Unknown fields are named together, with the fields the route takes."""
    errors = [dict(e) for e in exc.errors()]
    if any(e.get("type") == "json_invalid" for e in errors):
        return OpenAIFailure(400, "body: not valid JSON; send a JSON object", code="invalid_json")
    described: list[tuple[str | None, str, str]] = []
    unknown = [e for e in errors if e.get("type") == "extra_forbidden"]
    if unknown:
        described.append((*_unknown(unknown, body_model), "unknown_parameter"))
    described += [_describe(e) for e in errors if e.get("type") != "extra_forbidden"]
    param, _, code = described[0]
    return OpenAIFailure(400, "; ".join(text for _, text, _ in described), param, code)


class OpenAIRoute(APIRoute):
    """A route whose every refusal is in OpenAI's shape: validation errors (400 naming the
    parameter), a model not hosted (404), overrides refused (403); anything unexpected is
    a 500 whose reason stays in the replica's log."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        body_field = self.body_field
        given = body_field.field_info.annotation if body_field is not None else None
        body_model = (
            given if isinstance(given, type) and issubclass(given, BaseModel) else BaseModel
        )

        async def openai_handler(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                return validation_failure(exc, body_model).response()
            except OpenAIFailure as exc:
                return exc.response()
            except NotHosted as exc:
                return OpenAIFailure(404, str(exc), "model", "model_not_found").response()
            except StarletteHTTPException as exc:  # FastAPI's own refusals
                return OpenAIFailure(exc.status_code, str(exc.detail)).response(exc.headers)
            except AccessError as exc:
                code = "overrides_not_allowed" if exc.status_code == 403 else "invalid_api_key"
                return OpenAIFailure(exc.status_code, str(exc), "protege", code).response()
            except Exception:
                logger.exception("%s failed", request.url.path)
                return internal_error().response()

        return openai_handler


def internal_error() -> OpenAIFailure:
    return OpenAIFailure(500, "internal error: the replica's log says why; try again")


def _openai_error(description: str) -> dict[str, Any]:
    return {"model": OpenAIErrorBody, "description": description}


def openai_responses(
    limits: LimitsConfig, auth: bool, kind: str
) -> dict[int | str, dict[str, Any]]:
    """Every answer of a generation route but the 200, for the OpenAPI document."""
    responses: dict[int | str, dict[str, Any]] = {
        200: {
            "description": f"The {kind}; with `stream: true`, server-sent events: `data: "
            '{chunk}` lines, then `data: [DONE]` (or `data: {"error": {...}}` if the '
            "answer failed after its first byte)",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
        400: _openai_error(
            "The body breaks the schema, names a parameter protege does not implement or an "
            "unknown one (`param` names it), or the prompt is longer than the model's "
            "max_prompt_tokens (`code: context_length_exceeded`)"
        ),
        403: _openai_error("Routing overrides (`protege`) are not allowed for this key"),
        404: _openai_error("`model` names no generative cascade this gateway hosts"),
        413: _openai_error(f"The body is larger than {limits.body_bytes} bytes"),
        500: _openai_error("The answer failed (the replica's log says why)"),
        503: {
            "description": "Overloaded (Ray Serve's queue is full): plain text, with Retry-After",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        },
        408: {
            "description": "Not answered within the request timeout (Ray Serve): plain text",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        },
    }
    if auth:
        responses[401] = _openai_error("No API key, or one that is not recognised")
    return responses
