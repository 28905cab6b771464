"""Ollama's Anthropic Messages API (``POST /v1/messages``, since v0.14.0), as its source writes it.

ollama/ollama at fb30760: middleware/anthropic.go (AnthropicMessagesMiddleware, AnthropicWriter) turns the
request into an /api/chat request (anthropic/anthropic.go FromMessagesRequest) and each /api/chat answer
back (ToMessagesResponse, StreamConverter):

- validation (the middleware): gin's ShouldBindJSON type errors, then "model is required", "max_tokens is
  required and must be positive", "messages is required", then FromMessagesRequest's own (an image source
  that is not base64, bad base64, a tool_use block without id or name), each a 400 in Anthropic's envelope
  ``{"type": "error", "error": {"type", "message"}, "request_id": "req_..."}`` written by gin (no newline);
- errors of the chat handler (404 unknown model, 500 runner died, 503 busy) pass through
  AnthropicWriter.writeError: the same envelope, the type from the status (NewError), json.Encoder's newline;
- a non-stream answer: ``{"id": "msg_<24 hex>", "type": "message", "role": "assistant", "model", "content":
  [{"type": "text", "text"}], "stop_reason", "usage": {"input_tokens", "output_tokens"}}``;
- a stream: ``event: NAME`` + ``data: JSON`` per event: message_start (its usage.input_tokens is the first
  chunk's prompt_eval_count, which is 0 on every chunk but the last, so Ollama's len/4 estimate
  EstimateInputTokens), content_block_start, content_block_delta per token, content_block_stop,
  message_delta (stop_reason and the final cumulative input_tokens and output_tokens), message_stop. No
  ping events; no error event either (an error inside the chat stream is dropped by the converter and the
  stream ends without message_stop).

The prompt counted is the one FromMessagesRequest builds (system text, one message per turn with its text
blocks joined without a separator, tool results as "tool" messages, tool_use blocks as tool calls) rendered
by the model's template (templates.py), as for /v1/chat/completions. The faults are the chat ones
(faults.py); ``no_usage`` (and ``send_usage=False``) leaves the usage out of message_delta, as a server that
reports none would.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Iterator
from typing import Any

import tornado.web

from . import names
from .faults import Fault, pad_bytes, steer
from .handlers import InferenceHandler
from .jobs import looks_like_image
from .replies import plan_reply
from .templates import chat_prompt
from .wire import CONTENT, FINISH, NO_VISION, NOT_AN_IMAGE, TAIL, OllamaError, check_struct, go_json, go_kind, is_int

MESSAGES_FIELDS = {
    "model": (lambda v: isinstance(v, str), "string"),
    "max_tokens": (is_int, "int"),
    "messages": (lambda v: isinstance(v, list), "[]anthropic.MessageParam"),
    "stream": (lambda v: isinstance(v, bool), "bool"),
    "temperature": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "float64"),
    "top_p": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "float64"),
    "top_k": (is_int, "int"),
    "stop_sequences": (lambda v: isinstance(v, list), "[]string"),
    "tools": (lambda v: isinstance(v, list), "[]anthropic.Tool"),
}


def error_type(status: int) -> str:
    """anthropic.go NewError."""
    return {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
            404: "not_found_error", 429: "rate_limit_error", 503: "overloaded_error",
            529: "overloaded_error"}.get(status, "api_error")


def _id(prefix: str) -> str:
    return f"{prefix}_{os.urandom(12).hex()}"  # generateID: 12 random bytes in hex


def envelope(status: int, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type(status), "message": message}, "request_id": _id("req")}


class _Bad(Exception):
    """A 400 of the middleware (gin's AbortWithStatusJSON)."""


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _decode_image(source: Any) -> bytes:
    """resolveImageSource: base64 only."""
    if not isinstance(source, dict):
        raise _Bad("invalid image source")
    kind = _text(source.get("type"))
    if kind != "base64":
        raise _Bad(f"invalid image source type: {kind}. Only base64 images are supported.")
    try:
        return base64.b64decode(_text(source.get("data")), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _Bad(f"invalid base64 image data: {exc}") from None


class Converted:
    """FromMessagesRequest's result, as OpenAI-shaped messages the emulator's templates read."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.images: list[bytes] = []
        self.tools: list[dict[str, Any]] = []


def _image_parts(images: list[bytes]) -> list[dict[str, Any]]:
    return [{"type": "image_url", "image_url": {"url": ""}} for _ in images]


def _content(text: str, images: list[bytes]) -> Any:
    if not images:
        return text
    return ([{"type": "text", "text": text}] if text else []) + _image_parts(images)


def _tool_result(block: dict[str, Any], out: Converted) -> dict[str, Any]:
    """convertToolResultContent: a string, or text and image blocks."""
    content = block.get("content")
    text, images = "", []
    if isinstance(content, str):
        text = content
    elif isinstance(content, list):
        for item in content:
            if not isinstance(item, dict):
                continue
            if item.get("type") == "text":
                text += _text(item.get("text"))
            elif item.get("type") == "image":
                if not isinstance(item.get("source"), dict):
                    raise _Bad("invalid tool_result image source")
                images.append(_decode_image(item["source"]))
    out.images += images
    return {"role": "tool", "content": _content(text, images), "tool_call_id": _text(block.get("tool_use_id"))}


def _message(msg: Any, out: Converted) -> None:
    """convertMessage."""
    if not isinstance(msg, dict):
        raise _Bad(f"json: cannot unmarshal {go_kind(msg)} into Go value of type anthropic.MessageParam")
    role = _text(msg.get("role")).lower()
    content = msg.get("content")
    if isinstance(content, str):
        blocks: list = [{"type": "text", "text": content}]
    elif isinstance(content, list) or content is None:
        blocks = content or []
    else:
        raise _Bad(f"json: cannot unmarshal {go_kind(content)} into Go value of type []anthropic.ContentBlock")
    text, images, calls, thinking, results = "", [], [], "", []
    for block in blocks:
        if not isinstance(block, dict):
            raise _Bad(f"json: cannot unmarshal {go_kind(block)} into Go value of type anthropic.ContentBlock")
        kind = block.get("type")
        if kind == "text":
            text += _text(block.get("text"))
        elif kind == "image":
            if block.get("source") is None:
                raise _Bad("invalid image source")
            images.append(_decode_image(block["source"]))
        elif kind in ("tool_use", "server_tool_use"):
            if kind == "tool_use" and not block.get("id"):
                raise _Bad("tool_use block missing required 'id' field")
            if kind == "tool_use" and not block.get("name"):
                raise _Bad("tool_use block missing required 'name' field")
            args = block.get("input") if isinstance(block.get("input"), dict) else {}
            calls.append({"id": _text(block.get("id")),
                          "function": {"name": _text(block.get("name")), "arguments": json.dumps(args)}})
        elif kind == "tool_result":
            results.append(_tool_result(block, out))
        elif kind == "thinking":
            thinking = _text(block.get("thinking"))
    out.images += images
    if role == "user" and results:
        out.messages += results
    if text or images or calls or thinking:
        m: dict[str, Any] = {"role": role, "content": _content(text, images)}
        if calls:
            m["tool_calls"] = calls
        if thinking:
            m["reasoning"] = thinking
        out.messages.append(m)
    if role != "user" or not results:
        out.messages += results


def convert(body: dict[str, Any]) -> Converted:
    """FromMessagesRequest: the system prompt (a string, or its text blocks joined), the messages, the
    tools (a web_search tool becomes Ollama's own web_search function)."""
    out = Converted()
    system = body.get("system")
    if isinstance(system, str) and system:
        out.messages.append({"role": "system", "content": system})
    elif isinstance(system, list):
        joined = "".join(_text(b.get("text")) for b in system if isinstance(b, dict) and b.get("type") == "text")
        if joined:
            out.messages.append({"role": "system", "content": joined})
    for msg in body.get("messages") or ():
        _message(msg, out)
    for tool in body.get("tools") or ():
        tool = tool if isinstance(tool, dict) else {}
        if _text(tool.get("type")).startswith("web_search"):
            out.tools.append({"type": "function", "function": {
                "name": "web_search",
                "description": "Search the web for current information. Use this to find up-to-date "
                               "information about any topic.",
                "parameters": {"type": "object", "required": ["query"], "properties": {
                    "query": {"type": "string", "description": "The search query to look up on the web"}}}}})
        else:
            schema = tool.get("input_schema")
            if schema is not None and not isinstance(schema, dict):
                raise _Bad(f"invalid input_schema for tool {_text(tool.get('name'))!r}: json: cannot unmarshal "
                           f"{go_kind(schema)} into Go value of type api.ToolFunctionParameters")
            out.tools.append({"type": "function", "function": {
                "name": _text(tool.get("name")), "description": _text(tool.get("description")),
                "parameters": schema or {}}})
    return out


def estimate_input_tokens(body: dict[str, Any]) -> int:
    """EstimateCountTokens: len/4 of the request's text (bytes, as Go's len), at least 1. Go re-marshals
    tool_use and tool_result blocks whole; compact JSON stands in for that."""
    def block_len(block: Any) -> int:
        if not isinstance(block, dict):
            return 0
        n = len(_text(block.get("text")).encode()) + len(_text(block.get("thinking")).encode())
        if block.get("type") in ("tool_use", "tool_result"):
            n += len(go_json(block))
        return n

    def content_len(content: Any) -> int:
        if isinstance(content, str):
            return len(content.encode())
        if isinstance(content, list):
            return sum(block_len(b) for b in content)
        return len(go_json(content)) if content is not None else 0

    total = content_len(body.get("system"))
    messages = body.get("messages") or []
    for msg in messages:
        if isinstance(msg, dict):
            total += len(_text(msg.get("role")).encode()) + content_len(msg.get("content"))
    for tool in body.get("tools") or ():
        if isinstance(tool, dict):
            schema = tool.get("input_schema")
            total += len(_text(tool.get("name")).encode()) + len(_text(tool.get("description")).encode())
            total += len(go_json(schema)) if schema is not None else 0
    tokens = total // 4
    return 1 if tokens == 0 and (messages or body.get("system") is not None) else tokens


def _steer_text(body: dict[str, Any]) -> str:
    """The last user message's text, where [[emu:...]] directives are read."""
    for msg in reversed(body.get("messages") or []):
        if isinstance(msg, dict) and msg.get("role") == "user":
            content = msg.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return "".join(_text(b.get("text")) for b in content if isinstance(b, dict) and b.get("type") == "text")
            return ""
    return ""


def sse(event: dict[str, Any]) -> bytes:
    """middleware writeSSE."""
    return b"event: " + event["type"].encode() + b"\ndata: " + go_json(event) + b"\n\n"


def stop_reason(finish: str) -> str:
    """mapStopReason (no tool calls: the emulated models never call one)."""
    return {"stop": "end_turn", "length": "max_tokens"}.get(finish, "stop_sequence" if finish else "")


def message_events(mid: str, model: str, words: list, finish: str, estimate: int,
                   prompt: int, completion: int, report: bool) -> Iterator[tuple[str, bytes]]:
    """StreamConverter.Process over the chat stream: one chunk per word, then the done chunk."""
    def start(input_tokens: int) -> bytes:
        return sse({"type": "message_start", "message": {
            "id": mid, "type": "message", "role": "assistant", "model": model, "content": [],
            "usage": {"input_tokens": input_tokens, "output_tokens": 0}}})

    if words:
        yield TAIL, start(estimate) + sse(
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})
        for word in words:
            yield CONTENT, sse({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": word}})
        head = sse({"type": "content_block_stop", "index": 0})
    else:
        head = start(prompt)  # the first chunk is the done one: its real count
    delta: dict[str, Any] = {"type": "message_delta", "delta": {"stop_reason": stop_reason(finish)}}
    if report:
        delta["usage"] = {"input_tokens": prompt, "output_tokens": completion}
    yield FINISH, head + sse(delta)
    yield TAIL, sse({"type": "message_stop"})


class MessagesHandler(InferenceHandler):
    """POST /v1/messages."""

    def write_anthropic_error(self, status: int, message: str, middleware: bool) -> None:
        self.set_status(status)
        if middleware:  # gin's AbortWithStatusJSON
            self.set_header("Content-Type", "application/json; charset=utf-8")
            self.finish(go_json(envelope(status, message)))
        else:  # AnthropicWriter.writeError: json.Encoder
            self.set_header("Content-Type", "application/json")
            self.finish(go_json(envelope(status, message)) + b"\n")

    async def post(self) -> None:
        fault = self.state.take_fault()
        try:
            if self.body_error is not None:
                raise _Bad(self.body_error)
            await self.serve(fault)
        except _Bad as exc:
            self.write_anthropic_error(400, str(exc), middleware=True)
        except OllamaError as err:
            self.write_anthropic_error(err.status, err.message, middleware=False)

    def _validate(self) -> tuple[dict[str, Any], Converted]:
        body = check_struct(self.body_json, "MessagesRequest", MESSAGES_FIELDS, package="anthropic", error=_Bad)
        if not body.get("model"):
            raise _Bad("model is required")
        if not body.get("max_tokens") or body["max_tokens"] <= 0:
            raise _Bad("max_tokens is required and must be positive")
        if not body.get("messages"):
            raise _Bad("messages is required")
        return body, convert(body)

    async def serve(self, queued: Fault | None) -> None:
        opts = self.state.options
        body, converted = self._validate()
        model_name = body["model"]
        found = names.find(model_name, opts.models)
        if found is None:
            raise OllamaError(404, f"model '{model_name}' not found")
        if names.find(found, opts.embedding_only_models):
            raise OllamaError(400, f'"{model_name}" does not support chat')
        natural, fault = steer(_steer_text(body), queued)
        if not await self.before_answer(fault):
            return
        if converted.images:
            if not names.find(found, opts.vision_models):
                raise OllamaError(500, NO_VISION)
            if not all(looks_like_image(data) for data in converted.images):
                raise OllamaError(500, NOT_AN_IMAGE)
        template, text, images = chat_prompt(found, converted.messages, converted.tools or None)
        prompt = await self.state.tokens.prompt(template.vocab, text)
        prompt += images * opts.image_tokens + opts.prompt_token_skew
        reply = plan_reply(natural, body["max_tokens"], pad_bytes(fault))
        mid = _id("msg")
        report = opts.send_usage and not (fault is not None and fault.name == "no_usage")
        if body.get("stream"):
            self.set_header("Cache-Control", "no-cache")
            self.set_header("Connection", "keep-alive")
            events = message_events(mid, model_name, reply.words, reply.finish_reason, estimate_input_tokens(body),
                                    prompt, reply.completion_tokens, report)
            await self.run_stream(events, fault)
            return
        answer: dict[str, Any] = {
            "id": mid, "type": "message", "role": "assistant", "model": model_name,
            "content": [{"type": "text", "text": reply.text}] if reply.text else None,
            "stop_reason": stop_reason(reply.finish_reason),
            "usage": {"input_tokens": prompt, "output_tokens": reply.completion_tokens},
        }
        await self.answer_once(answer, fault, opts.first_byte_delay_s + len(reply.words) * opts.token_delay_s)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, tornado.web.HTTPError) and status_code in (404, 405):
            super().write_error(status_code, **kwargs)  # gin's plain 404/405
            return
        self.write_anthropic_error(status_code, str(exc) if exc else self._reason, middleware=False)
