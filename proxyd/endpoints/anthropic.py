"""Anthropic's dialect: the Messages API (``POST /v1/messages``), which Ollama speaks since v0.14.0.

Its key comes as ``x-api-key`` (or ``Authorization: Bearer``, as Claude Code sends ANTHROPIC_AUTH_TOKEN),
its envelope is ``{"type": "error", "error": {"type", "message"}}`` with the type named by the status, its
streams are server-sent events with ``event:`` names (the anthropic SDK skips an event without one) and end
on ``message_stop``, without a [DONE] line.

Estimate: Ollama turns the request into an /api/chat request (anthropic/anthropic.go FromMessagesRequest)
and renders that with the model's chat template; ``to_chat`` builds the same messages in the OpenAI shape
proxyd's chat counter reads (proxyd/tokens.py ``chat_prompt``), so both dialects are estimated by one
counter. Images go through the chat's fetcher (proxyd/images.py) the same way: Ollama takes only base64
sources here, so a URL source is fetched by proxyd (SSRF rules and all) and forwarded as base64.

Usage: ``message_delta`` carries the final cumulative ``input_tokens`` and ``output_tokens`` and is what is
billed; ``message_start``'s input count may be Ollama's len/4 guess and is ignored. ``message_stop`` is
withheld and sent after the settle (durable before the last byte); a ``message_delta`` without usage is
withheld too and sent then with the usage proxyd billed.
"""

from __future__ import annotations

from typing import Any

import orjson

from .. import jsonio
from ..errors import InvalidRequest, ProxyError, UpstreamError, UpstreamUnavailable
from ..limits_http import anthropic_rate_headers
from ..tokens import go_json
from ..upstream import without_addresses
from ..validate import _flag, _go_keys, _model, _positive_int, _string
from . import upstream_object

# Ollama's structs (anthropic/anthropic.go): Go's decoder matches keys case-insensitively, so a key that
# folds onto one of these but is not spelled so ("MAX_TOKENS", "Text") would be read by Ollama and not
# by proxyd; such keys are refused (validate._go_keys).
REQUEST_FIELDS = frozenset({
    "model", "max_tokens", "messages", "system", "stream", "temperature", "top_p", "top_k", "stop_sequences",
    "tools", "tool_choice", "thinking", "metadata", "output_config",
})
MESSAGE_FIELDS = frozenset({"role", "content"})
BLOCK_FIELDS = frozenset({
    "type", "text", "citations", "source", "id", "name", "input", "tool_use_id", "content", "is_error",
    "thinking", "signature",
})
SOURCE_FIELDS = frozenset({"type", "media_type", "data", "url"})
TOOL_FIELDS = frozenset({"type", "name", "description", "input_schema", "max_uses"})

# Anthropic's error types by HTTP status (docs.anthropic.com "Errors"; Ollama's NewError agrees where
# it has one). proxyd's 503 (shutting down, Ollama's queue full) is Anthropic's overloaded_error, kept at
# 503: the anthropic SDK retries both 503 and 529 alike, and the status stays what the access log says.
ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 402: "billing_error", 403: "permission_error",
    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
    503: "overloaded_error", 504: "timeout_error", 529: "overloaded_error",
}
_MESSAGE_STOP = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'


def error_type(status: int) -> str:
    return ERROR_TYPES.get(status) or ("invalid_request_error" if status < 500 else "api_error")


def error_doc(err: ProxyError) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type(err.status), "message": err.message}}


class Messages:
    name = "messages"
    operation = "messages"
    id_prefix = "msg_"
    reserves_completion = True
    stream_content_type = "text/event-stream"
    # The limits a response describes, in Anthropic's anthropic-ratelimit-* headers.
    rate_headers = staticmethod(anthropic_rate_headers)

    @staticmethod
    def credentials(headers: Any) -> str | None:
        key = headers.get("x-api-key")
        return "Bearer " + key if key else headers.get("Authorization")

    # -- the plan ----------------------------------------------------------------------------------------

    def parse(self, body: dict[str, Any]) -> tuple[str, bool, bool, int | None]:
        _go_keys(body, REQUEST_FIELDS, "")
        model = _model(body)
        cap = _positive_int(body, "max_tokens")
        if cap is None:
            # Anthropic's own answer: the cap is required (and Ollama refuses a request without one).
            raise InvalidRequest("max_tokens: Field required", param="max_tokens")
        check_prompt(body)
        _check_types(body, _PARAMETER_TYPES, "")
        return model, _flag(body, "stream"), False, cap

    async def estimate(self, body: dict[str, Any], model: str, call: Any) -> int:
        messages, tools, images = to_chat(body)
        if images:
            call.sink.log_fields["images"] = await inline_images(call.backend.images, messages, images)
        return await call.tokens.chat_prompt(model, messages, tools)

    def forward_body(self, body: dict[str, Any], completion_tokens: int, stream: bool) -> dict[str, Any]:
        body["max_tokens"] = completion_tokens  # the reservation stays an upper bound (num_predict)
        return body

    # -- the answer ------------------------------------------------------------------------------------

    def answer(self, raw: bytes, call: Any) -> bytes:
        doc = upstream_object(raw)
        call.usage = reported(doc.get("usage"))
        texts = call.texts
        for block in doc.get("content") or ():
            if isinstance(block, dict):
                block_text(block, texts)
        return with_our_id(raw, doc, call.our_id)

    def relay_event(self, data: bytes, call: Any) -> bytes | None:
        try:
            doc = jsonio.loads(data)
        except ValueError:
            raise UpstreamUnavailable("Upstream sent an event that is not valid JSON.") from None
        kind = doc.get("type") if isinstance(doc, dict) else None
        if not isinstance(kind, str):
            raise UpstreamUnavailable("Upstream sent an event without a type.")
        if kind == "content_block_delta":
            delta = doc.get("delta")
            if isinstance(delta, dict):
                for key in ("text", "partial_json", "thinking"):
                    value = delta.get(key)
                    if isinstance(value, str) and value:
                        call.texts.append(value)
        elif kind == "message_start":
            message = doc.get("message")
            if isinstance(message, dict) and isinstance(message.get("id"), str):
                data = with_our_id(data, message, call.our_id)  # the id names proxyd's request
        elif kind == "content_block_start":
            block = doc.get("content_block")
            if isinstance(block, dict):
                block_text(block, call.texts)
        elif kind == "message_delta":
            call.usage = reported(doc.get("usage"))
            if call.usage is None:
                call.last_event = doc  # sent from stream_end with the usage proxyd billed
                return None
        elif kind == "message_stop":
            call.upstream_done = True
            return None  # sent after the settle (stream_end)
        elif kind == "error":
            err = doc.get("error")
            message = str(err.get("message") if isinstance(err, dict) else err)
            raise UpstreamError(f"Upstream error mid-stream: {without_addresses(message)}", status=502, detail=message)
        return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"

    def stream_end(self, call: Any, usage: Any) -> bytes:
        delta = call.last_event
        if delta is None or usage is None:
            return _MESSAGE_STOP
        delta["usage"] = {"input_tokens": usage.prompt_tokens, "output_tokens": usage.completion_tokens}
        return b"event: message_delta\ndata: " + jsonio.dumps(delta) + b"\n\n" + _MESSAGE_STOP

    # -- errors ------------------------------------------------------------------------------------------

    @staticmethod
    def error_body(err: ProxyError) -> bytes:
        return orjson.dumps(error_doc(err))

    @staticmethod
    def error_event(err: ProxyError) -> bytes:
        # No message_stop after it: the client knows the message is incomplete (the SDK raises on it).
        return b"event: error\ndata: " + orjson.dumps(error_doc(err)) + b"\n\n"


def reported(usage: Any) -> dict[str, int] | None:
    """Anthropic's usage as the pipeline's (prompt_tokens, completion_tokens); None if it is no report."""
    if isinstance(usage, dict):
        i, o = usage.get("input_tokens"), usage.get("output_tokens")
        if type(i) is int and type(o) is int:
            return {"prompt_tokens": i, "completion_tokens": o}
    return None


def block_text(block: dict[str, Any], texts: list[str]) -> None:
    """The generated text of a content block (for counting when the upstream reports no usage)."""
    for key in ("text", "thinking"):
        value = block.get(key)
        if isinstance(value, str) and value:
            texts.append(value)
    if block.get("type") == "tool_use":
        texts.append(str(block.get("name") or ""))
        if block.get("input"):
            texts.append(go_json(block["input"]))


def with_our_id(raw: bytes, doc: dict[str, Any], our_id: bytes) -> bytes:
    """``raw`` with the message id ``doc["id"]`` replaced by proxyd's (a byte replacement of the compact
    ``"id":"..."`` Ollama writes; ``doc`` is the object holding the id, the whole answer or the message of
    message_start)."""
    upstream_id = doc.get("id")
    if not isinstance(upstream_id, str):
        return raw
    old = b'"id":"' + upstream_id.encode() + b'"'
    if old in raw:
        return raw.replace(old, b'"id":"' + our_id + b'"', 1)
    return raw  # laid out otherwise: the upstream's id stays (it is Ollama's random one)


# -- validation ----------------------------------------------------------------------------------------

_NUMBER = ((int, float), "a number")
_OBJECT = ((dict,), "an object")
# Parameters that pass through to Ollama, with the JSON type its struct decodes (a value of another type
# is Ollama's 400 after the reservation: refused here instead, before anything is reserved).
_PARAMETER_TYPES = {
    "temperature": _NUMBER, "top_p": _NUMBER, "top_k": ((int,), "an integer"),
    "stop_sequences": ((list,), "an array of strings"), "tool_choice": _OBJECT, "thinking": _OBJECT,
    "metadata": _OBJECT, "output_config": _OBJECT,
}
_BLOCK_TYPES = {"is_error": ((bool,), "a boolean"), "citations": ((list,), "an array"), "signature": ((str,), "a string")}


def _check_types(obj: dict[str, Any], types: dict[str, tuple[tuple[type, ...], str]], where: str) -> None:
    for name, (kinds, what) in types.items():
        value = obj.get(name)
        if value is not None and (not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds):
            raise InvalidRequest(f"{where}{name}: Input should be {what}", param=where + name)
    stops = obj.get("stop_sequences")
    if isinstance(stops, list) and not all(isinstance(s, str) for s in stops):
        raise InvalidRequest(f"{where}stop_sequences: Input should be an array of strings", param=where + "stop_sequences")


def check_prompt(body: dict[str, Any]) -> None:
    """What reaches Ollama's prompt must be what proxyd counts: messages, system, tools, each in the
    shapes FromMessagesRequest reads (anything else is refused with a 400 naming the field)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages: Field required (a non-empty array)", param="messages")
    for i, msg in enumerate(messages):
        where = f"messages.{i}"
        if not isinstance(msg, dict):
            raise InvalidRequest(f"{where}: Input should be an object", param=where)
        _go_keys(msg, MESSAGE_FIELDS, where + ".")
        if msg.get("role") not in ("user", "assistant"):
            raise InvalidRequest(f"{where}.role: Input should be 'user' or 'assistant'", param=f"{where}.role")
        content = msg.get("content")
        if isinstance(content, list):
            for j, block in enumerate(content):
                _block(block, f"{where}.content.{j}")
        elif not isinstance(content, str):
            raise InvalidRequest(f"{where}.content: Input should be a string or an array of content blocks",
                                 param=f"{where}.content")
    system = body.get("system")
    if isinstance(system, list):
        for j, block in enumerate(system):
            _block(block, f"system.{j}")
    elif system is not None and not isinstance(system, str):
        raise InvalidRequest("system: Input should be a string or an array of text blocks", param="system")
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise InvalidRequest("tools: Input should be an array", param="tools")
        for j, tool in enumerate(tools):
            where = f"tools.{j}"
            if not isinstance(tool, dict):
                raise InvalidRequest(f"{where}: Input should be an object", param=where)
            _go_keys(tool, TOOL_FIELDS, where + ".")
            for name in ("name", "description", "type"):
                _string(tool, name, where + ".")
            if (tool.get("type") or "").startswith("web_search"):
                # Ollama answers it by searching and generating again (up to 3 more times) inside the one
                # request: generations the request's reservation (one max_tokens) does not cover.
                raise InvalidRequest(f"{where}: the web search server tool is not available through this proxy "
                                     "(Ollama would run further generations for it, outside the request's "
                                     "metered budget); define a client tool instead", param=f"{where}.type")
            if tool.get("max_uses") is not None and type(tool["max_uses"]) is not int:
                raise InvalidRequest(f"{where}.max_uses: Input should be an integer", param=f"{where}.max_uses")
            schema = tool.get("input_schema")
            if schema is not None and not isinstance(schema, dict):
                raise InvalidRequest(f"{where}.input_schema: Input should be an object", param=f"{where}.input_schema")


def _block(block: Any, where: str) -> None:
    if not isinstance(block, dict):
        raise InvalidRequest(f"{where}: Input should be an object", param=where)
    _go_keys(block, BLOCK_FIELDS, where + ".")
    kind = block.get("type")
    if not isinstance(kind, str):
        raise InvalidRequest(f"{where}.type: Field required", param=f"{where}.type")
    for name in ("text", "thinking", "id", "name", "tool_use_id"):
        _string(block, name, where + ".")
    if len(block) > 2:
        _check_types(block, _BLOCK_TYPES, where + ".")
    if kind == "text" and not isinstance(block.get("text"), str):
        raise InvalidRequest(f"{where}.text: Field required", param=f"{where}.text")
    elif kind == "image":
        _source(block.get("source"), where + ".source")
    elif kind == "tool_use":
        if not block.get("id") or not block.get("name"):
            raise InvalidRequest(f"{where}: a tool_use block needs an id and a name", param=where)
        if block.get("input") is not None and not isinstance(block.get("input"), dict):
            raise InvalidRequest(f"{where}.input: Input should be an object", param=f"{where}.input")
    elif kind == "tool_result":
        content = block.get("content")
        if isinstance(content, list):
            for k, inner in enumerate(content):
                _block(inner, f"{where}.content.{k}")
        elif content is not None and not isinstance(content, str):
            raise InvalidRequest(f"{where}.content: Input should be a string or an array of blocks",
                                 param=f"{where}.content")


def _source(source: Any, where: str) -> None:
    if not isinstance(source, dict):
        raise InvalidRequest(f"{where}: Field required", param=where)
    _go_keys(source, SOURCE_FIELDS, where + ".")
    kind = source.get("type")
    if kind == "base64":
        for name in ("media_type", "data"):
            if not isinstance(source.get(name), str):
                raise InvalidRequest(f"{where}.{name}: Field required", param=f"{where}.{name}")
    elif kind == "url":
        if not isinstance(source.get("url"), str):
            raise InvalidRequest(f"{where}.url: Field required", param=f"{where}.url")
    else:
        raise InvalidRequest(f"{where}.type: Input should be 'base64' or 'url'", param=f"{where}.type")


# -- the request as Ollama's chat messages --------------------------------------------------------------


class _Image:
    """An image block, its OpenAI-shaped stand-in (whose URL the fetcher rewrites) and where it is."""

    __slots__ = ("block", "part", "where", "sent")

    def __init__(self, block: dict[str, Any], where: str) -> None:
        source = block["source"]
        if source.get("type") == "url":
            url = source["url"]
        else:
            url = f"data:{source['media_type']};base64,{source['data']}"
        self.block, self.where, self.sent = block, where, url
        self.part = {"type": "image_url", "image_url": {"url": url}}


def _content(text: str, images: list[_Image]) -> Any:
    if not images:
        return text
    return ([{"type": "text", "text": text}] if text else []) + [image.part for image in images]


def _tool_result(block: dict[str, Any], where: str, images: list[_Image]) -> dict[str, Any]:
    content = block.get("content")
    text, mine = "", []
    if isinstance(content, str):
        text = content
    elif isinstance(content, list):
        for k, inner in enumerate(content):
            if inner.get("type") == "text":
                text += inner["text"]
            elif inner.get("type") == "image":
                mine.append(_Image(inner, f"{where}.content.{k}"))
    images += mine
    msg: dict[str, Any] = {"role": "tool", "content": _content(text, mine)}
    if block.get("tool_use_id"):
        msg["tool_call_id"] = block["tool_use_id"]
    return msg


def to_chat(body: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[_Image]]:
    """FromMessagesRequest (anthropic/anthropic.go) in the OpenAI shape: (messages, tools, images). Text
    blocks of a turn are joined without a separator, tool results become "tool" messages (before the
    user's own text, after anything else), tool_use blocks become tool calls, thinking the message's
    reasoning; a system prompt given as blocks is their text joined."""
    messages: list[dict[str, Any]] = []
    images: list[_Image] = []
    system = body.get("system")
    if isinstance(system, list):
        system = "".join(b["text"] for b in system if b.get("type") == "text")
    if system:
        messages.append({"role": "system", "content": system})
    for i, msg in enumerate(body["messages"]):
        role, content = msg["role"], msg["content"]
        if isinstance(content, str):
            messages.append({"role": role, "content": content})
            continue
        text, mine, calls, thinking, results = "", [], [], "", []
        for j, block in enumerate(content):
            kind = block["type"]
            if kind == "text":
                text += block["text"]
            elif kind == "image":
                mine.append(_Image(block, f"messages.{i}.content.{j}"))
            elif kind in ("tool_use", "server_tool_use"):
                calls.append({"id": block.get("id") or "", "function": {
                    "name": block.get("name") or "", "arguments": go_json(block.get("input") or {})}})
            elif kind == "tool_result":
                results.append(_tool_result(block, f"messages.{i}.content.{j}", images))
            elif kind == "web_search_tool_result":
                results.append({"role": "tool", "content": go_json(block.get("content")),
                                "tool_call_id": block.get("tool_use_id") or ""})
            elif kind == "thinking" and isinstance(block.get("thinking"), str):
                thinking = block["thinking"]
        images += mine
        if role == "user":
            messages += results
        if text or mine or calls or thinking:
            out: dict[str, Any] = {"role": role, "content": _content(text, mine)}
            if calls:
                out["tool_calls"] = calls
            if thinking:
                out["reasoning"] = thinking
            messages.append(out)
        if role != "user":
            messages += results
    tools = [{"type": "function", "function": {"name": tool.get("name") or "", "description": tool.get("description") or "",
                                               "parameters": tool.get("input_schema") or {}}}
             for tool in body.get("tools") or ()]  # web search tools were refused (check_prompt)
    return messages, tools, images


async def inline_images(inliner: Any, messages: list[dict[str, Any]], images: list[_Image]) -> int:
    """The chat's fetcher (proxyd/images.py) over the image blocks: each becomes a base64 source of a
    format Ollama decodes (a URL fetched under the SSRF rules, GIF/BMP/TIFF converted, large ones shrunk).
    Its errors name the chat message's part; they are renamed to the Anthropic block."""
    try:
        n = await inliner.inline(messages)
    except InvalidRequest as exc:
        for k, msg in enumerate(messages):
            content = msg.get("content")
            for j, part in enumerate(content if isinstance(content, list) else ()):
                for image in images:
                    if image.part is part:
                        old = f"messages[{k}].content[{j}]"
                        if old in exc.message:
                            exc.message = exc.message.replace(f"image_url in {old}", f"image in {image.where}")
                            exc.param = image.where + ".source"
        exc.message = exc.message.replace("image_url parts", "image blocks")
        raise
    for image in images:
        url = image.part["image_url"]["url"]
        if url is not image.sent:  # fetched, converted or shrunk: Ollama gets the result as base64
            head, _, data = url.partition(",")
            image.block["source"] = {"type": "base64", "media_type": head[5:].split(";", 1)[0], "data": data}
    return n
