"""Typed errors. Code raises these; only ``BaseHandler.write_error`` turns them into a response.

Every error a client can see is OpenAI's envelope::

    {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}

The status, ``type`` and ``code`` follow OpenAI's conventions so that the ``openai`` SDK raises the
matching exception class (400 BadRequestError, 401 AuthenticationError, 429 RateLimitError, ...).
"""

from __future__ import annotations

from typing import Any


class ProxyError(Exception):
    """Base of every error proxyd answers with. Subclasses fix status and type."""

    status = 500
    type = "api_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
        detail: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        # What only the log gets (with the request id): internal addresses, the underlying exception.
        self.detail = detail
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        if type is not None:
            self.type = type
        self.headers: dict[str, str] = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequest(ProxyError):
    status = 400
    type = "invalid_request_error"


class InvalidModelName(InvalidRequest):
    """A model name Ollama's rules refuse (proxyd/modelname.py); an ``openai``-kind upstream may still
    list it as its own id (the router asks, proxyd/pipeline.py)."""

    def __init__(self, message: str, raw: str) -> None:
        super().__init__(message, param="model")
        self.raw = raw


class PayloadTooLarge(InvalidRequest):
    status = 413
    code = "payload_too_large"


class AuthError(ProxyError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDenied(ProxyError):
    status = 403
    type = "invalid_request_error"
    code = "permission_denied"


class NotFound(ProxyError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class Conflict(ProxyError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


class RateLimited(ProxyError):
    """A short-term limit (per minute, concurrency): retryable, so Retry-After is set."""

    status = 429
    type = "requests"
    code = "rate_limit_exceeded"


class QuotaExceeded(ProxyError):
    """A long-term or total limit: the SDK must not retry (x-should-retry: false)."""

    status = 429
    type = "insufficient_quota"
    code = "insufficient_quota"

    def __init__(self, message: str, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.headers.setdefault("x-should-retry", "false")


class UpstreamError(ProxyError):
    """Ollama answered with an error; its status and message pass through."""

    type = "api_error"


class UpstreamUnavailable(ProxyError):
    status = 502
    type = "api_error"
    code = "upstream_unavailable"


class UpstreamTimeout(ProxyError):
    status = 504
    type = "api_error"
    code = "upstream_timeout"


class ServiceUnavailable(ProxyError):
    """proxyd itself cannot take the request (shutting down, ledger failing)."""

    status = 503
    type = "api_error"
    code = "service_unavailable"


def openai_type_for_status(status: int) -> str:
    """Ollama's own mapping of status to ``type`` (used when its error body is not JSON)."""
    if status == 400:
        return "invalid_request_error"
    if status == 404:
        return "not_found_error"
    return "api_error"
