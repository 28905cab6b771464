"""BaseHandler: the one place where errors become responses, plus body reading and auth.

Handlers raise typed errors (``proxyd.errors``); ``write_error`` turns any of them, Tornado's own
HTTPErrors and unexpected exceptions into OpenAI's envelope with the right status and headers.
Every response carries the proxy's own ``x-request-id`` (Ollama's ids repeat).

All handlers read their body in streaming mode so that size is checked by proxyd itself: a declared
Content-Length over the limit is refused with 413 before a byte of the body is read, and a chunked
body is cut off at the limit.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import re
import time
from typing import Any

import tornado.web
from tornado.iostream import StreamClosedError

from .. import jsonio
from ..errors import (
    AuthError,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    ProxyError,
    ServiceUnavailable,
)
from ..limits_http import refusal_error
from ..pipeline import ClientGone

log = logging.getLogger("proxyd.http")

# CORS (on for the origins in server.cors_origins). A browser hides every response header but a few
# safelisted ones (Content-Type, ...) from the page's script unless the response lists it here: what a
# client needs to pace itself and to report a request (the openai SDK reads x-request-id, retry-after,
# retry-after-ms and x-should-retry; pacing code reads x-ratelimit-*), and proxyd's own headers.
EXPOSED_HEADERS = ", ".join((
    "x-request-id",
    "x-ratelimit-limit-requests", "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-requests", "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-requests", "x-ratelimit-reset-tokens",
    "retry-after", "retry-after-ms", "x-should-retry",
    "x-proxyd-limit", "x-proxyd-limit-model", "x-proxyd-limit-quota", "x-proxyd-limit-remaining",
    "x-proxyd-limit-reset",
    "x-proxyd-max-tokens", "x-proxyd-max-tokens-reason",
    # Anthropic's (/v1/messages): the id its SDK reads, and its limit headers
    "request-id",
    *(f"anthropic-ratelimit-{m}-{f}" for m in ("requests", "tokens", "input-tokens", "output-tokens")
      for f in ("limit", "remaining", "reset")),
))
# A header name (RFC 9110 token), for Access-Control-Request-Headers; and a bound on what is echoed.
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_MAX_REQUEST_HEADERS = 4096


def new_request_id() -> str:
    """``req_`` + 12 hex digits of Unix milliseconds + 16 random hex digits (64 bits).

    Time first because the id is the ledger's primary key: ids in arrival order append at the right
    edge of its B-tree, where random ids put each row on a leaf page of its own, and every dirty page is
    written to the WAL at each commit and again at checkpoint (and read back once the index outgrows
    the cache). ``python -m load.ledger_bench``: 11 vs 30 us of SQLite CPU per row with 100k rows in the
    ledger, 11 vs 62 us wall with 2M (batches of 8). 64 random bits make a collision within one
    millisecond (which would overwrite a row through the upsert) practically impossible, also across
    processes."""
    return f"req_{time.time_ns() // 1_000_000:012x}{os.urandom(8).hex()}"


@tornado.web.stream_request_body
class BaseHandler(tornado.web.RequestHandler):
    def initialize(self, ctx) -> None:  # ctx: proxyd.server.Context, given by the route table
        self.ctx = ctx
        # Every attribute a request sets is set here, in __init__, not first in prepare() or later:
        # CPython 3.11 keeps a class's instance attributes in one shared table that stops taking new
        # names once a few instances exist (each new instance shrinks its free room), and Tornado creates
        # the handlers of a burst of requests before any of them reaches prepare(). A name first set
        # there was left out, and every handler then carried a dict of its own, built per request, with
        # slower attribute reads and writes (python -m load.instructions; docs/PERFORMANCE.md, 2026-11-30).
        self._counted = False
        self._key_slot: str | None = None
        self._transforms, self.path_args, self.path_kwargs = [], [], {}  # Tornado's: set again in its _execute
        origin = self.request.headers.get("Origin")
        # CORS is off unless server.cors_origins lists the origin (or "*"). Decided once, here (also for
        # NotFoundHandler), and re-applied by set_default_headers: Tornado's send_error clears every
        # header, and without them a browser hides an error's status and body from the page.
        self._cors_origin = origin if origin and ctx.cors_allows(origin) else None
        if self._cors_origin:
            self._set_cors_headers()
        self.caller = None
        self._body_parts: list[bytes] = []
        self._body_size = 0
        self._too_large = False
        self.log_fields: dict[str, Any] = {}

    def set_default_headers(self) -> None:
        # Runs from __init__ (before initialize) and again whenever send_error clears the response.
        if not hasattr(self, "request_id"):
            self.request_id = new_request_id()
        self.set_header("Content-Type", "application/json")
        # proxyd's own id (ASCII, no CR/LF): assigned directly, set_header would only validate it (5 calls -> 1).
        self._headers["x-request-id"] = self.request_id
        self.clear_header("Server")
        if getattr(self, "_cors_origin", None):  # unset in the first call, from __init__
            self._set_cors_headers()

    def _set_cors_headers(self) -> None:
        self.set_header("Access-Control-Allow-Origin", self._cors_origin)
        self.set_header("Access-Control-Expose-Headers", EXPOSED_HEADERS)
        self.set_header("Vary", "Origin")

    def _answer_preflight(self) -> None:
        """A CORS preflight: which methods and request headers the real request may use.

        The requested headers are echoed back once each is a valid header name: the openai SDK sends a
        family of X-Stainless-* headers that grows between versions (and OpenAI-Organization,
        OpenAI-Project, Idempotency-Key, User-Agent...), and CORS has no prefix wildcard ("X-Stainless-*"
        matches nothing; a bare "*" would not cover Authorization). Echoing allows nothing a listed
        origin could not send anyway: authentication is the bearer key, never a cookie (no
        Allow-Credentials). Anything else (not a token, or oversized) gets no Allow-Headers, so the
        browser refuses the request."""
        self.set_header("Access-Control-Allow-Methods", "GET, POST, PUT, PATCH, DELETE, OPTIONS")
        asked = self.request.headers.get("Access-Control-Request-Headers")
        if asked and len(asked) <= _MAX_REQUEST_HEADERS:
            names = [name.strip() for name in asked.split(",")]
            if all(_HEADER_NAME.fullmatch(name) for name in names):
                self.set_header("Access-Control-Allow-Headers", ", ".join(names))
        self.set_header("Access-Control-Max-Age", "600")
        self.set_header("Vary", "Origin, Access-Control-Request-Method, Access-Control-Request-Headers")
        self.set_status(204)
        raise tornado.web.Finish()

    # -- body --------------------------------------------------------------------------------------

    def prepare(self) -> None:
        self.ctx.in_flight += 1
        self._counted = True
        if self._cors_origin and self.request.method == "OPTIONS":
            self._answer_preflight()
        if self.ctx.shutting_down:
            self.set_header("Connection", "close")
            raise ServiceUnavailable("proxyd is shutting down; retry on another instance or in a moment.")
        limit = self.ctx.config["server.max_body_bytes"]
        declared = self.request.headers.get("Content-Length")
        if declared is not None:
            try:
                if int(declared) > limit:
                    raise PayloadTooLarge(f"Request body is {declared} bytes; the limit is {limit} bytes.")
            except ValueError:
                raise InvalidRequest("Invalid Content-Length header.") from None
        self.request.connection.set_max_body_size(limit * 2)  # past 2x Tornado drops the connection

    def data_received(self, chunk: bytes) -> None:
        self._body_size += len(chunk)
        if self._body_size > self.ctx.config["server.max_body_bytes"]:
            self._too_large = True
            self._body_parts.clear()
        elif not self._too_large:
            self._body_parts.append(chunk)

    def json_body(self) -> dict[str, Any]:
        if self._too_large:
            limit = self.ctx.config["server.max_body_bytes"]
            raise PayloadTooLarge(f"Request body exceeds the limit of {limit} bytes.")
        raw = b"".join(self._body_parts)
        if not raw or raw.isspace():
            raise InvalidRequest("Request body is empty; expected a JSON object.")
        too_deep = f"Request body is nested too deeply (more than {jsonio.MAX_DEPTH} levels of arrays and objects)."
        try:
            body = jsonio.loads(raw)
        except jsonio.JSONDecodeError as exc:
            if "depth limit exceeded" in str(exc):  # orjson's own limit, 1,024
                raise InvalidRequest(too_deep) from None
            if "surrogate in string" in str(exc):  # a \\uXXXX escape of a lone surrogate is not Unicode text
                raise InvalidRequest("Request body contains an unpaired UTF-16 surrogate escape (\\ud800-\\udfff).") from None
            if "not valid UTF-8" in str(exc):
                raise InvalidRequest("Request body is not valid UTF-8 (JSON must be UTF-8).") from None
            raise InvalidRequest(f"Request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise InvalidRequest("Request body must be a JSON object.")
        if jsonio.too_deep(raw, body):  # parsed, but could not be forwarded (jsonio.MAX_DEPTH)
            raise InvalidRequest(too_deep)
        return body

    # -- auth ----------------------------------------------------------------------------------------

    def authenticate_user(self, credentials: str | None = None) -> None:
        """The caller from its key (``credentials``: an Authorization value; by default this request's).

        Then the key's cap on open requests (the admission's ``OpenRequests``), before any limit or
        upstream work: one key (or a stolen one) cannot hold all of the proxy's connections. The same
        registry lets the admin API and the shutdown reach a key's running requests (``cut_off``)."""
        if credentials is None:
            credentials = self.request.headers.get("Authorization")
        self.caller = self.ctx.accounts.authenticate(credentials)
        self.log_fields["user_id"] = self.caller.user.user_id
        self.log_fields["key_id"] = key_id = self.caller.key_id
        refusal = self.ctx.meter.admission.open_requests.enter(key_id, self)
        if refusal is not None:
            raise refusal_error(refusal, 0.0)
        self._key_slot = key_id

    def authenticate_admin(self) -> None:
        token = self.ctx.config["admin.token"]
        header = self.request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if not token:
            raise AuthError("The admin API is disabled: set PROXYD_ADMIN_TOKEN or admin.token.")
        if scheme.lower() != "bearer" or not given:
            raise AuthError("Admin API: send 'Authorization: Bearer <admin token>'.")
        # Constant-time comparison: the time taken must not reveal how much of the token matched.
        if not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise AuthError("Admin API: invalid admin token.")

    # -- responses ----------------------------------------------------------------------------------------

    def send_json(self, obj: Any, status: int = 200) -> None:
        self.set_status(status)
        self.finish(jsonio.dumps(obj))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, ProxyError):
            err = exc
        elif isinstance(exc, tornado.web.HTTPError):
            err = _from_http_error(exc.status_code, exc.log_message or exc.reason or self._reason)
        else:
            err = _from_http_error(status_code, self._reason)
            if status_code >= 500:
                err.message = f"Internal error in proxyd (request {self.request_id})."
        self.set_status(err.status)
        for name, value in err.headers.items():
            self.set_header(name, value)
        if err.status == 405:  # RFC 9110: a 405 lists the methods the resource does support
            self.set_header("Allow", ", ".join(self.allowed_methods()))
        self.set_header("Content-Type", "application/json")
        self.log_fields["error"] = err.message
        self.finish(self.error_body(err))

    def error_body(self, err: ProxyError) -> bytes:
        """The error envelope: OpenAI's, unless the route's dialect has its own (``ProxyHandler``)."""
        return json.dumps(err.body(), separators=(",", ":")).encode()

    def allowed_methods(self) -> list[str]:
        """The HTTP methods this handler implements (its own get/post/... overrides)."""
        base = tornado.web.RequestHandler
        return [m for m in ("GET", "POST", "PUT", "PATCH", "DELETE")
                if getattr(type(self), m.lower()) is not getattr(base, m.lower())]

    def cut_off(self, error: ProxyError, reason: str) -> None:
        """Ends this request from outside (key revoked, user disabled, shutdown deadline) with ``error``.
        Only requests that can run long (``ProxyHandler``) act on it; the others end on their own soon."""

    def log_exception(self, typ, value, tb) -> None:
        # Typed errors are answers, not failures: log them as one line, without a traceback.
        if isinstance(value, ProxyError):
            if value.detail:  # what the client must not see (internal addresses): for the operator
                log.warning("%s %s %s -> %d %s (%s)", self.request_id, self.request.method, self.request.path,
                            value.status, value.message, value.detail)
            else:
                log.debug("%s %s -> %d %s", self.request.method, self.request.path, value.status, value.message)
        elif isinstance(value, (StreamClosedError, ClientGone)):
            log.debug("client went away: %s %s", self.request.method, self.request.path)
        else:
            super().log_exception(typ, value, tb)

    def on_connection_close(self) -> None:
        if not self.request._body_future.done():
            # The client left while sending its body: Tornado abandons the request without finish(),
            # so on_finish will never run; release what prepare() took now.
            self._release()
        super().on_connection_close()

    def on_finish(self) -> None:
        self._release()
        self.ctx.access_log(self)

    def _release(self) -> None:
        if self._counted:
            self._counted = False
            self.ctx.in_flight -= 1
        if self._key_slot is not None:
            self.ctx.meter.admission.open_requests.leave(self._key_slot, self)
            self._key_slot = None


def _from_http_error(status: int, message: str | None) -> ProxyError:
    if status == 404:
        return NotFound(message or "Not found.", code="not_found")
    if status == 405:
        return ProxyError(message or "Method not allowed.", status=405, type="invalid_request_error", code="method_not_allowed")
    if status == 403:
        return PermissionDenied(message or "Forbidden.")
    if 400 <= status < 500:
        return InvalidRequest(message or "Bad request.", status=status)
    return ProxyError(message or "Internal error.", status=status)


class NotFoundHandler(BaseHandler):
    """Unknown paths: OpenAI-shaped 404 instead of Tornado's HTML page."""

    def prepare(self) -> None:
        raise NotFound(f"Unknown path {self.request.method} {self.request.path}.", code="unknown_url")
