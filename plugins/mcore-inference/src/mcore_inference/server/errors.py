"""OpenAI error objects: ``{"error": {"message", "type", "param", "code"}}`` with the HTTP status OpenAI uses.

Why it exists: the ``openai`` client turns the status into a typed exception (400 ``BadRequestError``, 401
``AuthenticationError``, 404 ``NotFoundError``, 429 ``RateLimitError``, 5xx ``InternalServerError``, ...) and reads
the message from this body; every error the server returns goes through ``APIError`` so they all have the same
shape.
"""

from __future__ import annotations

from typing import Any

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error"}
_TYPES |= {413: "invalid_request_error", 500: "server_error", 503: "server_error"}
_TYPES[429] = "requests"  # OpenAI's type for a request-rate limit (code ``rate_limit_exceeded``)


class APIError(Exception):
    """An error answer: ``status``, a one-line ``message``, the offending ``param`` and a machine ``code``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = _TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def from_validation(errors: list[Any]) -> APIError:
    """A 400 from pydantic's errors (the first one named: its field path, and what was wrong)."""
    if not errors:
        return APIError(400, "invalid request body")
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    kind = first.get("type", "")
    if kind == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {first.get('msg', '')}", code="invalid_json")
    param = loc[0] if loc else None  # the request's field; the path below it (union members too) is in the message
    if kind == "missing":
        return APIError(400, f"missing required field {'.'.join(loc)!r}", param=param, code="missing_field")
    if kind == "extra_forbidden":
        return APIError(400, f"unknown field {'.'.join(loc)!r}", param=param, code="unknown_field")
    where = f"{'.'.join(loc)}: " if loc else ""
    return APIError(400, f"{where}{first.get('msg', 'invalid value')}", param=param, code="invalid_value")
