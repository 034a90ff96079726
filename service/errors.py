"""Errors of the HTTP API: every one becomes `{"error": {"code": ..., "message": ...}}` with its status."""
from __future__ import annotations

from starlette.exceptions import HTTPException


class ApiError(HTTPException):
    """A request the service refuses; a subclass of Starlette's HTTPException so body parsers pass it through."""

    def __init__(self, status_code: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(status_code=status_code, detail=message, headers=headers)
        self.code = code
        self.message = message


STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
    500: "internal_error",
    503: "unavailable",
}


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}
