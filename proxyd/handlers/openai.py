"""The OpenAI-compatible routes: thin shells around the pipeline (proxyd/pipeline.py).

A metered route reads the body, authenticates (in ``prepare``, before the body: the key and its cap on
open requests), hands the body to a ``MeteredCall`` with its endpoint (proxyd/endpoints/openai.py) and
maps what comes back to HTTP: a refusal to its 429 (proxyd/limits_http.py), an error to the endpoint's
envelope, or, once the stream started, to the endpoint's error event. The handler is the call's client
sink: ``send`` with backpressure and the write-stall timeout, ``finish``, and whether the client is gone.

A running request can also be ended from outside (``cut_off``: key revoked, user disabled, shutdown
deadline) or by a client that stops reading (``send``'s stall timeout); both end in the pipeline's one
``end``, billed for what was relayed.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import struct
import termios
from typing import Any
from urllib.parse import quote

from tornado.iostream import StreamClosedError

from .. import jsonio
from ..endpoints.openai import ChatCompletions, Completions, Embeddings
from ..errors import InvalidRequest, NotFound, ProxyError, UpstreamUnavailable
from ..limits_http import refusal_error
from ..meter import Ticket
from ..modelname import canonical, why_invalid
from ..pipeline import ClientGone, MeteredCall
from .base import BaseHandler

log = logging.getLogger("proxyd.proxy")


class ProxyHandler(BaseHandler):
    """A metered route: the pipeline's HTTP shell and its client sink (``pipeline.ClientSink``)."""

    endpoint: Any = None  # the dialect's Endpoint, built once (a class attribute of each route)

    # Per-request state, defaults on the class (set on the instance when they change): no method call
    # per request to set them, and write_error can read them also for a request refused before or in
    # prepare() (405, auth).
    call: MeteredCall | None = None
    gone = False  # the client went away
    stopped: ProxyError | None = None  # set by cut_off(): the error this request ends with
    _stop_reason = ""
    _stalled_flush = None  # the flush being waited for while the client's socket buffer is full

    def initialize(self, ctx) -> None:
        super().initialize(ctx)
        self.call = None  # set here, not first in post(): see BaseHandler.initialize

    def prepare(self) -> None:
        super().prepare()
        self.authenticate_user(self.endpoint.credentials(self.request.headers))

    async def post(self) -> None:
        body = self.json_body()
        call = self.call = MeteredCall(self.ctx, self.endpoint, self, self.caller, self.request_id)
        try:
            refusal = await call.run(body)
        finally:
            # The call holds this handler (its sink) and the handler the call: a reference cycle. With it
            # nothing of a finished request (handler, HTTPServerRequest, its connection and headers, the
            # call, the upstream response: ~50 objects) was freed by reference counting; all of it waited
            # for the cyclic GC, whose collections (and the gen-1/2 passes over what survived into them)
            # cost ~0.1 ms of CPU per request, the whole slowdown of the pipeline refactor (7317ce1).
            # Once run() returned or raised there is nothing left to drop upstream (the response was
            # released or aborted, the wait for headers is over), so the link goes here.
            self.call = None
        if refusal is not None:
            raise refusal_error(refusal, self.ctx.meter.admission.clock(), self.endpoint.rate_headers)

    def on_connection_close(self) -> None:
        # The client went away: drop the upstream connection so Ollama stops generating.
        super().on_connection_close()
        self.gone = True
        if self.call is not None:
            self.call.drop_upstream()

    def cut_off(self, error: ProxyError, reason: str) -> None:
        """Ends this request with ``error`` (an error event mid-stream, else a plain error answer),
        billed for what was relayed. Dropping the upstream connection wakes the relay at once: the read
        it waits in fails, and the failure becomes ``error`` (``MeteredCall.interrupted``)."""
        if self.stopped is not None or self._finished:
            return
        self.stopped, self._stop_reason = error, reason
        if self.call is not None:
            self.call.drop_upstream()
        if self._stalled_flush is not None:
            # Stuck writing to a client that does not read: no error event would get through either.
            self.request.connection.close()

    # -- the client sink -------------------------------------------------------------------------------

    def admitted(self, ticket: Ticket, budget: int, capped_by: str | None) -> None:
        hold = ticket.hold
        # Assigned to self._headers, not through set_header: these values are proxyd's own (numbers,
        # Go durations, limit names, ISO times, canonical model names: ASCII without CR/LF), and
        # set_header only converts and validates the value (5 Python calls per header, 1 this way).
        headers = self._headers
        for name, value in self.endpoint.rate_headers(hold.checks, (1, hold.tokens, hold.cost_nusd), hold.admitted_at,
                                                      entered=True).items():
            headers[name] = value
        if capped_by is not None:
            # proxyd chose max_tokens (the client sent none): say so, or an answer ending with
            # finish_reason "length" would give no clue why. The meter may have shrunk it to the allowance.
            headers["x-proxyd-max-tokens"] = str(ticket.completion_tokens)
            headers["x-proxyd-max-tokens-reason"] = "allowance" if ticket.completion_tokens < budget else capped_by

    def start_stream(self, content_type: str) -> None:
        self.set_header("Content-Type", content_type)
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Accel-Buffering", "no")  # tell nginx-style fronts not to buffer the stream

    async def send(self, data: bytes) -> None:
        """Writes and waits for the client to take it (backpressure); raises ClientGone.

        A client that stops reading would otherwise hold this request, and Ollama's slot behind it, until
        its connection dies: proxyd waits for it, so it stops reading Ollama, so Ollama's own timeouts
        never fire. That wait is bounded (``_wait_for_client``). It is entered only when the flush did
        not complete at once: Tornado's flush future is already done whenever the socket buffer took the
        bytes, as it does for nearly every event, so the usual cost is one ``done()`` call."""
        if self.gone:
            raise ClientGone()
        self.write(data)
        flushed = self.flush()
        try:
            if flushed.done():
                await flushed  # no suspension: raises StreamClosedError if the client is gone
            else:
                await self._wait_for_client(flushed)
        except StreamClosedError:
            self.gone = True
            raise self.stopped or ClientGone() from None  # cut off while stuck: log it as that, not 499

    async def _wait_for_client(self, flushed) -> None:
        """Waits for a flush while the client's socket buffer is full. server.write_stall_timeout_s in
        which the client took no byte ends the request: the upstream is dropped (Ollama's slot is free
        again), the connection closed, and what was relayed is billed (MeteredCall.end). A slow client
        that keeps reading keeps its stream: progress is the kernel's send queue shrinking (the client
        acknowledged bytes) or Tornado handing the kernel more. The flush alone would not tell: the
        kernel takes more only once half of its send buffer (up to 4 MB on Linux) is free again, which a
        slow reader may take longer than the timeout to drain."""
        stall = self.ctx.config["server.write_stall_timeout_s"]
        stream = self.request.connection.stream
        mark = _progress(stream)
        self._stalled_flush = flushed
        try:
            while True:
                await asyncio.wait((flushed,), timeout=stall)  # a timer and a callback, no task
                if flushed.done():
                    return flushed.result()
                now = _progress(stream)
                if not _advanced(mark, now):
                    break
                mark = now
        finally:
            self._stalled_flush = None
        self.gone = True
        self.log_fields["cut_off"] = "write_stall"
        log.info("%s: the client took nothing for %gs; request ended", self.request_id, stall)
        if self.call is not None:
            self.call.drop_upstream()  # Ollama stops generating now
        self.request.connection.close()
        raise ClientGone()

    # -- errors ----------------------------------------------------------------------------------------------

    def error_body(self, err: ProxyError) -> bytes:
        return self.endpoint.error_body(err)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, ClientGone):
            return
        if exc is not None and exc is self.stopped:
            self.log_fields["cut_off"] = self._stop_reason  # proxyd ended it: "shutdown", "key_revoked", ...
        if self._headers_written:
            # Mid-stream: the status line is gone. End the stream with the dialect's error event.
            err = exc if isinstance(exc, ProxyError) else ProxyError(f"Internal error in proxyd (request {self.request_id}).")
            self.log_fields["error"] = err.message
            # The client saw 200 before the error; the access log, the metrics and the ledger row say how
            # the request ended (503 at the shutdown deadline, 502 for a cut upstream, ...).
            self.set_status(err.status)
            try:
                self.write(self.endpoint.error_event(err))
                self.finish()
            except StreamClosedError:
                pass
            return
        super().write_error(status_code, **kwargs)

    def send_error(self, status_code: int = 500, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, ClientGone):
            self.log_fields["client_gone"] = True
            # 499 (nginx's "client closed request") in the access log and metrics, as in the ledger row:
            # nothing reached the client, so it is not a 200.
            self.set_status(499, "Client Closed Request")
            if not self._finished:
                self.finish()  # nothing reaches the client any more; just end the request
            return
        if self._headers_written:
            self.write_error(status_code, **kwargs)  # mid-stream: error event, see write_error
            return
        super().send_error(status_code, **kwargs)


def _progress(stream) -> tuple[int | None, int | None]:
    """(bytes Tornado handed the kernel, bytes the kernel still holds for the client); None: unknown.
    The first is a private counter of Tornado's IOStream, the second Linux's SIOCOUTQ (= TIOCOUTQ)."""
    handed = getattr(stream, "_total_write_done_index", None)
    try:
        unsent = struct.unpack("i", fcntl.ioctl(stream.socket.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    except (OSError, AttributeError, ValueError):
        unsent = None
    return handed, unsent


def _advanced(before: tuple[int | None, int | None], after: tuple[int | None, int | None]) -> bool:
    """Did the client take anything between two ``_progress`` readings? Without new bytes from Tornado
    the kernel's queue only shrinks as the client acknowledges them."""
    if before[0] is not None and after[0] != before[0]:
        return True
    return before[1] is not None and after[1] is not None and after[1] < before[1]


# -- routes ---------------------------------------------------------------------------------------------


class ChatCompletionsHandler(ProxyHandler):
    endpoint = ChatCompletions()


class CompletionsHandler(ProxyHandler):
    endpoint = Completions()


class EmbeddingsHandler(ProxyHandler):
    endpoint = Embeddings()


class ModelsHandler(BaseHandler):
    """GET /v1/models and /v1/models/{model}: passed through, not metered."""

    def prepare(self) -> None:
        super().prepare()
        self.authenticate_user()

    async def get(self, model: str | None = None) -> None:
        router = self.ctx.router
        if not router.legacy:
            self.send_json(self.served(router, model))
            return
        backend = router.default  # one Ollama (upstream.url): its own list, passed through
        path = backend.paths["models"]
        if model is not None:
            # The name is one path segment of Ollama's route (gin matches /v1/models/:model on the
            # decoded path), so a name with "/" — hf.co/org/m, ../../api/version, ..%2fapi — is no route
            # there: 404, without asking. Anything else must be a name Ollama accepts (400 otherwise, as
            # Ollama answers) and is sent percent-encoded whole, so no part of it can become a path
            # segment of its own ("..") and leave the route.
            if "/" in model:
                raise NotFound(f"The model '{model}' does not exist", code="model_not_found")
            if not backend.canonical_model(model):
                raise InvalidRequest(f"invalid model name {model!r}: {why_invalid(model)}", param="model")
            path += "/" + quote(model, safe="")
        resp = await backend.open("GET", path)
        raw = await resp.read()
        if resp.status != 200:
            raise backend.error(resp.status, raw)
        try:
            doc = jsonio.loads(raw)
        except ValueError:
            raise UpstreamUnavailable("Upstream answered with invalid JSON.") from None
        if model is None and isinstance(doc, dict) and doc.get("data") is None:
            doc["data"] = []  # Ollama sends null when no model is installed; the SDK expects a list
        self.send_json(doc)

    @staticmethod
    def served(router: Any, model: str | None) -> dict[str, Any]:
        """Several upstreams: the union of their lists (as discovered or configured), or one of it."""
        def entry(name: str) -> dict[str, Any]:
            return {"id": name, "object": "model", "created": 0, "owned_by": "proxyd"}

        if model is None:
            return {"object": "list", "data": [entry(m) for m in router.served_models()]}
        key = canonical(model) or router.foreign_model(model)
        for backend in router.backends:
            models = backend.state.models
            if models is not None and key in models:
                return entry(model)
        raise NotFound(f"The model `{model}` does not exist or you do not have access to it.", code="model_not_found")
