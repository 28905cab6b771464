"""Ollama's OpenAI-compatible wire format: its JSON, its decoder's errors, its error envelope and the
shapes of its answers (openai/openai.go and middleware/openai.go at ollama/ollama fb30760).

No Tornado here: values in, bytes or values out.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

FINGERPRINT = "fp_ollama"
MODEL_CREATED = 1724000000  # the "modified time" every emulated model reports in /v1/models
VERSION = "0.32.5-emulator"

BUSY_MESSAGE = "server busy, please try again.  maximum pending requests exceeded"  # two spaces, as Ollama
RUNNER_DIED = "llama runner process has terminated: exit status 2"
NO_VISION = "this model is missing data required for image input"
NOT_AN_IMAGE = "Failed to create new sequence: failed to process inputs: image: unknown format"
IMAGE_URL_UNSUPPORTED = "image URLs are not currently supported, please use base64 encoded data instead"


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class OllamaError(Exception):
    """An error answered in Ollama's OpenAI envelope.

    ``middleware``: raised where Ollama's middleware would (bad JSON, validation). Those bodies come
    from gin with ``application/json; charset=utf-8`` and no trailing newline; handler errors pass
    through the writer with ``application/json`` and json.Encoder's newline (notes §5).
    """

    def __init__(self, status: int, message: str, middleware: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.middleware = middleware


def bad(message: str) -> OllamaError:
    """A 400 from the middleware (validation)."""
    return OllamaError(400, message, middleware=True)


def error_type(status: int) -> str:
    """openai.go NewError: the envelope's ``type`` for a status."""
    if status == 400:
        return "invalid_request_error"
    if status == 404:
        return "not_found_error"
    return "api_error"


def error_body(err: OllamaError) -> tuple[str, bytes]:
    """(Content-Type, body) of an error answer."""
    body = go_json({"error": {"message": err.message, "type": error_type(err.status), "param": None, "code": None}})
    if err.middleware:
        return "application/json; charset=utf-8", body
    return "application/json", body + b"\n"


# --------------------------------------------------------------------------------------------
# JSON as Go writes it
# --------------------------------------------------------------------------------------------

_HTML = (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029"))


def _escape_html(s: str) -> str:
    if "<" in s or ">" in s or "&" in s or "\u2028" in s or "\u2029" in s:
        for char, escape in _HTML:
            s = s.replace(char, escape)
    return s


def go_json(obj: Any) -> bytes:
    """An answer body as Go's encoder writes it: compact, UTF-8, HTML characters escaped."""
    return _escape_html(json.dumps(obj, ensure_ascii=False, separators=(",", ":"))).encode()


def go_float(x: float) -> str:
    """A float64 as encoding/json writes it: the shortest digits that round-trip, in plain notation for
    1e-6 <= |x| < 1e21, else in exponent notation with e-07 written e-7."""
    a = abs(x)
    if a != 0 and (a < 1e-6 or a >= 1e21):
        text = repr(x)
        return text.replace("e-0", "e-")
    return format(Decimal(repr(x)).normalize(), "f")


def marshal(value: Any) -> str:
    """``value`` as json.Marshal writes what Ollama decoded it into, for text a template prints: every
    number a float64 (JSON has no integers for Go's ``any``); dicts in the order given (a Go map sorts
    its keys: pass them sorted, see ``sorted_maps``)."""
    if isinstance(value, str):
        return _escape_html(json.dumps(value, ensure_ascii=False))
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (int, float)):
        try:
            return go_float(float(value))
        except OverflowError:  # past float64: Go's decoder refuses the body; never reaches a template
            return str(value)
    if isinstance(value, dict):
        return "{" + ",".join(marshal(str(k)) + ":" + marshal(v) for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(marshal(v) for v in value) + "]"
    return marshal(str(value))


def sorted_maps(value: Any) -> Any:
    """A decoded ``any`` with every object's keys in Go's map order (sorted)."""
    if isinstance(value, dict):
        return {k: sorted_maps(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [sorted_maps(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------
# Decoding a body as Go's encoding/json does, with its error texts
# --------------------------------------------------------------------------------------------


def _go_char(ch: str) -> str:
    """Go's json quoteChar: how the decoder names an offending character."""
    if ch == "'":
        return "'\\''"
    if ch == '"':
        return "'\"'"
    return "'" + json.dumps(ch, ensure_ascii=False)[1:-1] + "'"


def _open_container(doc: str, pos: int) -> str:
    """'{' or '[': the innermost container open at ``pos`` (for Go's 'after ...' wording)."""
    stack: list[str] = []
    in_str = esc = False
    for ch in doc[:pos]:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "{[":
            stack.append(ch)
        elif ch in "}]" and stack:
            stack.pop()
    return stack[-1] if stack else "{"


def _go_decode_error(doc: str, err: json.JSONDecodeError) -> str:
    """Translates Python's decoder error into the text Go's encoding/json would give."""
    if not doc.strip():
        return "EOF"
    pos = err.pos
    if err.msg.startswith("Invalid \\escape") or err.msg.startswith("Invalid \\u"):
        pos += 1  # Python points at the backslash, Go at the character after it
    if pos >= len(doc) or err.msg.startswith("Unterminated string"):
        return "unexpected EOF"
    ch = _go_char(doc[pos])
    if err.msg.startswith("Expecting property name"):
        return f"invalid character {ch} looking for beginning of object key string"
    if err.msg.startswith("Expecting ':'"):
        return f"invalid character {ch} after object key"
    if err.msg.startswith("Expecting ','"):
        where = "object key:value pair" if _open_container(doc, pos) == "{" else "array element"
        return f"invalid character {ch} after {where}"
    if err.msg.startswith("Invalid control character"):
        return f"invalid character {ch} in string literal"
    if err.msg.startswith("Invalid \\u"):
        return f"invalid character {ch} in \\u hexadecimal character escape"
    if err.msg.startswith("Invalid \\escape"):
        return f"invalid character {ch} in string escape code"
    return f"invalid character {ch} looking for beginning of value"


def _reject_constant(name: str) -> Any:
    raise ValueError(name)  # Go has no NaN / Infinity literals


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def decode_body(raw: bytes) -> tuple[Any, str | None]:
    """(value, None) or (None, Go error text). Like Go's Decoder.Decode, trailing data is ignored."""
    doc = raw.decode("utf-8", "replace")
    start = len(doc) - len(doc.lstrip(" \t\r\n"))
    try:
        value, _ = _DECODER.raw_decode(doc, start)
    except json.JSONDecodeError as e:
        return None, _go_decode_error(doc, e)
    except ValueError as e:
        word = str(e)
        if word.startswith("-"):
            return None, "invalid character 'I' in numeric literal"
        return None, f"invalid character '{word[0]}' looking for beginning of value"
    if b"\\ud" in raw.lower():  # a \uXXXX escape in the surrogate range (the common case skips the walk)
        value = _replace_lone_surrogates(value)
    return value, None


def _replace_lone_surrogates(value: Any) -> Any:
    """Go's decoder turns an escaped lone UTF-16 surrogate into U+FFFD instead of failing (encoding/json:
    "invalid UTF-16 surrogate pairs are not treated as an error"); Python keeps it as a code point that
    cannot be encoded as UTF-8 later (which made the emulator answer 500)."""
    if isinstance(value, str):
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(value, list):
        return [_replace_lone_surrogates(v) for v in value]
    if isinstance(value, dict):
        return {_replace_lone_surrogates(k): _replace_lone_surrogates(v) for k, v in value.items()}
    return value


def go_kind(value: Any) -> str:
    """The JSON kind as Go's UnmarshalTypeError names it."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, list):
        return "array"
    return "object"


def go_type(value: Any) -> str:
    """The Go dynamic type (%T) of a decoded ``any``."""
    if value is None:
        return "<nil>"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "float64"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "[]interface {}"
    return "map[string]interface {}"


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


# field → (check, Go type name) for the request structs; null is always fine (zero value).
CHAT_FIELDS = {
    "model": (_is_str, "string"),
    "messages": (lambda v: isinstance(v, list), "[]openai.Message"),
    "stream": (lambda v: isinstance(v, bool), "bool"),
    "stream_options": (lambda v: isinstance(v, dict), "openai.StreamOptions"),
    "max_tokens": (is_int, "int"),
    "seed": (is_int, "int"),
    "temperature": (_is_num, "float64"),
    "top_p": (_is_num, "float64"),
    "frequency_penalty": (_is_num, "float64"),
    "presence_penalty": (_is_num, "float64"),
    "tools": (lambda v: isinstance(v, list), "[]api.Tool"),
}
COMPLETION_FIELDS = {
    "model": (_is_str, "string"),
    "prompt": (_is_str, "string"),
    "stream": (lambda v: isinstance(v, bool), "bool"),
    "stream_options": (lambda v: isinstance(v, dict), "openai.StreamOptions"),
    "max_tokens": (is_int, "int"),
    "seed": (is_int, "int"),
    "temperature": (_is_num, "float32"),
    "top_p": (_is_num, "float32"),
    "suffix": (_is_str, "string"),
}
EMBED_FIELDS = {
    "model": (_is_str, "string"),
    "encoding_format": (_is_str, "string"),
    "dimensions": (is_int, "int"),
}


def check_struct(body: Any, struct_name: str, fields: dict, *, package: str = "openai", error=None) -> dict:
    """What gin's ShouldBindJSON does to a decoded body: type errors for the known fields (of a struct
    in Go package ``package``; ``error`` makes the exception, a 400 OllamaError by default)."""
    error = error or bad
    if body is None:
        return {}  # `null` decodes into a zero struct
    if not isinstance(body, dict):
        raise error(f"json: cannot unmarshal {go_kind(body)} into Go value of type {package}.{struct_name}")
    for name, (ok, go_type_name) in fields.items():
        value = body.get(name)
        if value is not None and not ok(value):
            kind = go_kind(value)
            if kind == "number":
                kind = f"number {json.dumps(value)}"
            raise error(f"json: cannot unmarshal {kind} into Go struct field {struct_name}.{name} of type {go_type_name}")
    return body


# --------------------------------------------------------------------------------------------
# Answers: usage, SSE events, chunks
# --------------------------------------------------------------------------------------------

DONE = b"data: [DONE]\n\n"
# Kinds of stream events: content chunks count for cut_after / stall_after and get the token delay.
CONTENT, FINISH, TAIL = "content", "finish", "tail"
Events = Iterator[tuple[str, bytes]]


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sse(obj: Any) -> bytes:
    return b"data: " + go_json(obj) + b"\n\n"


def chat_completion(rid: str, model: str, text: str, finish_reason: str, prompt: int, completion: int) -> dict:
    """§2: a non-stream chat answer."""
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": FINGERPRINT,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}],
        "usage": usage(prompt, completion),
    }


def text_completion(rid: str, model: str, text: str, finish_reason: str, prompt: int, completion: int) -> dict:
    """§2 for /v1/completions."""
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": FINGERPRINT,
        "choices": [{"text": text, "index": 0, "finish_reason": finish_reason}],
        "usage": usage(prompt, completion),
    }


def embedding_list(model: str, vectors: list, tokens: int) -> dict:
    """§7."""
    return {
        "object": "list",
        "data": [{"object": "embedding", "embedding": v, "index": i} for i, v in enumerate(vectors)],
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def _chunk(rid: str, created: int, model: str, choices: list) -> dict:
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": FINGERPRINT,
        "choices": choices,
    }


def chat_events_old(model: str, rid: str, words: list, finish_reason: str, use: dict | None) -> Events:
    """§3a (v0.5.2..v0.32.5): role in every delta, `created` per chunk, finish_reason on a final
    empty-content chunk."""
    for word in words:
        choice = {"index": 0, "delta": {"role": "assistant", "content": word}, "finish_reason": None}
        yield CONTENT, sse(_chunk(rid, int(time.time()), model, [choice]))
    final = _chunk(
        rid,
        int(time.time()),
        model,
        [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": finish_reason}],
    )
    yield FINISH, sse(final)
    if use is not None:
        yield TAIL, sse({**final, "choices": [], "usage": use})
    yield TAIL, DONE


def chat_events_new(model: str, rid: str, words: list, finish_reason: str, use: dict | None) -> Events:
    """§3b (v0.32.6+): role only in the first delta, one `created`, a separate `{}` finish chunk."""
    created = int(time.time())
    for i, word in enumerate(words or [""]):  # an empty completion still opens with a role chunk
        delta = {"role": "assistant", "content": word} if i == 0 else {"content": word}
        yield CONTENT, sse(_chunk(rid, created, model, [{"index": 0, "delta": delta, "finish_reason": None}]))
    final = _chunk(rid, created, model, [{"index": 0, "delta": {}, "finish_reason": finish_reason}])
    yield FINISH, sse(final)
    if use is not None:
        yield TAIL, sse({**final, "choices": [], "usage": use})
    yield TAIL, DONE


def completion_events(model: str, rid: str, words: list, finish_reason: str, use: dict | None) -> Events:
    """§3c: finish_reason on the done chunk; with include_usage every chunk has a zeroed usage."""
    zeroed = {"usage": usage(0, 0)} if use is not None else {}

    def chunk(choices: list) -> dict:
        return {
            "id": rid,
            "object": "text_completion",
            "created": int(time.time()),
            "choices": choices,
            "model": model,
            "system_fingerprint": FINGERPRINT,
            **zeroed,
        }

    for word in words:
        yield CONTENT, sse(chunk([{"text": word, "index": 0, "finish_reason": None}]))
    final = chunk([{"text": "", "index": 0, "finish_reason": finish_reason}])
    yield FINISH, sse(final)
    if use is not None:
        yield TAIL, sse({**final, "choices": [], "usage": use})
    yield TAIL, DONE
