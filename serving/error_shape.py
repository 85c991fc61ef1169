"""The two shapes of an error body, chosen by the route that answers.

protege's own routes answer ``{"error": "<message>"}``; the OpenAI-compatible routes
answer OpenAI's ``{"error": {"message", "type", "param", "code"}}``, which OpenAI's
clients read. The guard (401, 413), the validation handlers and the routes all build
their bodies here, so one route never mixes the two.
"""

from __future__ import annotations

from typing import Any

from starlette.types import Scope

from serving.schemas import OpenAIError, OpenAIErrorBody

OPENAI_ROUTES: frozenset[str] = frozenset({"/v1/models", "/v1/chat/completions", "/v1/completions"})
"""Paths (inside the app) whose errors are in OpenAI's shape."""


def route_path(scope: Scope) -> str:
    """The path inside the app (Serve mounts it under its route prefix, the root path)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def openai_type(status: int) -> str:
    """OpenAI's error ``type`` for an HTTP status."""
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    return "server_error" if status >= 500 else "invalid_request_error"


def error_content(
    scope: Scope,
    status: int,
    message: str,
    *,
    code: str | None = None,
    param: str | None = None,
) -> dict[str, Any]:
    """The error body for this request's route: OpenAI's shape on :data:`OPENAI_ROUTES`,
    ``{"error": message}`` everywhere else."""
    if route_path(scope) not in OPENAI_ROUTES:
        return {"error": message}
    error = OpenAIError(message=message, type=openai_type(status), param=param, code=code)
    return OpenAIErrorBody(error=error).model_dump()
