"""Errors as OpenAI sends them: ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status.

Every failure the server reports is an ``APIError``: the caller's mistakes are 4xx with
``type`` "invalid_request_error" (401, 404, 413 and 429 have their own codes), our own failures
are 5xx with a one-line message and never a traceback (the log has it).
"""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    """One error response. ``param`` names the offending field (``messages[0].content[1].image_url.url``)."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """400: the request itself is wrong (a type, a range, a field we do not support, bad media)."""
    return APIError(400, message, param=param, code=code)


def context_too_long(message: str, param: str | None = "messages") -> APIError:
    """400 with OpenAI's code for a prompt + max_tokens that the context cannot hold."""
    return APIError(400, message, param=param, code="context_length_exceeded")


# status -> (type, code) for errors raised by the HTTP layer itself (unknown route, wrong method)
HTTP_TYPES = {
    401: ("invalid_request_error", "invalid_api_key"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", "engine_busy"),
    503: ("server_error", "unavailable"),
}


def http_error(status: int, message: str) -> APIError:
    type_, code = HTTP_TYPES.get(status, ("invalid_request_error" if status < 500 else "server_error", None))
    return APIError(status, message, type=type_, code=code)
