"""Errors of the HTTP API: every one becomes `{"error": {"code": ..., "message": ...}}` with its status.

Messages may quote what the client sent; `echo` bounds such quotes and `error_body` makes sure any message can be
encoded (a lone surrogate that slipped through would otherwise turn a 4xx into a 500 while rendering it).
"""
from __future__ import annotations

from starlette.exceptions import HTTPException

ECHO_CHARS = 100  # longest piece of client input quoted in a message
MAX_MESSAGE_CHARS = 1000  # backstop for any message (store errors, parser errors, ...)


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


def echo(text: str, limit: int = ECHO_CHARS) -> str:
    """Client input as quoted in a message: at most `limit` characters, then an ellipsis; always encodable."""
    text = str(text)
    return printable(text if len(text) <= limit else f"{text[:limit]}\u2026 ({len(text)} characters)")


def printable(text: str) -> str:
    """`text` with anything UTF-8 cannot carry (lone surrogates) escaped, so rendering or logging it cannot fail."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": echo(message, MAX_MESSAGE_CHARS)}}


def summarise(errors) -> str:
    """pydantic's validation errors as one message: the first five as `field: problem`, field names shortened (an
    unknown field's name is the client's own)."""
    parts = []
    for e in list(errors)[:5]:
        loc = ".".join(echo(str(p), 40) for p in e.get("loc", ()) if p != "body")
        parts.append(f"{loc or 'body'}: {echo(e.get('msg', 'invalid'))}")
    return "; ".join(parts) or "invalid request"
