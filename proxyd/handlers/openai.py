"""The OpenAI-compatible routes: chat completions, completions, embeddings, models.

One request's path, top to bottom (``ProxyHandler.proxy``):

    auth (prepare) -> validate -> inline images -> estimate -> reserve (meter.admit)
      -> forward (upstream.request) -> relay (once, or event by event)
      -> settle (awaited: durable before the last byte) -> last byte
    and in ``finally``: a reservation not settled by then is settled with what the client got
    (client gone mid-stream, upstream cut after output) or voided (nothing delivered).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any
from urllib.parse import quote

from tornado.iostream import StreamClosedError

from .. import jsonio, validate
from ..errors import ProxyError, UpstreamError, UpstreamUnavailable, openai_type_for_status
from ..meter import Ticket, Usage
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

    def prepare(self) -> None:
        super().prepare()
        self.authenticate_user()
        self._upstream_resp = None
        self._waiting_task: asyncio.Task | None = None  # this handler's task while it waits for Ollama's headers
        self._client_gone = False

    def on_connection_close(self) -> None:
        # The client went away: drop the upstream connection so Ollama stops generating. Before
        # Ollama's headers that means cancelling the pending request (a non-stream answer's headers
        # come only after the whole generation); after them, aborting the response being relayed.
        super().on_connection_close()
        self._client_gone = True
        task = getattr(self, "_waiting_task", None)
        if task is not None:
            task.cancel()  # lands in open_upstream's await, which turns it into ClientGone
        if getattr(self, "_upstream_resp", None) is not None:
            self._upstream_resp.abort()

    # -- the path ------------------------------------------------------------------------------------

    async def proxy(self, body: dict[str, Any], *, model: str, stream: bool, include_usage: bool, prompt_tokens: int) -> None:
        meter = self.ctx.meter
        requested = validate.max_tokens(body)
        budget, is_default = self.completion_budget(model, prompt_tokens, requested)
        ticket = meter.admit(
            caller=self.caller,
            model=model,
            endpoint=self.endpoint,
            stream=stream,
            prompt_tokens=prompt_tokens,
            completion_tokens=budget,
            completion_is_default=is_default,
            request_id=self.request_id,
        )
        self.log_fields.update(model=model, stream=stream)
        for name, value in ticket.headers.items():
            self.set_header(name, value)
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

    def completion_budget(self, model: str, prompt_tokens: int, requested: int | None) -> tuple[int, bool]:
        """The completion tokens to reserve, and whether that is proxyd's default (may be shrunk)."""
        if requested is not None:
            return requested, False
        spec = self.ctx.model_spec(model)
        room = spec["context_window"] - prompt_tokens
        default = spec.get("default_max_tokens") or self.ctx.config["estimate.default_max_tokens"]
        # Not below min_completion_tokens even when the prompt (nearly) fills the context window: that
        # window is proxyd's guess, and Ollama itself truncates an overlong prompt and answers normally,
        # so a budget of 1 would only cut the answer to one token.
        return min(default, max(self.ctx.config["estimate.min_completion_tokens"], room)), True

    def forward_body(self, body: dict[str, Any], ticket: Ticket, stream: bool) -> None:
        """What Ollama gets: max_tokens = the reserved budget, so the reservation stays an upper bound
        (Ollama ignores max_completion_tokens, and without a cap it may generate past any budget)."""
        body.pop("max_completion_tokens", None)
        body["max_tokens"] = ticket.completion_tokens
        if stream:
            # Always ask for the usage chunk; it is dropped again if the client did not ask for it.
            body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}

    async def open_upstream(self, body: dict[str, Any]):
        if self._client_gone:  # left while images were fetched or the prompt counted: nothing to do, void
            raise ClientGone()
        started = time.perf_counter()
        # While this await waits for Ollama's headers, on_connection_close may cancel this very task
        # (cheaper than running the request as a task of its own: no second task per request). The
        # cancel interrupts aiohttp's request, which closes the upstream connection.
        task = self._waiting_task = asyncio.current_task()
        try:
            resp = await self.ctx.upstream.request("POST", self.upstream_path, body)
        except asyncio.CancelledError:
            if not self._client_gone:
                raise  # a cancel from elsewhere (shutdown): not ours to swallow
            # Voided (end_unsettled): nothing was delivered, and whether Ollama evaluated the prompt is
            # unknown (the request may have waited in the pool, or in Ollama's queue behind others).
            raise ClientGone() from None
        finally:
            self._waiting_task = None
            if self._client_gone and task.cancelling():
                task.uncancel()  # our cancel, handled here (even if it was swallowed): later timeouts work
        if self.ctx.metrics is not None:
            self.ctx.metrics.upstream_first_byte(self.endpoint, time.perf_counter() - started)
        self._upstream_resp = resp
        if self._client_gone:
            resp.abort()
            raise ClientGone()
        if resp.status != 200:
            raise upstream_error(resp.status, await resp.read())
        return resp

    # -- non-stream ------------------------------------------------------------------------------------

    async def relay_once(self, ticket: Ticket, body: dict[str, Any], outcome: Outcome) -> None:
        resp = await self.open_upstream(body)
        try:
            raw = await resp.read()
        except ProxyError:
            if self._client_gone:
                raise ClientGone() from None
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
            if self._client_gone:
                raise ClientGone() from None
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
        """Writes and waits for the client to take it (backpressure); raises ClientGone."""
        if self._client_gone:
            raise ClientGone()
        self.write(data)
        try:
            await self.flush()
        except StreamClosedError:
            self._client_gone = True
            raise ClientGone() from None

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
        if outcome.delivered or (self._client_gone and accepted):
            # The client got part of an answer, or left after Ollama took the request (200: the prompt
            # was evaluated; an error answer, e.g. 404 for an unknown model, evaluated nothing): bill
            # the prompt plus what was relayed (reported usage if it came, else counted).
            try:
                await meter.settle(ticket, await self.usage_of(ticket, outcome), http_status=499 if self._client_gone else 502)
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
        if self._headers_written:
            # Mid-stream: the status line is gone. End the stream with an error event (the openai SDK
            # raises APIError on it) and no [DONE], so no client mistakes it for a complete answer.
            err = exc if isinstance(exc, ProxyError) else ProxyError(f"Internal error in proxyd (request {self.request_id}).")
            self.log_fields["error"] = err.message
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
        prompt = await self.ctx.tokens.text_prompt(model, body["prompt"])
        await self.proxy(body, model=model, stream=stream, include_usage=include_usage, prompt_tokens=prompt)


class EmbeddingsHandler(ProxyHandler):
    endpoint = "embeddings"
    upstream_path = "/v1/embeddings"

    async def post(self) -> None:
        body = self.json_body()
        model, inputs = validate.embeddings(body)
        prompt = await self.ctx.tokens.embedding_input(model, inputs)
        await self.proxy(body, model=model, stream=False, include_usage=False, prompt_tokens=prompt)

    def completion_budget(self, model: str, prompt_tokens: int, requested: int | None) -> tuple[int, bool]:
        return 0, False

    def forward_body(self, body: dict[str, Any], ticket: Ticket, stream: bool) -> None:
        pass  # embeddings have no completion

    def collect_text(self, doc: dict[str, Any], outcome: Outcome) -> None:
        pass

    async def relay_once(self, ticket: Ticket, body: dict[str, Any], outcome: Outcome) -> None:
        resp = await self.open_upstream(body)
        raw = await resp.read()
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
        path = "/v1/models" + (f"/{quote(model, safe=':/@')}" if model else "")
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
