"""Turn validation failures into 4xx answers a person can act on."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse


class InputError(ValueError):
    """A request the gateway refuses; ``field`` names what to fix."""

    def __init__(self, field: str, message: str, status_code: int = 422) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.status_code = status_code


def _describe(error: dict[str, Any]) -> str:
    location = ".".join(str(part) for part in error.get("loc", ()) if part != "body") or "body"
    message = error.get("msg", "invalid")
    if error.get("type") == "json_invalid":
        return 'body: not valid JSON; send a JSON object such as {"inputs": ["some text"]}'
    if error.get("type") == "extra_forbidden":
        return f"{location}: unknown field; allowed fields are inputs, threshold, force_tier"
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

    @app.exception_handler(InputError)
    async def _input(_: Request, exc: InputError) -> JSONResponse:
        return JSONResponse(status_code=exc.status_code, content={"error": str(exc)})
