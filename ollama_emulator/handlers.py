"""The Tornado handlers: Ollama's routes, its Host check, gin's plain 404/405, faults, delays,
streaming and cancellation. What is answered comes from wire.py; what a body means, from jobs.py."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import logging
import random
import struct
from typing import Any

import tornado.iostream
import tornado.web

from . import names
from .faults import Fault, pad_bytes, steer
from .jobs import Job, parse_chat, parse_completion, parse_embeddings
from .replies import Reply, embedding_vector, plan_reply
from .state import EmulatorState
from .templates import chat_prompt, completion_prompt, template_for
from .wire import (
    BUSY_MESSAGE,
    CONTENT,
    MODEL_CREATED,
    NO_VISION,
    NOT_AN_IMAGE,
    RUNNER_DIED,
    TAIL,
    VERSION,
    Events,
    OllamaError,
    bad,
    chat_completion,
    chat_events_new,
    chat_events_old,
    completion_events,
    decode_body,
    embedding_list,
    error_body,
    go_json,
    is_int,
    text_completion,
    usage,
)

log = logging.getLogger("ollama_emulator")

_GO_PRIVATE = tuple(
    ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
)


def host_allowed(host_header: str, hostname: str) -> bool:
    """Ollama's allowedHostsMiddleware (notes §8), for a server that listens on loopback.

    Local interface addresses are not enumerated (it would need a per-platform lookup); private
    and loopback addresses, the machine's hostname and the local TLDs are.
    """
    host = host_header.strip().lower()
    if host.startswith("["):
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    if host in ("", "localhost", hostname):
        return True
    if host.endswith((".localhost", ".local", ".internal")):
        return True
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    return addr.is_loopback or addr.is_unspecified or any(addr in net for net in _GO_PRIVATE)


class _AnyMethod:
    """SUPPORTED_METHODS for the 404 handler: gin answers 404 to every method on an unknown path."""

    def __contains__(self, method: object) -> bool:
        return True


class BaseHandler(tornado.web.RequestHandler):
    """Records the request, applies Ollama's Host check, writes gin-style plain 404/405."""

    def initialize(self, state: EmulatorState) -> None:
        self.state = state
        self.body_json: Any = None
        self.body_error: str | None = None
        self._gone: asyncio.Event | None = None

    def set_default_headers(self) -> None:
        self.clear_header("Server")  # Go's net/http sends none

    def compute_etag(self) -> str | None:
        return None  # no ETag / 304 logic: Ollama has none

    def prepare(self) -> None:
        body = self.request.body
        if body:
            self.body_json, self.body_error = decode_body(body)
        elif self.request.method in ("POST", "PUT", "PATCH"):
            self.body_error = "EOF"
        self.state.requests.append(
            {
                "method": self.request.method,
                "path": self.request.path,
                "headers": dict(self.request.headers),
                "body": self.body_json,
            }
        )
        if self.state.options.check_host and self._on_loopback():
            if not host_allowed(self.request.headers.get("Host", ""), self.state.hostname):
                self.set_status(403)
                self.clear_header("Content-Type")
                self.finish()

    def _on_loopback(self) -> bool:
        addr = self.state.bound_address
        if addr is None:
            try:
                addr = self.request.connection.stream.socket.getsockname()[0]  # type: ignore[union-attr]
            except (AttributeError, OSError):
                return False
        try:
            return ipaddress.ip_address(addr.split("%", 1)[0]).is_loopback
        except ValueError:
            return addr == "localhost"

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        if status_code in (404, 405):
            text = "404 page not found" if status_code == 404 else "405 method not allowed"
            self.set_header("Content-Type", "text/plain")
            self.finish(text)
            return
        exc = kwargs.get("exc_info", (None, None, None))[1]
        self.write_ollama_error(OllamaError(status_code, str(exc) if exc else self._reason))

    def write_ollama_error(self, err: OllamaError) -> None:
        self.set_status(err.status)
        content_type, body = error_body(err)
        self.set_header("Content-Type", content_type)
        self.finish(body)

    def write_json(self, obj: Any, content_type: str = "application/json") -> None:
        self.set_header("Content-Type", content_type)
        self.finish(go_json(obj) + b"\n")

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if not isinstance(value, tornado.web.HTTPError):
            super().log_exception(typ, value, tb)


class NotFoundHandler(BaseHandler):
    SUPPORTED_METHODS = _AnyMethod()  # type: ignore[assignment]

    def prepare(self) -> None:
        super().prepare()
        if not self._finished:
            self.send_error(404)


class RootHandler(BaseHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish("Ollama is running")

    def head(self) -> None:
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish()


class VersionHandler(BaseHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(go_json({"version": VERSION}))


class ModelsHandler(BaseHandler):
    def get(self) -> None:
        data = [
            {"id": names.listed_name(m), "object": "model", "created": MODEL_CREATED, "owned_by": names.owner(m)}
            for m in self.state.options.models
        ]
        # With nothing installed Ollama sends "data": null, not [] (notes §6).
        self.write_json({"object": "list", "data": data or None})


class ModelHandler(BaseHandler):
    def get(self, name: str) -> None:
        if "/" in name:
            # gin routes on the decoded path, where /v1/models/:model is one segment: a name with a
            # "/" (hf.co/org/m, or an encoded ..%2f..%2fapi%2fversion) matches no route there.
            self.send_error(404)
            return
        if names.resolve(name) is None:  # ShowHandler: parseAndValidateModelRef -> 400
            self.write_ollama_error(OllamaError(400, "invalid model name"))
            return
        found = names.find(name, self.state.options.models)
        if found is None:
            self.write_ollama_error(OllamaError(404, f"model '{name}' not found"))
            return
        self.write_json({"id": name, "object": "model", "created": MODEL_CREATED, "owned_by": names.owner(found)})


class InferenceHandler(BaseHandler):
    """Shared by chat, completions and embeddings: faults, delays, streaming, cancellation."""

    stream_content_type = "text/event-stream"  # the native API's streams are NDJSON (native.py)

    def initialize(self, state: EmulatorState) -> None:
        super().initialize(state)
        self._gone = asyncio.Event()  # set when the client (the proxy) goes away

    def on_connection_close(self) -> None:
        assert self._gone is not None
        self._gone.set()

    async def post(self) -> None:
        fault = self.state.take_fault()  # one queued fault per inference request
        try:
            if self.body_error is not None:
                raise bad(self.body_error)
            await self.serve(fault)
        except OllamaError as err:
            self.write_ollama_error(err)

    async def serve(self, fault: Fault | None) -> None:
        raise NotImplementedError

    # -- helpers shared by the endpoints ----------------------------------------------------

    async def before_answer(self, fault: Fault | None) -> bool:
        """Applies the faults that decide whether there is an answer at all. False = no answer."""
        if fault is None:
            return True
        if fault.name == "slow_first_byte":
            if await self.pause(fault.arg):
                return False
        elif fault.name == "error500":
            raise OllamaError(500, RUNNER_DIED)
        elif fault.name == "busy503":
            raise OllamaError(503, BUSY_MESSAGE)
        return True

    async def pause(self, seconds: float) -> bool:
        """Sleeps unless the client goes away first. Returns True if the client is gone."""
        assert self._gone is not None
        if seconds > 0:
            if seconds < 0.2:
                await asyncio.sleep(seconds)  # cheap path for per-token delays
            else:
                try:
                    await asyncio.wait_for(self._gone.wait(), seconds)
                except TimeoutError:
                    pass
        return self._gone.is_set()

    def drop_connection(self) -> None:
        """Closes the socket abruptly: no terminating chunk, no [DONE], no response at all."""
        stream = self.detach()
        stream.close()

    async def hang_until_gone(self) -> None:
        assert self._gone is not None
        await self._gone.wait()

    async def answer_once(self, body: Any, fault: Fault | None, delay: float) -> None:
        """A non-stream answer after ``delay``, honouring cut_after / stall_after / bad_json."""
        if await self.pause(delay):
            self.state.cancelled_answers += 1
            return
        if fault is not None and fault.name == "cut_after":
            self.drop_connection()
            return
        if fault is not None and fault.name == "stall_after":
            # Headers declaring the whole length and the first N bytes, then nothing: a body read stalls.
            data = go_json(body) + b"\n"
            self.set_header("Content-Type", "application/json")
            self.set_header("Content-Length", str(len(data)))
            self.write(data[: min(fault.arg, len(data) - 1)])
            try:
                await self.flush()
            except tornado.iostream.StreamClosedError:
                return
            await self.hang_until_gone()
            return
        if fault is not None and fault.name == "bad_json":
            self.set_header("Content-Type", "application/json")
            self.finish(b'{"id":"x","object":{not json\n')
        else:
            self.write_json(body)
        self.state.completed += 1

    async def send(self, data: bytes) -> bool:
        """Writes and flushes one event. False when the client has gone away."""
        assert self._gone is not None
        if self._gone.is_set():
            return False
        self.write(data)
        try:
            await self.flush()
        except tornado.iostream.StreamClosedError:
            self._gone.set()
            return False
        return True

    async def run_stream(self, events: Events, fault: Fault | None) -> None:
        """Writes SSE events with the configured delays, faults and cancellation handling."""
        opts = self.state.options
        stop_at, cut = None, False
        if fault is not None and fault.name in ("cut_after", "stall_after"):
            stop_at, cut = fault.arg, fault.name == "cut_after"
        self.set_header("Content-Type", self.stream_content_type)
        self.state.active_streams += 1
        if self.state.active_streams > self.state.max_active_streams:
            self.state.max_active_streams = self.state.active_streams
        try:
            if await self.pause(opts.first_byte_delay_s):
                return self._cancelled()
            if fault is not None and fault.name == "bad_json":
                if not await self.send(b"data: {not json\n\n"):
                    return self._cancelled()
            sent = 0
            first = True
            for kind, data in events:
                if kind == CONTENT and stop_at is not None and sent >= stop_at:
                    await self._ensure_headers_sent()
                    if cut:
                        return self.drop_connection()
                    await self.hang_until_gone()
                    return self._cancelled()
                if kind != TAIL and not first and await self.pause(opts.token_delay_s):
                    return self._cancelled()
                if not await self.send(data):
                    return self._cancelled()
                first = False
                if kind == CONTENT:
                    sent += 1
            self.finish()
            self.state.completed += 1
        finally:
            self.state.active_streams -= 1

    async def _ensure_headers_sent(self) -> None:
        """cut_after:0 / stall_after:0 still answer 200 with headers, like a started stream."""
        if not self._headers_written:
            await self.send(b"")

    def _cancelled(self) -> None:
        self.state.cancelled_streams += 1

    def usage_allowed(self, job: Job, fault: Fault | None) -> bool:
        no_usage = fault is not None and fault.name == "no_usage"
        return job.include_usage and self.state.options.send_usage and not no_usage

    def resolve_model(self, job: Job, missing_status: int) -> str:
        """The configured model a job asks for; Ollama's errors when there is none."""
        if not job.model:
            if missing_status == 400:
                raise OllamaError(400, "model is required")
            raise OllamaError(404, "model '' not found")
        found = names.find(job.model, self.state.options.models)
        if found is None:
            raise OllamaError(404, f"model '{job.model}' not found")
        return found

    def stream_usage(self, job: Job, fault: Fault | None, prompt: int, reply: Reply) -> dict | None:
        return usage(prompt, reply.completion_tokens) if self.usage_allowed(job, fault) else None


class ChatHandler(InferenceHandler):
    async def serve(self, queued: Fault | None) -> None:
        opts = self.state.options
        job = parse_chat(self.body_json)
        model = self.resolve_model(job, missing_status=400)
        if names.find(model, opts.embedding_only_models):
            raise OllamaError(400, f'"{job.model}" does not support chat')
        if job.wants_thinking:
            raise OllamaError(400, f'"{job.model}" does not support thinking')
        natural, fault = steer(job.steer_text, queued)
        if not await self.before_answer(fault):
            return
        if job.images:
            if not names.find(model, opts.vision_models):
                raise OllamaError(500, NO_VISION)
            if job.bad_image:
                raise OllamaError(500, NOT_AN_IMAGE)
        template, text, images = chat_prompt(model, job.messages or [], job.tools)
        prompt = await self.state.tokens.prompt(template.vocab, text)
        prompt += images * opts.image_tokens + opts.prompt_token_skew
        reply = plan_reply(natural, job.max_tokens, pad_bytes(fault))
        rid = f"chatcmpl-{random.randrange(999)}"
        if job.stream:
            events = chat_events_new if opts.stream_format == "new" else chat_events_old
            use = self.stream_usage(job, fault, prompt, reply)
            await self.run_stream(events(job.model, rid, reply.words, reply.finish_reason, use), fault)
            return
        body = chat_completion(rid, job.model, reply.text, reply.finish_reason, prompt, reply.completion_tokens)
        await self.answer_once(body, fault, opts.first_byte_delay_s + len(reply.words) * opts.token_delay_s)


class CompletionsHandler(InferenceHandler):
    async def serve(self, queued: Fault | None) -> None:
        opts = self.state.options
        job = parse_completion(self.body_json)
        model = self.resolve_model(job, missing_status=404)
        if names.find(model, opts.embedding_only_models):
            raise OllamaError(400, f'"{job.model}" does not support generate')
        if job.suffix and not names.find(model, opts.insert_models):
            raise OllamaError(400, "does not support insert")  # a capability check, before the load answer
        natural, fault = steer(job.steer_text, queued)
        if not await self.before_answer(fault):
            return
        if job.prompt:
            template, text = completion_prompt(model, job.prompt, job.suffix)
            prompt = await self.state.tokens.prompt(template.vocab, text) + opts.prompt_token_skew
            reply = plan_reply(natural, job.max_tokens, pad_bytes(fault))
        else:
            # An empty prompt only loads the model: text "", finish_reason "load", no metrics (§1).
            prompt, reply = 0, Reply([], "load", 0)
        rid = f"cmpl-{random.randrange(999)}"
        if job.stream:
            use = self.stream_usage(job, fault, prompt, reply)
            await self.run_stream(completion_events(job.model, rid, reply.words, reply.finish_reason, use), fault)
            return
        body = text_completion(rid, job.model, reply.text, reply.finish_reason, prompt, reply.completion_tokens)
        await self.answer_once(body, fault, opts.first_byte_delay_s + len(reply.words) * opts.token_delay_s)


class EmbeddingsHandler(InferenceHandler):
    async def serve(self, queued: Fault | None) -> None:
        opts = self.state.options
        model_name, inputs, fmt, dimensions = parse_embeddings(self.body_json)
        if not model_name:
            raise OllamaError(404, "model '' not found")
        model = names.find(model_name, opts.models)
        if model is None:
            raise OllamaError(404, f'model "{model_name}" not found, try pulling it first')
        if not names.find(model, opts.embedding_models):
            # UNCONFIRMED text: Ollama's capability errors read `"NAME" does not support X`.
            raise OllamaError(400, f'"{model_name}" does not support embeddings')
        _, fault = steer(inputs[-1], queued)
        if not await self.before_answer(fault):
            return
        dims = opts.embedding_dims
        if is_int(dimensions) and 0 < dimensions < dims:  # type: ignore[operator]
            dims = dimensions  # type: ignore[assignment]
        vectors: list[Any] = []
        for text in inputs:
            vec = embedding_vector(text, dims)
            vectors.append(base64.b64encode(struct.pack(f"<{dims}f", *vec)).decode() if fmt == "base64" else vec)
        # Each input is tokenized as it is (no template), the counts summed (notes §7).
        tokens = await self.state.tokens.texts(template_for(model).vocab, inputs) + opts.prompt_token_skew
        await self.answer_once(embedding_list(model_name, vectors, tokens), fault, opts.first_byte_delay_s)
