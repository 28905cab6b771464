"""One metered call, top to bottom: auth -> estimate -> reserve -> forward -> relay -> settle.

    (auth: the handler, before the body is read: the key, its cap on open requests)
    plan      = endpoint.parse(body)                  the client's dialect (proxyd/endpoints/)
    backend   = router.pick(model)                    someone serves it, else 404 (proxyd/backends/)
    estimate  = await endpoint.estimate(...)          images inlined, prompt tokens counted
    ticket    = await meter.reserve(...)              the Admission: a reservation, or a Refusal value
    forward   = await backend.open(path, body')       body' capped at the reserved budget; the router's
                                                      choice, the next one while nothing reached the client
    relay     = once, or event by event to the sink   usage and text collected on the way
    end       = settle or void, in ``end`` alone      durable before the last byte
    last byte = the sink's finish

The call writes to a client sink (``ClientSink``: send, finish, whether the client is gone), never to
Tornado: the HTTP handler is one such sink (proxyd/handlers/openai.py), a test can be another.

A running call can be ended from outside: the client leaves (``drop_upstream`` from the sink), proxyd
cuts it off (key revoked, user disabled, shutdown deadline: the sink's ``stopped``), or the client stops
reading (the sink's stall timeout). Each ends in the same ``end``, billed for what was relayed.

Cost: one object per request (this one, with __slots__), plain method calls on endpoint, backend and
meter objects built once; the stream loop makes one endpoint call per event.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Protocol

from .admission import Refusal
from .errors import InvalidModelName, ProxyError, UpstreamError, UpstreamTimeout, UpstreamUnavailable
from .meter import Ticket, Usage
from .pricing import reported_cost_nusd
from .sse import DONE

log = logging.getLogger("proxyd.proxy")

# An upstream's answers that say "not now, not me" before any output: the next upstream may answer.
FAILOVER_STATUSES = frozenset((429, 502, 503, 504))


class ClientGone(Exception):
    """The client closed its connection; nothing more can be sent to it."""

    def __init__(self) -> None:
        super().__init__("client closed the connection")  # what the ledger row's error column says


class ClientSink(Protocol):
    """Where a call's answer goes. ``send`` waits until the client took the bytes (backpressure) and
    raises ClientGone (or the ``stopped`` error) when it cannot; ``finish`` sends the last bytes."""

    gone: bool  # the client went away
    stopped: ProxyError | None  # proxyd ended the request from outside (cut off): the error it ends with
    log_fields: dict[str, Any]  # for the access log

    def admitted(self, ticket: Ticket, budget: int, capped_by: str | None) -> None:
        """The reservation's headers (limits, the completion cap proxyd chose)."""

    def start_stream(self, content_type: str) -> None: ...

    async def send(self, data: bytes) -> None: ...

    def finish(self, data: bytes | None = None) -> None: ...


class MeteredCall:
    """One metered request through the pipeline. Built per request, run once."""

    __slots__ = ("ctx", "endpoint", "sink", "caller", "request_id", "tokens", "backend", "body", "our_id",
                 "include_usage", "resp", "waiting", "usage", "texts", "delivered", "usage_relayed", "last_event",
                 "upstream_done", "held", "first_byte_s")

    def __init__(self, ctx: Any, endpoint: Any, sink: ClientSink, caller: Any, request_id: str) -> None:
        self.ctx = ctx  # proxyd.server.Context: meter, tokens, router, config, metrics
        self.endpoint = endpoint
        self.sink = sink
        self.caller = caller
        self.request_id = request_id
        self.tokens = ctx.tokens
        self.backend = None
        self.resp = None  # the upstream response, once its headers came
        self.waiting: asyncio.Task | None = None  # this task, while it waits for the upstream's headers
        # What happened on the wire, for settling: reported usage, the text relayed, whether anything was.
        self.usage: dict[str, Any] | None = None
        self.texts: list[str] = []
        self.delivered = False
        self.usage_relayed = False  # the client got a usage event (streams that asked for usage)
        self.last_event: dict[str, Any] | None = None  # the last stream event (its object, model, created)
        # Set by an endpoint's relay_event on its dialect's terminal event (Anthropic's message_stop,
        # Responses' response.completed, the native API's done: true): streams without a [DONE] line.
        self.upstream_done = False
        self.held = None  # the backend whose in-flight count this request holds (the router's), from forward to end
        self.first_byte_s: float | None = None

    async def run(self, body: dict[str, Any]) -> Refusal | None:
        """The whole request; returns the Refusal if the admission refused it (nothing sent yet), else
        None once the answer is complete. Raises a ProxyError (or ClientGone) when it ends otherwise."""
        endpoint, sink, ctx = self.endpoint, self.sink, self.ctx
        try:
            model, stream, self.include_usage, requested = endpoint.parse(body)
        except InvalidModelName as exc:
            model, stream, self.include_usage, requested = self.parse_foreign(body, exc)
        self.body = body
        self.our_id = (endpoint.id_prefix + self.request_id[4:]).encode()
        # Who serves the model (a 404 before any reservation if no upstream does); forward chooses which.
        operation = endpoint.operation
        self.backend = ctx.router.pick(model, operation) or await ctx.router.pick_fresh(model, body["model"], operation)
        prompt_tokens = await endpoint.estimate(body, model, self)
        budget, capped_by = self.completion_budget(model, prompt_tokens, requested)
        sink.log_fields.update(model=model, stream=stream)  # before reserving: refusals are logged per model too
        ticket = await ctx.meter.reserve(
            caller=self.caller,
            model=model,
            endpoint=endpoint.name,
            stream=stream,
            prompt_tokens=prompt_tokens,
            completion_tokens=budget,
            completion_is_default=capped_by is not None,
            request_id=self.request_id,
        )
        if type(ticket) is Refusal:
            return ticket
        sink.admitted(ticket, budget, capped_by)
        upstream_body = endpoint.forward_body(body, ticket.completion_tokens, stream)
        error: BaseException | None = None
        try:
            resp = await self.forward(ticket, upstream_body)
            answer = await (self.relay_stream(resp) if stream else self.relay_once(resp))
        except BaseException as exc:
            error = exc
        usage = await self.end(ticket, error)
        if error is not None:
            raise error
        if stream:
            await sink.send(endpoint.stream_end(self, usage))
            sink.finish()
        else:
            sink.finish(answer)
        return None

    def parse_foreign(self, body: dict[str, Any], exc: InvalidModelName) -> tuple[str, bool, bool, int | None]:
        """A model name Ollama's rules refuse: served under that id if an openai-kind upstream lists it
        (the rest of the body checked as usual), else the 400 it was."""
        model = self.ctx.router.foreign_model(exc.raw)
        if model is None:
            raise exc
        _, stream, include_usage, requested = self.endpoint.parse({**body, "model": "standin"})
        return model, stream, include_usage, requested

    def completion_budget(self, model: str, prompt_tokens: int, requested: int | None) -> tuple[int, str | None]:
        """The completion tokens to reserve, and None if the client chose them, else what proxyd's
        budget came from: "default" or "context_window" (the meter may shrink it further)."""
        if requested is not None:
            return requested, None
        if not self.endpoint.reserves_completion:
            return 0, None
        spec = self.tokens.spec(model)
        room = spec["context_window"] - prompt_tokens
        config = self.ctx.config
        default = spec.get("default_max_tokens") or config["estimate.default_max_tokens"]
        # Not below min_completion_tokens even when the prompt (nearly) fills the context window: that
        # window is proxyd's guess, and Ollama itself truncates an overlong prompt and answers normally,
        # so a budget of 1 would only cut the answer to one token.
        budget = min(default, max(config["estimate.min_completion_tokens"], room))
        return budget, "default" if budget == default else "context_window"

    # -- forward ----------------------------------------------------------------------------------------

    def interrupted(self) -> BaseException | None:
        """What ends the request when the relay fails because it was interrupted: proxyd cut it off, or
        the client left. None: a genuine upstream failure."""
        sink = self.sink
        if sink.stopped is not None:
            return sink.stopped
        return ClientGone() if sink.gone else None

    def drop_upstream(self) -> None:
        """The client left or proxyd cut the request off: stop the upstream's work now. Before its headers
        that means cancelling the wait (a non-stream answer's headers come only after the whole
        generation); after them, aborting the response (harmless once it was read whole)."""
        if self.waiting is not None:
            self.waiting.cancel()  # lands in forward's await, which turns it into the interruption
        if self.resp is not None:
            self.resp.abort()

    async def forward(self, ticket: Ticket, body: dict[str, Any]):
        """The upstream's response headers, from the router's choice; while nothing reached the client
        (refused, reset, or 429/502/503/504 before the first byte) the next upstream serving the model,
        up to upstream.max_attempts. The ticket says where it went and after how many attempts."""
        sink, router, operation = self.sink, self.ctx.router, self.endpoint.operation
        backend = router.acquire(ticket.model, None, operation)
        tried = [backend]
        while True:
            self.backend = self.held = backend
            ticket.upstream = backend.upstream_name
            ticket.attempts += 1
            if sink.gone or sink.stopped is not None:
                raise self.interrupted()  # left or cut off (while images were fetched, or between attempts): void
            started = time.perf_counter()
            # While this await waits for the upstream's headers, drop_upstream may cancel this very task
            # (cheaper than running the request as a task of its own: no second task per request). The
            # cancel interrupts aiohttp's request, which closes the upstream connection.
            task = self.waiting = asyncio.current_task()
            try:
                resp = await backend.open("POST", backend.paths[operation], body)
            except asyncio.CancelledError:
                stop = self.interrupted()
                if stop is None:
                    raise  # a cancel from elsewhere: not ours to swallow
                # Voided (end): nothing was delivered, and whether the upstream evaluated the prompt is
                # unknown (the request may have waited in the pool, or in Ollama's queue behind others).
                raise stop from None
            except UpstreamUnavailable as exc:  # refused or reset: it never answered
                after = self.failover(ticket, tried, exc.detail or exc.message)
                if after is None:
                    raise
                backend = after
                continue
            finally:
                self.waiting = None
                if (sink.gone or sink.stopped is not None) and task.cancelling():
                    task.uncancel()  # our cancel, handled here (even if it was swallowed): later timeouts work
            self.first_byte_s = seconds = time.perf_counter() - started
            metrics = self.ctx.metrics
            if metrics is not None:
                metrics.upstream_first_byte(self.endpoint.name, seconds)
            self.resp = resp
            if sink.gone or sink.stopped is not None:
                resp.abort()
                raise self.interrupted()
            if resp.status == 200:
                return resp
            if resp.status in FAILOVER_STATUSES:
                after = self.failover(ticket, tried, f"HTTP {resp.status}")
                if after is not None:
                    resp.abort()
                    self.resp, backend = None, after
                    continue
            raise backend.error(resp.status, await resp.read())

    def failover(self, ticket: Ticket, tried: list[Any], why: str) -> Any:
        """The next upstream for a request whose attempt failed before anything reached the client, or
        None (attempts used up, no other upstream serves the model): then that failure is the answer,
        and ``end`` gives the failed upstream's slot back. A 429 is no failure of the upstream's health."""
        router = self.ctx.router
        if ticket.attempts >= router.max_attempts:
            return None
        backend = router.acquire(ticket.model, tried, self.endpoint.operation)
        if backend is None:
            return None
        failed, self.held = self.held, None
        router.release(failed, why != "HTTP 429", None, why)
        tried.append(backend)
        log.info("%s: upstream %s failed before the first byte (%s); trying %s", ticket.request_id,
                 failed.upstream_name, why, backend.upstream_name)
        return backend

    # -- relay ----------------------------------------------------------------------------------------------

    async def relay_once(self, resp: Any) -> bytes:
        """The whole answer, read; returns the client's body (sent after the settle)."""
        try:
            raw = await resp.read()
        except ProxyError:
            stop = self.interrupted()
            if stop is not None:
                raise stop from None
            raise
        return self.endpoint.answer(raw, self)

    async def relay_stream(self, resp: Any) -> None:
        """Event by event, as they come; everything but the stream's end (sent after the settle)."""
        sink, relay_event = self.sink, self.endpoint.relay_event
        sink.start_stream(self.endpoint.stream_content_type)
        parser = self.backend.stream_parser(self.endpoint.operation)
        done = False
        try:
            async for chunk in resp.chunks():
                out = []
                for data in parser.feed(chunk):
                    if data == DONE:
                        done = True
                        break
                    relayed = relay_event(data, self)
                    if relayed is not None:
                        out.append(relayed)
                    if self.upstream_done:
                        done = True
                        break
                if out:
                    await sink.send(b"".join(out))
                    self.delivered = True
                if done:
                    break
        except ProxyError:
            stop = self.interrupted()
            if stop is not None:
                raise stop from None
            raise
        finally:
            # Done: the connection goes back to the pool. Otherwise (client gone, upstream broken) drop it,
            # which also tells the upstream to stop generating.
            resp.release() if done else resp.abort()
        if not done:
            raise UpstreamUnavailable("Upstream stream ended before its end (connection cut or upstream error).")

    # -- settle ----------------------------------------------------------------------------------------------

    async def usage_of(self, ticket: Ticket) -> Usage:
        """The upstream's reported usage when there is any, else counted from what was relayed."""
        u = self.usage
        if u is not None and isinstance(u.get("prompt_tokens"), int) and isinstance(u.get("completion_tokens", 0), int):
            # An upstream that prices its own requests (OpenRouter's usage.cost) is billed that price.
            cost = reported_cost_nusd(u["cost"]) if "cost" in u and self.backend.reports_cost else None
            return Usage(u["prompt_tokens"], u.get("completion_tokens", 0), "reported", cost)
        counts = await self.tokens.count_many(ticket.model, self.texts) if self.texts else []
        return Usage(ticket.prompt_tokens, sum(counts), "counted")

    async def end(self, ticket: Ticket, error: BaseException | None) -> Usage | None:
        """The one place a reservation ends: settled or voided, exactly once. Returns the usage settled
        of a complete answer (its stream's usage event, if one is owed, says what was billed)."""
        meter = self.ctx.meter
        held = self.held
        if held is not None:
            # Given back for routing, with its verdict for the upstream's health: an upstream failure
            # (unreachable, cut, silent, 5xx) counts against it; the client leaving or a 4xx does not.
            self.held = None
            failed = error is not None and (
                isinstance(error, (UpstreamUnavailable, UpstreamTimeout))
                or (isinstance(error, UpstreamError) and error.status >= 500)) and self.interrupted() is None
            self.ctx.router.release(held, failed, self.first_byte_s, str(error) if failed else "")
        if error is None:
            usage = await self.usage_of(ticket)
            await meter.settle(ticket, usage)  # a ledger failure here fails the request: nothing unbilled
            return usage
        sink = self.sink
        stopped = sink.stopped
        accepted = self.resp is not None and self.resp.status == 200
        if self.delivered or ((sink.gone or stopped is not None) and accepted):
            # The client got part of an answer, or left (or was cut off) after the upstream took the
            # request (200: the prompt was evaluated; an error answer, e.g. 404 for an unknown model,
            # evaluated nothing): bill the prompt plus what was relayed (reported usage if it came, else
            # counted).
            status = stopped.status if stopped is not None else 499 if sink.gone else 502
            try:
                await meter.settle(ticket, await self.usage_of(ticket), http_status=status)
            except Exception:
                log.exception("settle after an interrupted request failed (%s)", ticket.request_id)
        else:
            status = error.status if isinstance(error, ProxyError) else 499 if sink.gone else 500
            await meter.void(ticket, http_status=status, error=str(error))
        return None
