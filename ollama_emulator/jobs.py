"""A request body as Ollama's middleware reads it: a Job (what to generate) or an OllamaError.

The checks and their texts are Ollama's (openai/openai.go FromChatRequest / FromCompleteRequest,
middleware/openai.go, server/routes.go EmbedHandler; notes §1, §4, §5, §7).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

from .wire import (
    CHAT_FIELDS,
    COMPLETION_FIELDS,
    EMBED_FIELDS,
    IMAGE_URL_UNSUPPORTED,
    OllamaError,
    bad,
    check_struct,
    go_kind,
    go_type,
)

_IMAGE_PREFIXES = (
    "data:image/jpeg;base64,",
    "data:image/jpg;base64,",
    "data:image/png;base64,",
    "data:image/webp;base64,",
    "data:;base64,",
)


@dataclass
class Job:
    model: str  # as sent: Ollama echoes it
    stream: bool
    include_usage: bool
    max_tokens: int | None
    steer_text: str  # where [[emu:...]] directives are read from
    messages: list | None = None  # chat
    prompt: str | None = None  # completions
    images: int = 0
    bad_image: bool = False
    wants_thinking: bool = False  # reasoning_effort other than "none": no emulated model thinks
    tools: list | None = None  # chat: rendered into the prompt by the template, so counted
    suffix: str = ""  # completions: fill-in-the-middle text after the prompt


def decode_image_url(url: str) -> bytes:
    """Ollama's decodeImageURL at HEAD (notes §4)."""
    if url.startswith(("http://", "https://")):
        raise bad(IMAGE_URL_UNSUPPORTED)
    for prefix in _IMAGE_PREFIXES:
        if url.startswith(prefix):
            try:
                return base64.b64decode(url[len(prefix):], validate=True)
            except (ValueError, TypeError):
                raise bad("invalid image input") from None
    raise bad("invalid image input")


def looks_like_image(data: bytes) -> bool:
    """PNG, JPEG or WebP by magic bytes: what a runner's decoder would accept."""
    return (
        data.startswith(b"\x89PNG\r\n\x1a\n")
        or data.startswith(b"\xff\xd8\xff")
        or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")
    )


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n\n".join(p["text"] for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def _check_message(msg: Any, job: Job) -> None:
    """FromChatRequest's checks on one message: content type, parts, images, tool calls."""
    if not isinstance(msg, dict):
        raise bad(
            f"json: cannot unmarshal {go_kind(msg)} into Go struct field "
            "ChatCompletionRequest.messages of type openai.Message"
        )
    content = msg.get("content")
    if isinstance(content, list):
        for part in content:
            _check_part(part, job)
    elif not isinstance(content, str) and not (content is None and msg.get("tool_calls")):
        raise bad(f"invalid message content type: {go_type(content)}")
    for call in msg.get("tool_calls") or ():
        args = (call.get("function") or {}).get("arguments") if isinstance(call, dict) else None
        if isinstance(args, str):
            try:
                json.loads(args)
            except ValueError:
                raise bad("invalid tool call arguments") from None


def _check_part(part: Any, job: Job) -> None:
    if not isinstance(part, dict):
        raise bad("invalid message format")
    kind = part.get("type")
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise bad("invalid message format")
    elif kind == "image_url":
        ref = part.get("image_url")
        url = ref.get("url") if isinstance(ref, dict) else ref
        if not isinstance(url, str):
            raise bad("invalid message format")
        data = decode_image_url(url)
        job.images += 1
        job.bad_image = job.bad_image or not looks_like_image(data)
    elif kind == "input_audio":
        # Ollama hands the audio bytes to the model as "image" data; no emulated model takes audio.
        job.images += 1
        job.bad_image = True
    else:
        raise bad("invalid message format")


def _stream_flags(body: dict) -> tuple[bool, bool]:
    opts = body.get("stream_options") or {}
    return bool(body.get("stream")), bool(opts.get("include_usage"))


def parse_chat(body: Any) -> Job:
    body = check_struct(body, "ChatCompletionRequest", CHAT_FIELDS)
    messages = body.get("messages") or []
    if not messages:
        raise bad("[] is too short - 'messages'")
    stream, include_usage = _stream_flags(body)
    job = Job(
        model=body.get("model") or "",
        stream=stream,
        include_usage=include_usage,
        max_tokens=body.get("max_tokens"),  # max_completion_tokens is ignored, like Ollama (#7125)
        steer_text="",
        messages=messages,
        tools=body.get("tools") or None,
    )
    for msg in messages:
        _check_message(msg, job)
    users = [m for m in messages if m.get("role") == "user"]
    job.steer_text = _text_of(users[-1].get("content")) if users else ""
    effort = body.get("reasoning_effort") or (body.get("reasoning") or {}).get("effort")
    job.wants_thinking = isinstance(effort, str) and effort != "none"
    return job


def parse_completion(body: Any) -> Job:
    body = check_struct(body, "CompletionRequest", COMPLETION_FIELDS)
    stop = body.get("stop")
    if isinstance(stop, list):
        for item in stop:
            if not isinstance(item, str):
                raise bad(f"invalid type for 'stop' field: {go_type(item)}")
    stream, include_usage = _stream_flags(body)
    prompt = body.get("prompt") or ""
    return Job(
        model=body.get("model") or "",
        stream=stream,
        include_usage=include_usage,
        max_tokens=body.get("max_tokens"),
        steer_text=prompt,
        prompt=prompt,
        suffix=body.get("suffix") or "",
    )


def parse_embeddings(body: Any) -> tuple[str, list[str], str, int | None]:
    """(model, inputs, encoding_format, dimensions), in the order Ollama validates them (§7)."""
    body = check_struct(body, "EmbedRequest", EMBED_FIELDS)
    raw = body.get("input")
    if raw is None or raw == []:
        raise bad("invalid input")
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise bad(f"Invalid value for 'encoding_format' = {fmt}. Supported values: ['float', 'base64'].")
    inputs = [raw] if isinstance(raw, str) else raw
    if not isinstance(inputs, list) or not all(isinstance(x, str) for x in inputs):
        raise OllamaError(400, "invalid input type")
    return body.get("model") or "", inputs, fmt, body.get("dimensions")
