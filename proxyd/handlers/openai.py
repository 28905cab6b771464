"""The OpenAI-compatible routes: chat completions, completions, embeddings, models.

One request's path, top to bottom (``ProxyHandler.proxy``):

    auth (prepare) -> validate -> inline images -> estimate -> reserve (meter.admit)
      -> forward (upstream.request) -> relay (once, or event by event)
      -> settle (awaited: durable before the last byte) -> last byte
    and in ``finally``: a reservation not settled by then is settled with what the client got
    (client gone mid-stream, upstream cut after output) or voided (nothing delivered).

A running request can also be ended from outside (``cut_off``: key revoked, user disabled, shutdown
deadline) or by a client that stops reading (``send``'s stall timeout); both end in the same
``finally``, billed for what was relayed.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import struct
import termios
import time
from typing import Any
from urllib.parse import quote

from tornado.iostream import StreamClosedError

from .. import jsonio, validate
from ..errors import InvalidRequest, NotFound, ProxyError, UpstreamError, UpstreamUnavailable, openai_type_for_status
from ..meter import Ticket, Usage
from ..modelname import canonical, why_invalid
from ..sse import DONE, SSEParser, event
from ..upstream import without_addresses
from .base import BaseHandler, ClientGone

log = logging.getLogger("proxyd.proxy")


class Outcome:
    """What happened on the wire, for settling: reported usage, the text relayed, whether anything was."""

    __slots__ = ("usage", "texts", "delivered", "usage_relayed", "last_event")

    def __init__(self) -> None:
        self.usage: dict[str, Any] | None = None
        self.texts: list[str] = []
        self.delivered = False
        self.usage_relayed = False  # the client got a usage chunk (streams with include_usage)
        self.last_event: dict[str, Any] | None = None  # the last stream event (its object, model, created)


class ProxyHandler(BaseHandler):
    endpoint = ""  # ledger name, e.g. "chat.completions"
    upstream_path = ""
    id_prefix = ""
    chunk_object = ""  # the "object" of a stream event, e.g. "chat.completion.chunk"

    # Per-request state, defaults on the class (set on the instance when they change): no method call
    # per request to set them, and write_error can read them also for a request refused before or in
    # prepare() (405, auth).
    _upstream_resp = None
    _waiting_task: asyncio.Task | None = None  # this handler's task while it waits for Ollama's headers
    _client_gone = False
    _cut_off: ProxyError | None = None  # set by cut_off(): the error this request ends with
    _cut_off_reason = ""
    _stalled_flush = None  # the flush being waited for while the client's socket buffer is full

    def prepare(self) -> None:
        super().prepare()
        self.authenticate_user()

    def on_connection_close(self) -> None:
        # The client went away: drop the upstream connection so Ollama stops generating. Before
        # Ollama's headers that means cancelling the pending request (a non-stream answer's headers
        # come only after the whole generation); after them, aborting the response being relayed.
        super().on_connection_close()
        self._client_gone = True
        task = self._waiting_task
        if task is not None:
            task.cancel()  # lands in open_upstream's await, which turns it into ClientGone
        if self._upstream_resp is not None:
            self._upstream_resp.abort()

    def cut_off(self, error: ProxyError, reason: str) -> None:
        """Ends this request with ``error`` (an error event mid-stream, else a plain error answer),
        billed for what was relayed. Dropping the upstream connection wakes the relay at once: the read
        it waits in fails, and the failure becomes ``error`` (see ``_interrupted``)."""
        if self._cut_off is not None or self._finished:
            return
        self._cut_off, self._cut_off_reason = error, reason
        if self._waiting_task is not None:
            self._waiting_task.cancel()  # still waiting for Ollama's headers: as in on_connection_close
        if self._upstream_resp is not None:
            self._upstream_resp.abort()  # harmless once the answer was read whole (released)
        if self._stalled_flush is not None:
            # Stuck writing to a client that does not read: no error event would get through either.
            self.request.connection.close()

    def _interrupted(self) -> BaseException | None:
        """What ends the request when the relay fails because it was interrupted: the client left, or
        proxyd cut it off. None: a genuine upstream failure."""
        if self._cut_off is not None:
            return self._cut_off
        return ClientGone() if self._client_gone else None

    # -- the path ------------------------------------------------------------------------------------

    async def proxy(self, body: dict[str, Any], *, model: str, stream: bool, include_usage: bool, prompt_tokens: int) -> None:
        meter = self.ctx.meter
        requested = validate.max_tokens(body)
        budget, capped_by = self.completion_budget(model, prompt_tokens, requested)
        self.log_fields.update(model=model, stream=stream)  # before admit: refusals are logged per model too
        ticket = meter.admit(
            caller=self.caller,
            model=model,
            endpoint=self.endpoint,
            stream=stream,
            prompt_tokens=prompt_tokens,
            completion_tokens=budget,
            completion_is_default=capped_by is not None,
            request_id=self.request_id,
        )
        for name, value in ticket.headers.items():
            self.set_header(name, value)
        if capped_by is not None:
            # proxyd chose max_tokens (the client sent none): say so, or an answer ending with
            # finish_reason "length" would give no clue why. The meter may have shrunk it to the allowance.
            self.set_header("x-proxyd-max-tokens", str(ticket.completion_tokens))
            self.set_header("x-proxyd-max-tokens-reason", "allowance" if ticket.completion_tokens < budget else capped_by)
        self.forward_body(body, ticket, stream)
        outcome = Outcome()
        error: BaseException | None = None
        try:
            if stream:
                await self.relay_stream(ticket, body, outcome, include_usage)
            else:
                await self.relay_once(ticket, body, outcome)
        except BaseException as exc:
            error = exc
            raise
        finally:
            if not ticket.ended:
                await self.end_unsettled(ticket, outcome, error)

    def completion_budget(self, model: str, prompt_tokens: int, requested: int | None) -> tuple[int, str | None]:
        """The completion tokens to reserve, and None if the client chose them, else what proxyd's
        budget came from: "default" or "context_window" (the meter may shrink it further)."""
        if requested is not None:
            return requested, None
        spec = self.ctx.model_spec(model)
        room = spec["context_window"] - prompt_tokens
        default = spec.get("default_max_tokens") or self.ctx.config["estimate.default_max_tokens"]
        # Not below min_completion_tokens even when the prompt (nearly) fills the context window: that
        # window is proxyd's guess, and Ollama itself truncates an overlong prompt and answers normally,
        # so a budget of 1 would only cut the answer to one token.
        budget = min(default, max(self.ctx.config["estimate.min_completion_tokens"], room))
        return budget, "default" if budget == default else "context_window"

    def forward_body(self, body: dict[str, Any], ticket: Ticket, stream: bool) -> None:
        """What Ollama gets: max_tokens = the reserved budget, so the reservation stays an upper bound
        (Ollama ignores max_completion_tokens, and without a cap it may generate past any budget)."""
        body.pop("max_completion_tokens", None)
        body["max_tokens"] = ticket.completion_tokens
        if stream:
            # Always ask for the usage chunk; it is dropped again if the client did not ask for it.
            body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}

    async def open_upstream(self, body: dict[str, Any]):
        if self._client_gone or self._cut_off is not None:
            raise self._interrupted()  # left or cut off while images were fetched or the prompt counted: void
        started = time.perf_counter()
        # While this await waits for Ollama's headers, on_connection_close may cancel this very task
        # (cheaper than running the request as a task of its own: no second task per request). The
        # cancel interrupts aiohttp's request, which closes the upstream connection.
        task = self._waiting_task = asyncio.current_task()
        try:
            resp = await self.ctx.upstream.request("POST", self.upstream_path, body)
        except asyncio.CancelledError:
            stop = self._interrupted()
            if stop is None:
                raise  # a cancel from elsewhere: not ours to swallow
            # Voided (end_unsettled): nothing was delivered, and whether Ollama evaluated the prompt is
            # unknown (the request may have waited in the pool, or in Ollama's queue behind others).
            raise stop from None
        finally:
            self._waiting_task = None
            if (self._client_gone or self._cut_off is not None) and task.cancelling():
                task.uncancel()  # our cancel, handled here (even if it was swallowed): later timeouts work
        if self.ctx.metrics is not None:
            self.ctx.metrics.upstream_first_byte(self.endpoint, time.perf_counter() - started)
        self._upstream_resp = resp
        if self._client_gone or self._cut_off is not None:
            resp.abort()
            raise self._interrupted()
        if resp.status != 200:
            raise upstream_error(resp.status, await resp.read())
        return resp

    # -- non-stream ------------------------------------------------------------------------------------

    async def relay_once(self, ticket: Ticket, body: dict[str, Any], outcome: Outcome) -> None:
        resp = await self.open_upstream(body)
        try:
            raw = await resp.read()
        except ProxyError:
            stop = self._interrupted()
            if stop is not None:
                raise stop from None
            raise
        try:
            doc = jsonio.loads(raw)
            if not isinstance(doc, dict):
                raise ValueError("not an object")
        except ValueError:
            raise UpstreamUnavailable("Upstream answered with invalid JSON.") from None
        outcome.usage = doc.get("usage") if isinstance(doc.get("usage"), dict) else None
        self.collect_text(doc, outcome)
        await self.ctx.meter.settle(ticket, await self.usage_of(ticket, outcome))
        self.finish(with_our_id(raw, doc, (self.id_prefix + self.request_id[4:]).encode()))

    # -- stream -------------------------------------------------------------------------------------------

    async def relay_stream(self, ticket: Ticket, body: dict[str, Any], outcome: Outcome, include_usage: bool) -> None:
        resp = await self.open_upstream(body)
        self.set_header("Content-Type", "text/event-stream")
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Accel-Buffering", "no")  # tell nginx-style fronts not to buffer the stream
        parser = SSEParser()
        our_id = (self.id_prefix + self.request_id[4:]).encode()
        done = False
        try:
            async for chunk in resp.chunks():
                out = []
                for data in parser.feed(chunk):
                    if data == DONE:
                        done = True
                        break
                    relayed = self.relay_event(data, outcome, include_usage, our_id)
                    if relayed is not None:
                        out.append(event(relayed))
                if out:
                    await self.send(b"".join(out))
                    outcome.delivered = True
                if done:
                    break
        except ProxyError:
            stop = self._interrupted()
            if stop is not None:
                raise stop from None
            raise
        finally:
            # Done: the connection goes back to the pool. Otherwise (client gone, upstream broken) drop it,
            # which also tells Ollama to stop generating.
            resp.release() if done else resp.abort()
        if not done:
            raise UpstreamUnavailable("Upstream stream ended without [DONE] (connection cut or upstream error).")
        usage = await self.usage_of(ticket, outcome)
        await self.ctx.meter.settle(ticket, usage)
        if include_usage and not outcome.usage_relayed:
            # The client asked for usage and the upstream sent none (Ollama before 0.5.2, a llama.cpp
            # server): OpenAI always sends the chunk, so proxyd sends what it billed.
            shape = outcome.last_event or {"object": self.chunk_object, "model": body.get("model", "")}
            await self.send(event(jsonio.dumps(usage_chunk(shape, usage, our_id))))
        await self.send(event(DONE))
        self.finish()

    def relay_event(self, data: bytes, outcome: Outcome, include_usage: bool, our_id: bytes) -> bytes | None:
        """One upstream event -> what the client gets (None: dropped). Collects usage and text."""
        try:
            doc = jsonio.loads(data)
        except ValueError:
            raise UpstreamUnavailable("Upstream sent an event that is not valid JSON.") from None
        if not isinstance(doc, dict):
            raise UpstreamUnavailable("Upstream sent an event that is not a JSON object.")
        if "error" in doc:
            err = doc["error"]
            message = str(err.get("message") if isinstance(err, dict) else err)
            raise UpstreamError(f"Upstream error mid-stream: {without_addresses(message)}", status=502, detail=message)
        self.collect_text(doc, outcome)
        outcome.last_event = doc
        usage = doc.get("usage")
        if isinstance(usage, dict):
            # The usage chunk is the one with no choices; its figures count even when they are zero (an
            # empty prompt). Other chunks of /v1/completions carry a zeroed usage object: ignored.
            is_usage_chunk = not doc.get("choices")
            if is_usage_chunk or usage.get("total_tokens"):
                outcome.usage = usage
                outcome.usage_relayed = include_usage  # the client sees this usage: none to add at the end
            if is_usage_chunk and not include_usage:
                return None  # the usage-only chunk proxyd asked for on its own behalf
        if "usage" in doc and not include_usage:
            # /v1/completions puts a zeroed usage object on every chunk once include_usage is on:
            # the client did not ask for it, so it must not see it.
            del doc["usage"]
            doc["id"] = our_id.decode()
            return jsonio.dumps(doc)
        return with_our_id(data, doc, our_id)

    async def send(self, data: bytes) -> None:
        """Writes and waits for the client to take it (backpressure); raises ClientGone.

        A client that stops reading would otherwise hold this request, and Ollama's slot behind it, until
        its connection dies: proxyd waits for it, so it stops reading Ollama, so Ollama's own timeouts
        never fire. That wait is bounded (``_wait_for_client``). It is entered only when the flush did
        not complete at once: Tornado's flush future is already done whenever the socket buffer took the
        bytes, as it does for nearly every event, so the usual cost is one ``done()`` call."""
        if self._client_gone:
            raise ClientGone()
        self.write(data)
        flushed = self.flush()
        try:
            if flushed.done():
                await flushed  # no suspension: raises StreamClosedError if the client is gone
            else:
                await self._wait_for_client(flushed)
        except StreamClosedError:
            self._client_gone = True
            raise self._cut_off or ClientGone() from None  # cut off while stuck: log it as that, not 499

    async def _wait_for_client(self, flushed) -> None:
        """Waits for a flush while the client's socket buffer is full. server.write_stall_timeout_s in
        which the client took no byte ends the request: the upstream is dropped (Ollama's slot is free
        again), the connection closed, and what was relayed is billed (end_unsettled). A slow client
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
        self._client_gone = True
        self.log_fields["cut_off"] = "write_stall"
        log.info("%s: the client took nothing for %gs; request ended", self.request_id, stall)
        if self._upstream_resp is not None:
            self._upstream_resp.abort()  # Ollama stops generating now
        self.request.connection.close()
        raise ClientGone()

    # -- settling -----------------------------------------------------------------------------------------

    def collect_text(self, doc: dict[str, Any], outcome: Outcome) -> None:
        """Text of the answer (for counting when the upstream reports no usage)."""
        for choice in doc.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            part = choice.get("delta") or choice.get("message")
            if isinstance(part, dict):
                for key in ("content", "reasoning", "reasoning_content"):
                    if isinstance(part.get(key), str) and part[key]:
                        outcome.texts.append(part[key])
                for call in part.get("tool_calls") or ():
                    fn = call.get("function") if isinstance(call, dict) else None
                    if isinstance(fn, dict):
                        outcome.texts.append(str(fn.get("name") or "") + str(fn.get("arguments") or ""))
            elif isinstance(choice.get("text"), str) and choice["text"]:
                outcome.texts.append(choice["text"])

    async def usage_of(self, ticket: Ticket, outcome: Outcome) -> Usage:
        """Ollama's reported usage when there is any, else counted from what was relayed."""
        u = outcome.usage
        if u is not None and isinstance(u.get("prompt_tokens"), int) and isinstance(u.get("completion_tokens", 0), int):
            return Usage(u["prompt_tokens"], u.get("completion_tokens", 0), "reported")
        counts = await self.ctx.tokens.count_many(ticket.model, outcome.texts) if outcome.texts else []
        return Usage(ticket.prompt_tokens, sum(counts), "counted")

    async def end_unsettled(self, ticket: Ticket, outcome: Outcome, error: BaseException | None) -> None:
        """The one exit for a reservation the relay did not settle."""
        meter = self.ctx.meter
        accepted = self._upstream_resp is not None and self._upstream_resp.status == 200
        cut_off = self._cut_off
        if outcome.delivered or ((self._client_gone or cut_off is not None) and accepted):
            # The client got part of an answer, or left (or was cut off) after Ollama took the request
            # (200: the prompt was evaluated; an error answer, e.g. 404 for an unknown model, evaluated
            # nothing): bill the prompt plus what was relayed (reported usage if it came, else counted).
            status = cut_off.status if cut_off is not None else 499 if self._client_gone else 502
            try:
                await meter.settle(ticket, await self.usage_of(ticket, outcome), http_status=status)
            except Exception:
                log.exception("settle after an interrupted request failed (%s)", ticket.request_id)
        else:
            status = error.status if isinstance(error, ProxyError) else 499 if self._client_gone else 500
            meter.void(ticket, http_status=status, error=str(error or "not completed"))

    # -- errors after the headers went out ----------------------------------------------------------------

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, ClientGone):
            return
        if exc is not None and exc is self._cut_off:
            self.log_fields["cut_off"] = self._cut_off_reason  # proxyd ended it: "shutdown", "key_revoked", ...
        if self._headers_written:
            # Mid-stream: the status line is gone. End the stream with an error event (the openai SDK
            # raises APIError on it) and no [DONE], so no client mistakes it for a complete answer.
            err = exc if isinstance(exc, ProxyError) else ProxyError(f"Internal error in proxyd (request {self.request_id}).")
            self.log_fields["error"] = err.message
            # The client saw 200 before the error; the access log, the metrics and the ledger row say how
            # the request ended (503 at the shutdown deadline, 502 for a cut upstream, ...).
            self.set_status(err.status)
            try:
                self.write(event(json.dumps(err.body()).encode()))
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


def usage_chunk(last: dict[str, Any], usage: Usage, our_id: bytes) -> dict[str, Any]:
    """A stream's usage chunk in OpenAI's shape, shaped like the stream's other events (``last``)."""
    return {
        "id": our_id.decode(),
        "object": last.get("object", "chat.completion.chunk"),
        "created": last.get("created", int(time.time())),
        "model": last.get("model", ""),
        "system_fingerprint": last.get("system_fingerprint", "fp_ollama"),
        "choices": [],
        "usage": {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                  "total_tokens": usage.prompt_tokens + usage.completion_tokens},
    }


def with_our_id(raw: bytes, doc: dict[str, Any], our_id: bytes) -> bytes:
    """The upstream JSON with its id replaced by proxyd's (Ollama's ids repeat): a byte replacement of
    the compact `"id":"..."` Ollama writes, re-serialising only when the text is laid out otherwise."""
    upstream_id = doc.get("id")
    if not isinstance(upstream_id, str):
        return raw
    old = b'"id":"' + upstream_id.encode() + b'"'
    if old in raw:
        return raw.replace(old, b'"id":"' + our_id + b'"', 1)
    doc["id"] = our_id.decode()
    return jsonio.dumps(doc)


def upstream_error(status: int, raw: bytes) -> ProxyError:
    """Ollama's error passes through with its status; a non-JSON body is described."""
    # Ollama's 503 means its queue is full: tell clients when to come back.
    headers = {"Retry-After": "1"} if status == 503 else None
    kind, code, param = openai_type_for_status(status), None, None
    try:
        err = jsonio.loads(raw)["error"]
        if isinstance(err, dict):
            message = str(err.get("message") or f"Upstream returned HTTP {status}.")
            kind, code, param = err.get("type") or kind, err.get("code"), err.get("param")
        else:
            message = str(err)
    except (ValueError, KeyError, TypeError):
        text = raw.decode("utf-8", "replace").strip()[:300]
        message = f"Upstream returned HTTP {status}" + (f": {text}" if text else " with an empty body.")
    # Ollama's runner errors name the runner's URL ('Post "http://127.0.0.1:39123/completion": EOF'):
    # the client gets the message without addresses, the log the original (see BaseHandler.log_exception).
    public = without_addresses(message)
    detail = message if public != message else None
    message = public
    if status == 500 and "missing data required for image input" in message:
        # Ollama's answer to an image sent to a model without vision: the client's mistake, not a crash.
        return UpstreamError("This model does not accept images (" + message + ").", status=400,
                             type="invalid_request_error", param="messages")
    return UpstreamError(message, status=status, type=kind, code=code, param=param, headers=headers, detail=detail)


# -- routes ---------------------------------------------------------------------------------------------


class ChatCompletionsHandler(ProxyHandler):
    endpoint = "chat.completions"
    upstream_path = "/v1/chat/completions"
    id_prefix = "chatcmpl-"
    chunk_object = "chat.completion.chunk"

    async def post(self) -> None:
        body = self.json_body()
        model, stream, include_usage = validate.chat(body)
        images = await self.ctx.images.inline(body["messages"])
        prompt = await self.ctx.tokens.chat_prompt(model, body["messages"], body.get("tools"))
        self.log_fields["images"] = images
        await self.proxy(body, model=model, stream=stream, include_usage=include_usage, prompt_tokens=prompt)


class CompletionsHandler(ProxyHandler):
    endpoint = "completions"
    upstream_path = "/v1/completions"
    id_prefix = "cmpl-"
    chunk_object = "text_completion"

    async def post(self) -> None:
        body = self.json_body()
        model, stream, include_usage = validate.completions(body)
        prompt = await self.ctx.tokens.text_prompt(model, body["prompt"], body.get("suffix"))
        await self.proxy(body, model=model, stream=stream, include_usage=include_usage, prompt_tokens=prompt)


class EmbeddingsHandler(ProxyHandler):
    endpoint = "embeddings"
    upstream_path = "/v1/embeddings"

    async def post(self) -> None:
        body = self.json_body()
        model, inputs = validate.embeddings(body)
        prompt = await self.ctx.tokens.embedding_input(model, inputs)
        await self.proxy(body, model=model, stream=False, include_usage=False, prompt_tokens=prompt)

    def completion_budget(self, model: str, prompt_tokens: int, requested: int | None) -> tuple[int, str | None]:
        return 0, None

    def forward_body(self, body: dict[str, Any], ticket: Ticket, stream: bool) -> None:
        pass  # embeddings have no completion

    def collect_text(self, doc: dict[str, Any], outcome: Outcome) -> None:
        pass

    async def relay_once(self, ticket: Ticket, body: dict[str, Any], outcome: Outcome) -> None:
        resp = await self.open_upstream(body)
        try:
            raw = await resp.read()
        except ProxyError:
            stop = self._interrupted()
            if stop is not None:
                raise stop from None
            raise
        try:
            doc = jsonio.loads(raw)
            usage = doc.get("usage") or {}
        except (ValueError, AttributeError):
            raise UpstreamUnavailable("Upstream answered with invalid JSON.") from None
        if isinstance(usage.get("prompt_tokens"), int):
            outcome.usage = {"prompt_tokens": usage["prompt_tokens"], "completion_tokens": 0}
        await self.ctx.meter.settle(ticket, await self.usage_of(ticket, outcome))
        self.send_json(doc)


class ModelsHandler(BaseHandler):
    """GET /v1/models and /v1/models/{model}: passed through, not metered."""

    def prepare(self) -> None:
        super().prepare()
        self.authenticate_user()

    async def get(self, model: str | None = None) -> None:
        path = "/v1/models"
        if model is not None:
            # The name is one path segment of Ollama's route (gin matches /v1/models/:model on the
            # decoded path), so a name with "/" — hf.co/org/m, ../../api/version, ..%2fapi — is no route
            # there: 404, without asking. Anything else must be a name Ollama accepts (400 otherwise, as
            # Ollama answers) and is sent percent-encoded whole, so no part of it can become a path
            # segment of its own ("..") and leave the route.
            if "/" in model:
                raise NotFound(f"The model '{model}' does not exist", code="model_not_found")
            if not canonical(model):
                raise InvalidRequest(f"invalid model name {model!r}: {why_invalid(model)}", param="model")
            path += "/" + quote(model, safe="")
        resp = await self.ctx.upstream.request("GET", path)
        raw = await resp.read()
        if resp.status != 200:
            raise upstream_error(resp.status, raw)
        try:
            doc = jsonio.loads(raw)
        except ValueError:
            raise UpstreamUnavailable("Upstream answered with invalid JSON.") from None
        if model is None and isinstance(doc, dict) and doc.get("data") is None:
            doc["data"] = []  # Ollama sends null when no model is installed; the SDK expects a list
        self.send_json(doc)
