"""OpenAI's dialect: chat completions, completions and embeddings.

Its envelope is ``{"error": {"message", "type", "param", "code"}}``, its key comes as ``Authorization:
Bearer``, its streams are server-sent events of ``data:`` lines ending in ``data: [DONE]``. Ollama's
/v1 speaks the same dialect, so the relay is nearly a pass-through: ids become proxyd's own (Ollama's
repeat), the usage chunk proxyd asked for on its own behalf is dropped when the client did not ask.
"""

from __future__ import annotations

import json
import time
from typing import Any

from .. import jsonio, validate
from ..errors import ProxyError, UpstreamError, UpstreamUnavailable
from ..limits_http import rate_headers
from ..sse import DONE
from ..upstream import without_addresses
from . import upstream_object

_DONE_EVENT = b"data: " + DONE + b"\n\n"


class OpenAIEndpoint:
    """What OpenAI's endpoints share: the key, the envelope, the ids, the stream framing."""

    name = ""
    operation = ""
    id_prefix = ""
    chunk_object = ""  # the "object" of a stream event, e.g. "chat.completion.chunk"
    reserves_completion = True
    stream_content_type = "text/event-stream"
    rate_headers = staticmethod(rate_headers)  # OpenAI's x-ratelimit-* (and proxyd's x-proxyd-limit-*)

    @staticmethod
    def credentials(headers: Any) -> str | None:
        return headers.get("Authorization")

    def forward_body(self, body: dict[str, Any], completion_tokens: int, stream: bool) -> dict[str, Any]:
        """max_tokens = the reserved budget, so the reservation stays an upper bound (Ollama ignores
        max_completion_tokens, and without a cap it may generate past any budget)."""
        body.pop("max_completion_tokens", None)
        body["max_tokens"] = completion_tokens
        if stream:
            # Always ask for the usage chunk; it is dropped again if the client did not ask for it.
            body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        return body

    # -- the answer ------------------------------------------------------------------------------------

    def answer(self, raw: bytes, call: Any) -> bytes:
        doc = upstream_object(raw)
        call.usage = doc.get("usage") if isinstance(doc.get("usage"), dict) else None
        collect_text(doc, call.texts)
        return with_our_id(raw, doc, call.our_id)

    def relay_event(self, data: bytes, call: Any) -> bytes | None:
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
        collect_text(doc, call.texts)
        call.last_event = doc
        include_usage = call.include_usage
        usage = doc.get("usage")
        if isinstance(usage, dict):
            if call.backend.stream_usage(doc, usage) is not None:
                call.usage = usage
                call.usage_relayed = include_usage  # the client sees this usage: none to add at the end
            if not include_usage and not doc.get("choices"):
                return None  # the usage-only chunk proxyd asked for on its own behalf
        if "usage" in doc and not include_usage:
            # /v1/completions puts a zeroed usage object on every chunk once include_usage is on:
            # the client did not ask for it, so it must not see it.
            del doc["usage"]
            doc["id"] = call.our_id.decode()
            return b"data: " + jsonio.dumps(doc) + b"\n\n"
        return b"data: " + with_our_id(data, doc, call.our_id) + b"\n\n"

    def stream_end(self, call: Any, usage: Any) -> bytes:
        if call.include_usage and not call.usage_relayed:
            # The client asked for usage and the upstream sent none (Ollama before 0.5.2, a llama.cpp
            # server): OpenAI always sends the chunk, so proxyd sends what it billed.
            shape = call.last_event or {"object": self.chunk_object, "model": call.body.get("model", "")}
            return b"data: " + jsonio.dumps(usage_chunk(shape, usage, call.our_id)) + b"\n\n" + _DONE_EVENT
        return _DONE_EVENT

    # -- errors ------------------------------------------------------------------------------------------

    @staticmethod
    def error_body(err: ProxyError) -> bytes:
        return json.dumps(err.body(), separators=(",", ":")).encode()

    @staticmethod
    def error_event(err: ProxyError) -> bytes:
        # No [DONE] after it, so no client mistakes the stream for a complete answer; the openai SDK
        # raises APIError on it.
        return b"data: " + json.dumps(err.body()).encode() + b"\n\n"


class ChatCompletions(OpenAIEndpoint):
    name = "chat.completions"
    operation = "chat"
    id_prefix = "chatcmpl-"
    chunk_object = "chat.completion.chunk"

    parse = staticmethod(validate.chat_plan)

    async def estimate(self, body: dict[str, Any], model: str, call: Any) -> int:
        call.sink.log_fields["images"] = await call.backend.images.inline(body["messages"])
        return await call.tokens.chat_prompt(model, body["messages"], body.get("tools"))


class Completions(OpenAIEndpoint):
    name = "completions"
    operation = "completions"
    id_prefix = "cmpl-"
    chunk_object = "text_completion"

    parse = staticmethod(validate.completions_plan)

    async def estimate(self, body: dict[str, Any], model: str, call: Any) -> int:
        return await call.tokens.text_prompt(model, body["prompt"], body.get("suffix"))


class Embeddings(OpenAIEndpoint):
    name = "embeddings"
    operation = "embeddings"
    reserves_completion = False

    def parse(self, body: dict[str, Any]) -> tuple[str, bool, bool, int | None]:
        return validate.embeddings(body)[0], False, False, None

    async def estimate(self, body: dict[str, Any], model: str, call: Any) -> int:
        raw = body["input"]  # validated by parse: a string or a non-empty array of strings
        return await call.tokens.embedding_input(model, [raw] if isinstance(raw, str) else raw)

    def forward_body(self, body: dict[str, Any], completion_tokens: int, stream: bool) -> dict[str, Any]:
        return body  # embeddings have no completion

    def answer(self, raw: bytes, call: Any) -> bytes:
        try:
            doc = jsonio.loads(raw)
            usage = doc.get("usage") or {}
        except (ValueError, AttributeError):
            raise UpstreamUnavailable("Upstream answered with invalid JSON.") from None
        if isinstance(usage.get("prompt_tokens"), int):
            call.usage = {"prompt_tokens": usage["prompt_tokens"], "completion_tokens": 0}
        return jsonio.dumps(doc)


def collect_text(doc: dict[str, Any], texts: list[str]) -> None:
    """Text of the answer (for counting when the upstream reports no usage)."""
    for choice in doc.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        part = choice.get("delta") or choice.get("message")
        if isinstance(part, dict):
            for key in ("content", "reasoning", "reasoning_content"):
                if isinstance(part.get(key), str) and part[key]:
                    texts.append(part[key])
            for call in part.get("tool_calls") or ():
                fn = call.get("function") if isinstance(call, dict) else None
                if isinstance(fn, dict):
                    texts.append(str(fn.get("name") or "") + str(fn.get("arguments") or ""))
        elif isinstance(choice.get("text"), str) and choice["text"]:
            texts.append(choice["text"])


def usage_chunk(last: dict[str, Any], usage: Any, our_id: bytes) -> dict[str, Any]:
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
