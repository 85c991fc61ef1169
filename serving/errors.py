"""Turn validation failures into 4xx answers a person can act on."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.access import AccessError
from serving.error_shape import error_content
from serving.schemas import MANY, MODEL_ID, NOT_BLANK, ONE, ClassifyRequest

HIDDEN_LOCATION_PARTS = {"body", MANY, ONE}  # where it came from, and the inputs' shape tags


class NotHosted(LookupError):
    """A request names a model (a cascade) this gateway does not host: a 404."""

    def __init__(self, name: str | None, kind: str, hosted: dict[str, str]) -> None:
        """``name`` None: the request named no model, and no cascade of ``kind`` is hosted."""
        shown = ", ".join(f"{n} ({k})" for n, k in sorted(hosted.items())) or "none"
        if name is None:
            what = f"model: this gateway hosts no {kind} cascade"
        else:
            what = f"model: {name!r} names no {kind} cascade hosted here"
        super().__init__(f"{what}; the models hosted are: {shown}")


def _describe(error: dict[str, Any]) -> str:
    parts = [str(p) for p in error.get("loc", ()) if p not in HIDDEN_LOCATION_PARTS]
    location = ".".join(parts) or "body"
    message = error.get("msg", "invalid")
    if error.get("type") == "json_invalid":
        return 'body: not valid JSON; send a JSON object such as {"inputs": ["some text"]}'
    if error.get("type") == "extra_forbidden":
        allowed = ", ".join(ClassifyRequest.model_fields)
        return f"{location}: unknown field; allowed fields are {allowed}"
    given = error.get("input")
    pattern = error.get("ctx", {}).get("pattern")
    if error.get("type") == "string_pattern_mismatch" and pattern == NOT_BLANK:
        return f"{location}: is only whitespace; send some text"
    if error.get("type") == "string_pattern_mismatch" and pattern == MODEL_ID:
        return f"{location}: {given!r:.80} is not a model id; GET /v1/models lists the ids"
    shown = "" if isinstance(given, dict) or given is None else f" (got {given!r:.80})"
    return f"{location}: {message}{shown}"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        status = 400 if any(e.get("type") == "json_invalid" for e in errors) else 422
        message = "; ".join(_describe(e) for e in errors)
        content = error_content(request.scope, status, message, code="invalid_value")
        return JSONResponse(status_code=status, content=content)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI's own refusals (a body it cannot decode, an unknown path) in the route's shape
        content = error_content(request.scope, exc.status_code, str(exc.detail))
        return JSONResponse(status_code=exc.status_code, content=content, headers=exc.headers)

    @app.exception_handler(AccessError)
    async def _access(request: Request, exc: AccessError) -> JSONResponse:
        content = error_content(request.scope, exc.status_code, str(exc))
        return JSONResponse(status_code=exc.status_code, content=content)

    @app.exception_handler(NotHosted)
    async def _not_hosted(request: Request, exc: NotHosted) -> JSONResponse:
        content = error_content(request.scope, 404, str(exc), code="model_not_found", param="model")
        return JSONResponse(status_code=404, content=content)
