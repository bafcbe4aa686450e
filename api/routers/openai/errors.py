"""OpenAI's error shape for every /v1 response: `{"error": {"message", "type", "param", "code"}}`.

The app's exception handlers (api/app.py) call `openai_error_response` for paths under /v1, so a route
raises the usual `HTTPException` (or `OpenAIError` to set `param`/`code`) and the SDK sees the status code
it maps to its exceptions (400 BadRequestError, 401 AuthenticationError, 403 PermissionDeniedError,
404 NotFoundError, 409 ConflictError, 422 UnprocessableEntityError, 429 RateLimitError, 5xx InternalServerError).
"""
from __future__ import annotations

from typing import Any

from fastapi import HTTPException
from fastapi.responses import JSONResponse

PREFIX = "/v1/"

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 409: "conflict_error",
               413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
               503: "service_unavailable_error"}


class OpenAIError(HTTPException):
    """An HTTP error with OpenAI's `param` and `code` fields."""

    def __init__(self, status_code: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(status_code, message, headers=headers)
        self.param, self.code = param, code


def is_openai_path(path: str) -> bool:
    return path.startswith(PREFIX) or path == PREFIX.rstrip("/")


def _message(detail: Any) -> tuple[str, str | None]:
    """A one-line message (and the first bad parameter) from a `detail` (a string or FastAPI's 422 list)."""
    if isinstance(detail, list) and detail and isinstance(detail[0], dict):
        first = detail[0]
        loc = [str(x) for x in first.get("loc", ()) if x not in ("body", "query", "path", "header")]
        param = ".".join(loc) or None
        msgs = "; ".join(f"{'.'.join(str(x) for x in d.get('loc', ()) if x != 'body')}: {d.get('msg', '')}"
                         for d in detail[:5])
        return msgs, param
    return str(detail), None


def openai_error_response(status_code: int, detail: Any, *, param: str | None = None, code: str | None = None,
                          headers: dict[str, str] | None = None) -> JSONResponse:
    message, first_param = _message(detail)
    body = {"error": {"message": message, "type": ERROR_TYPES.get(status_code, "api_error" if status_code >= 500
                                                                  else "invalid_request_error"),
                      "param": param if param is not None else first_param, "code": code}}
    return JSONResponse(body, status_code=status_code, headers=headers)


ERROR_SCHEMA = {"type": "object", "required": ["error"],
                "properties": {"error": {"type": "object", "required": ["message", "type"],
                                         "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                                                        "param": {"type": ["string", "null"]},
                                                        "code": {"type": ["string", "null"]}}}}}


def openai_errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for a /v1 route's error statuses, in OpenAI's shape."""
    return {c: {"description": ERROR_TYPES.get(c, "error"), "content": {"application/json": {"schema": ERROR_SCHEMA}}}
            for c in codes}
