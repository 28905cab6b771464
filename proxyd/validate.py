"""Request validation: reject malformed requests with a clear 400 before anything is reserved.

Only what proxyd relies on (model, messages, prompt, input, stream, token limits) is checked here;
sampling fields pass through for Ollama to judge. Pure functions, property-tested.
"""

from __future__ import annotations

from typing import Any

from .errors import InvalidModelName, InvalidRequest
from .modelname import canonical, why_invalid

MAX_TOKENS_CAP = 2**31 - 1  # any real context is far smaller; larger values cannot be stored (SQLite int64)
# The longest name Ollama accepts is 593 characters (host 350, namespace, model and tag 80 each, and
# the separators); the rest leaves room for a scheme and white space, which Ollama drops.
MAX_MODEL_CHARS = 1024

# The fields of Ollama's request structs (openai/openai.go at v0.33.0-rc2). Go's encoding/json matches
# object keys to fields case-insensitively ("MODEL", "Max_Tokens", even "ſuffix" with a long s), and of
# two keys naming one field the later wins. proxyd reads the exact names, so {"model": "a", "MODEL": "b"}
# would be metered as a and served as b, and a second "MAX_TOKENS" would lift the completion budget
# proxyd reserved and forwarded. Such keys are refused (``_go_keys``).
CHAT_FIELDS = frozenset({
    "model", "messages", "stream", "stream_options", "max_tokens", "seed", "stop", "temperature",
    "frequency_penalty", "presence_penalty", "top_p", "response_format", "tools", "reasoning",
    "reasoning_effort", "logprobs", "top_logprobs", "_debug_render_only",
})
COMPLETION_FIELDS = frozenset({
    "model", "prompt", "frequency_penalty", "max_tokens", "presence_penalty", "seed", "stop", "stream",
    "stream_options", "temperature", "top_p", "suffix", "logprobs", "_debug_render_only",
})
EMBEDDING_FIELDS = frozenset({"input", "model", "dimensions", "encoding_format"})
MESSAGE_FIELDS = frozenset({"role", "content", "reasoning", "tool_calls", "name", "tool_call_id"})
TOOL_CALL_FIELDS = frozenset({"id", "index", "type", "function"})
FUNCTION_FIELDS = frozenset({"name", "arguments"})
STREAM_OPTIONS_FIELDS = frozenset({"include_usage"})
# The non-ASCII letters Go folds onto ASCII ones (unicode.ToUpper(unicode.ToLower(r)) in encoding/json's
# foldName): dotted and dotless i, long s, Kelvin sign.
_GO_FOLD = str.maketrans({"\u0130": "i", "\u0131": "i", "\u017f": "s", "\u212a": "k"})


def _go_keys(obj: dict[str, Any], fields: frozenset, where: str) -> None:
    """Refuses a key that is not one of ``fields`` but that Go would decode into one of them."""
    for key in obj:
        if key not in fields and (key.lower() if key.isascii() else key.translate(_GO_FOLD).lower()) in fields:
            field = key.lower() if key.isascii() else key.translate(_GO_FOLD).lower()
            raise InvalidRequest(
                f"{where}'{key}' is not a parameter; field names are case-sensitive (Ollama would read it as '{field}')",
                param=f"{where}{key}",
            )


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if model is None or model == "":
        raise InvalidRequest("you must provide a model parameter", param="model", code="missing_required_parameter")
    if not isinstance(model, str):
        raise InvalidRequest("'model' must be a string", param="model")
    if len(model) > MAX_MODEL_CHARS:
        raise InvalidRequest(f"'model' is too long (at most {MAX_MODEL_CHARS} characters)", param="model")
    # Metered, limited and priced under Ollama's own idea of which model this is (the body keeps the
    # client's spelling for Ollama); a name Ollama refuses is refused here, before any reservation,
    # unless an openai-kind upstream lists it as its own id (the pipeline asks its router).
    name = canonical(model)
    if not name:
        raise InvalidModelName(f"invalid model name {model!r}: {why_invalid(model)}", model)
    return name


def _string(obj: dict[str, Any], name: str, where: str) -> None:
    """A field Ollama decodes into a Go string (and a template may write out)."""
    value = obj.get(name)
    if value is not None and not isinstance(value, str):
        raise InvalidRequest(f"{where}{name} must be a string", param=f"{where}{name}")


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
    _go_keys(opts, STREAM_OPTIONS_FIELDS, "stream_options.")
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
    return chat_plan(body)[:3]


def chat_plan(body: dict[str, Any]) -> tuple[str, bool, bool, int | None]:
    """-> (model, stream, include_usage, the client's completion cap)."""
    _go_keys(body, CHAT_FIELDS, "")
    model = _model(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty array", param="messages")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise InvalidRequest(f"messages[{i}] must be an object", param=f"messages[{i}]")
        if not isinstance(msg.get("role"), str):
            raise InvalidRequest(f"messages[{i}].role must be a string", param=f"messages[{i}].role")
        if len(msg) > 2 or "content" not in msg:  # fields besides role and content reach the template too
            _message_fields(msg, f"messages[{i}].")
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
    return model, stream, include_usage, max_tokens(body)


def _message_fields(msg: dict[str, Any], where: str) -> None:
    """A message's fields besides role and content, as Ollama decodes them (openai.Message): each is
    counted in the estimate (tokens.py ``_template_extras``), so each must be what Ollama reads."""
    _go_keys(msg, MESSAGE_FIELDS, where)
    for name in ("reasoning", "name", "tool_call_id"):
        _string(msg, name, where)
    tool_calls = msg.get("tool_calls")
    if tool_calls is None:
        return
    if not isinstance(tool_calls, list) or not all(
        isinstance(c, dict) and isinstance(c.get("function"), dict) for c in tool_calls
    ):
        raise InvalidRequest(
            f"{where}tool_calls must be an array of {{type, function: {{name, arguments}}}} objects",
            param=f"{where}tool_calls",
        )
    for j, call in enumerate(tool_calls):
        at = f"{where}tool_calls[{j}]."
        _go_keys(call, TOOL_CALL_FIELDS, at)
        _string(call, "id", at)
        _go_keys(call["function"], FUNCTION_FIELDS, at + "function.")
        _string(call["function"], "name", at + "function.")
        _string(call["function"], "arguments", at + "function.")


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
    return completions_plan(body)[:3]


def completions_plan(body: dict[str, Any]) -> tuple[str, bool, bool, int | None]:
    """-> (model, stream, include_usage, the client's completion cap)."""
    _go_keys(body, COMPLETION_FIELDS, "")
    model = _model(body)
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        # Ollama accepts only a string prompt (no arrays, no token lists).
        raise InvalidRequest("'prompt' must be a string", param="prompt")
    _string(body, "suffix", "")  # fill-in-the-middle: rendered with the prompt, so estimated with it
    stream = _flag(body, "stream")
    include_usage = _stream_options(body, stream)
    _single_choice(body)
    return model, stream, include_usage, max_tokens(body)


def embeddings(body: dict[str, Any]) -> tuple[str, list[str]]:
    _go_keys(body, EMBEDDING_FIELDS, "")
    model = _model(body)
    raw = body.get("input")
    if isinstance(raw, str):
        inputs = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(x, str) for x in raw):
        inputs = raw
    else:
        raise InvalidRequest("'input' must be a string or a non-empty array of strings", param="input")
    return model, inputs
