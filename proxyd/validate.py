"""Request validation: reject malformed requests with a clear 400 before anything is reserved.

Only what proxyd relies on (model, messages, prompt, input, stream, token limits) is checked here;
sampling fields pass through for Ollama to judge. Pure functions, property-tested.
"""

from __future__ import annotations

from typing import Any

from .errors import InvalidRequest
from .modelname import canonical

MAX_TOKENS_CAP = 2**31 - 1  # any real context is far smaller; larger values cannot be stored (SQLite int64)


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if model is None or model == "":
        raise InvalidRequest("you must provide a model parameter", param="model", code="missing_required_parameter")
    if not isinstance(model, str):
        raise InvalidRequest("'model' must be a string", param="model")
    if len(model) > 256:
        raise InvalidRequest("'model' is too long", param="model")
    # Metered, limited and priced under Ollama's own idea of which model this is (the body keeps the
    # client's spelling for Ollama).
    name = canonical(model)
    if not name:
        raise InvalidRequest(f"invalid model name {model!r}", param="model")
    return name


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidRequest(f"'{name}' must be a boolean", param=name)
    return value


def _positive_int(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"'{name}' must be an integer", param=name)
    if value < 1:
        raise InvalidRequest(f"'{name}' must be at least 1", param=name)
    if value > MAX_TOKENS_CAP:
        raise InvalidRequest(f"'{name}' must be at most {MAX_TOKENS_CAP}", param=name)
    return value


def _stream_options(body: dict[str, Any], stream: bool) -> bool:
    """Whether the client asked for the usage chunk."""
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not isinstance(opts, dict):
        raise InvalidRequest("'stream_options' must be an object", param="stream_options")
    if not stream:
        raise InvalidRequest("'stream_options' is only allowed when 'stream' is true", param="stream_options")
    include = opts.get("include_usage", False)
    if not isinstance(include, bool):
        raise InvalidRequest("'stream_options.include_usage' must be a boolean", param="stream_options.include_usage")
    return include


def _single_choice(body: dict[str, Any]) -> None:
    n = body.get("n")
    if n is not None and n != 1:
        # Ollama ignores n and always answers one choice; accepting n>1 would bill for what never comes.
        raise InvalidRequest("Only n=1 is supported.", param="n")


def max_tokens(body: dict[str, Any]) -> int | None:
    """The client's completion cap: max_completion_tokens (the current name) or max_tokens."""
    a = _positive_int(body, "max_completion_tokens")
    b = _positive_int(body, "max_tokens")
    if a is not None and b is not None:
        return min(a, b)
    return a if a is not None else b


def chat(body: dict[str, Any]) -> tuple[str, bool, bool]:
    """-> (model, stream, include_usage)."""
    model = _model(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty array", param="messages")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise InvalidRequest(f"messages[{i}] must be an object", param=f"messages[{i}]")
        if not isinstance(msg.get("role"), str):
            raise InvalidRequest(f"messages[{i}].role must be a string", param=f"messages[{i}].role")
        tool_calls = msg.get("tool_calls")
        if tool_calls is not None and (
            not isinstance(tool_calls, list)
            or not all(isinstance(c, dict) and isinstance(c.get("function"), dict) for c in tool_calls)
        ):
            raise InvalidRequest(
                f"messages[{i}].tool_calls must be an array of {{type, function: {{name, arguments}}}} objects",
                param=f"messages[{i}].tool_calls",
            )
        content = msg.get("content")
        if content is None:
            if not msg.get("tool_calls"):
                raise InvalidRequest(f"messages[{i}].content is required", param=f"messages[{i}].content")
        elif isinstance(content, list):
            for j, part in enumerate(content):
                _part(part, f"messages[{i}].content[{j}]")
        elif not isinstance(content, str):
            raise InvalidRequest(
                f"messages[{i}].content must be a string or an array of parts", param=f"messages[{i}].content"
            )
    stream = _flag(body, "stream")
    include_usage = _stream_options(body, stream)
    _single_choice(body)
    max_tokens(body)
    return model, stream, include_usage


def _part(part: Any, where: str) -> None:
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        raise InvalidRequest(f"{where} must be an object with a 'type'", param=where)
    kind = part["type"]
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise InvalidRequest(f"{where}.text must be a string", param=f"{where}.text")
    elif kind == "image_url":
        url = part.get("image_url")
        if isinstance(url, dict):
            url = url.get("url")
        if not isinstance(url, str) or not url:
            raise InvalidRequest(f"{where}.image_url.url must be a non-empty string", param=f"{where}.image_url")
    else:
        raise InvalidRequest(f"{where}: unsupported content part type '{kind}'", param=f"{where}.type")


def completions(body: dict[str, Any]) -> tuple[str, bool, bool]:
    model = _model(body)
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        # Ollama accepts only a string prompt (no arrays, no token lists).
        raise InvalidRequest("'prompt' must be a string", param="prompt")
    stream = _flag(body, "stream")
    include_usage = _stream_options(body, stream)
    _single_choice(body)
    max_tokens(body)
    return model, stream, include_usage


def embeddings(body: dict[str, Any]) -> tuple[str, list[str]]:
    model = _model(body)
    raw = body.get("input")
    if isinstance(raw, str):
        inputs = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(x, str) for x in raw):
        inputs = raw
    else:
        raise InvalidRequest("'input' must be a string or a non-empty array of strings", param="input")
    return model, inputs
