"""Turn validation failures into 4xx answers a person can act on."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.access import AccessError
from serving.schemas import MANY, NOT_BLANK, ONE

HIDDEN_LOCATION_PARTS = {"body", MANY, ONE}  # where it came from, and the inputs' shape tags


def _describe(error: dict[str, Any]) -> str:
    parts = [str(p) for p in error.get("loc", ()) if p not in HIDDEN_LOCATION_PARTS]
    location = ".".join(parts) or "body"
    message = error.get("msg", "invalid")
    if error.get("type") == "json_invalid":
        return 'body: not valid JSON; send a JSON object such as {"inputs": ["some text"]}'
    if error.get("type") == "extra_forbidden":
        return f"{location}: unknown field; allowed fields are inputs, threshold, force_tier"
    if (
        error.get("type") == "string_pattern_mismatch"
        and error.get("ctx", {}).get("pattern") == NOT_BLANK
    ):
        return f"{location}: is only whitespace; send some text"
    given = error.get("input")
    shown = "" if isinstance(given, dict) or given is None else f" (got {given!r:.80})"
    return f"{location}: {message}{shown}"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        status = 400 if any(e.get("type") == "json_invalid" for e in errors) else 422
        messages = [_describe(e) for e in errors]
        return JSONResponse(status_code=status, content={"error": "; ".join(messages)})

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI's own refusals (a body it cannot decode, an unknown path) in our one shape
        return JSONResponse(
            status_code=exc.status_code, content={"error": str(exc.detail)}, headers=exc.headers
        )

    @app.exception_handler(AccessError)
    async def _access(_: Request, exc: AccessError) -> JSONResponse:
        return JSONResponse(status_code=exc.status_code, content={"error": str(exc)})
