"""An emulator of Ollama's OpenAI-compatible API (``/v1/...``), faithful to its wire format.

It stands in for Ollama in the tests (in-process or as a subprocess), in demo mode (``app.py --demo``)
and in load benchmarks. Everything it answers follows shared/notes/ollama-wire.md: the non-stream
bodies (§2), both chat stream formats (§3a "old" = v0.5.2..v0.32.5, §3b "new" = v0.32.6+), the
/v1/completions usage quirk (§3c), image handling (§4), the error catalogue (§5), models (§6),
embeddings (§7) and the Host check (§8).

Replies are deterministic: a reply is ``reply_tokens`` words from a fixed vocabulary in which every
word is exactly one Llama 3 token, so counting the relayed text gives the visible token count. A
request steers the emulator with directives in its last user message (or completions prompt)::

    [[emu:reply_tokens=40]]   natural reply length (default 12)
    [[emu:fault=cut_after:3]] a fault, as in FAULTS below

Tests can also queue one-shot faults with ``state.add_fault("busy503")``; each inference request
(POST chat / completions / embeddings) takes one queued fault, if any, before looking at directives.
Other routes (GET /, /v1/models) never take a fault, so health checks cannot eat one. A fault acts
where the model would run: a request that fails validation gets its 400/404 (and still uses up the
queued fault).

Run alone: ``python -m proxyd.emulator --port 11434 --token-delay 0.02``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import hashlib
import ipaddress
import json
import logging
import math
import random
import re
import signal
import socket
import struct
import time
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import tornado.httpserver
import tornado.iostream
import tornado.netutil
import tornado.web

from proxyd.errors import openai_type_for_status
from proxyd.modelname import canonical
from proxyd.tokens import TokenCounter

log = logging.getLogger("proxyd.emulator")

# Every word is one Llama 3 token both with and without a leading space (checked with the ranks
# that proxyd.tokens loads), so "alpha beta gamma" is exactly 3 tokens.
VOCAB = (
    "alpha", "beta", "gamma", "delta", "epsilon", "eta", "theta", "lambda", "mu", "nu",
    "xi", "pi", "rho", "sigma", "tau", "phi", "chi", "psi", "omega",
)  # fmt: skip
DEFAULT_REPLY_TOKENS = 12
_AVG_WORD_BYTES = sum(len(w) + 1 for w in VOCAB) / len(VOCAB)  # for huge:BYTES padding
MAX_REPLY_TOKENS = 10_000_000

MODEL_CREATED = 1724000000  # the "modified time" every emulated model reports in /v1/models
FINGERPRINT = "fp_ollama"
VERSION = "0.32.5-emulator"

BUSY_MESSAGE = "server busy, please try again.  maximum pending requests exceeded"  # two spaces, as Ollama
RUNNER_DIED = "llama runner process has terminated: exit status 2"
NO_VISION = "this model is missing data required for image input"
NOT_AN_IMAGE = "Failed to create new sequence: failed to process inputs: image: unknown format"
IMAGE_URL_UNSUPPORTED = "image URLs are not currently supported, please use base64 encoded data instead"

# Fault names; the ones with an argument are written NAME:ARG.
FAULTS = {
    "error500": None,
    "busy503": None,
    "slow_first_byte": float,  # seconds
    "cut_after": int,  # content chunks
    "no_usage": None,
    "bad_json": None,
    "huge": int,  # bytes
    "stall_after": int,  # content chunks (stream); body bytes after the headers (non-stream)
}

_DIRECTIVE = re.compile(r"\[\[emu:([a-z_]+)=([^\]]*)\]\]")
_IMAGE_PREFIXES = (
    "data:image/jpeg;base64,",
    "data:image/jpg;base64,",
    "data:image/png;base64,",
    "data:image/webp;base64,",
    "data:;base64,",
)
_BIG_BODY = 1 << 30  # Ollama has no body limit; 1 GiB keeps Tornado out of the way of image tests


# --------------------------------------------------------------------------------------------
# Options and state
# --------------------------------------------------------------------------------------------


@dataclass
class EmulatorOptions:
    stream_format: str = "old"  # "old" = Ollama v0.5.2..v0.32.5 chat stream; "new" = v0.32.6+
    token_delay_s: float = 0.0  # sleep between streamed chunks (non-stream: n * delay in total)
    first_byte_delay_s: float = 0.0  # before headers / first chunk (model load + prompt eval)
    models: tuple = ("llama3.2:1b", "moondream", "nomic-embed-text")
    vision_models: tuple = ("moondream",)
    embedding_models: tuple = ("nomic-embed-text", "llama3.2:1b")  # models that answer /v1/embeddings
    check_host: bool = True  # Ollama's Host check: 403 with an empty body for a non-local Host
    prompt_token_skew: int = 0  # added to reported prompt_tokens (tells an estimate from a report)
    image_tokens: int = 729  # per image on vision models (moondream: 27x27 patches)
    embedding_dims: int = 64
    send_usage: bool = True  # False = an upstream that never reports usage in streams
    # Models that only embed: chat says `"X" does not support chat`, completions `... generate`.
    embedding_only_models: tuple = ("nomic-embed-text",)
    # Models whose template takes a completions `suffix` (fill-in-the-middle, like qwen2.5-coder); any
    # other model answers a suffix with 400 "does not support insert", as Ollama does.
    insert_models: tuple = ()

    def __post_init__(self) -> None:
        if self.stream_format not in ("old", "new"):
            raise ValueError(f"stream_format must be 'old' or 'new', not {self.stream_format!r}")


@dataclass(frozen=True)
class Fault:
    name: str
    arg: Any = None


def parse_fault(text: str) -> Fault:
    """``"cut_after:3"`` → Fault("cut_after", 3). Raises ValueError for unknown names or bad args."""
    name, _, raw = text.strip().partition(":")
    if name not in FAULTS:
        raise ValueError(f"unknown fault {name!r}; known: {', '.join(sorted(FAULTS))}")
    conv = FAULTS[name]
    if conv is None:
        return Fault(name)
    if not raw:
        raise ValueError(f"fault {name!r} needs an argument ({name}:N)")
    value = conv(raw)
    if value < 0:
        raise ValueError(f"fault {name!r} needs a non-negative argument")
    return Fault(name, value)


class EmulatorState:
    """Everything one emulator instance owns; handlers get it through ``initialize``."""

    def __init__(self, options: Optional[EmulatorOptions] = None) -> None:
        self.options = options or EmulatorOptions()
        self.requests: collections.deque = collections.deque(maxlen=1000)
        self.faults: collections.deque = collections.deque()
        self.active_streams = 0
        self.cancelled_streams = 0
        self.cancelled_answers = 0  # non-stream generations abandoned by the client (Ollama stops too)
        self.completed = 0  # inference responses delivered in full (stream reached [DONE])
        # The listening address, for the Host check (Ollama checks the listener, not the connection).
        # None when the app was served by someone else: then the connection's local address is used.
        self.bound_address: Optional[str] = None
        self.hostname = socket.gethostname().lower()
        o = self.options
        self.tokens = TokenCounter(
            {
                "llama3.2:1b": {"tokenizer": "llama3", "template": "llama3"},
                "moondream": {"tokenizer": "llama3", "template": "moondream", "image_tokens": o.image_tokens},
            },
            {"tokenizer": "llama3", "template": "generic"},
        )

    def add_fault(self, fault: str) -> None:
        parse_fault(fault)  # fail at the caller, not later inside a request
        self.faults.append(fault)

    def take_fault(self) -> Optional[Fault]:
        return parse_fault(self.faults.popleft()) if self.faults else None


# --------------------------------------------------------------------------------------------
# Errors and Go-like JSON decoding
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


def _bad(message: str) -> OllamaError:
    return OllamaError(400, message, middleware=True)


def go_json(obj: Any) -> bytes:
    """JSON the way Go's encoder writes it: compact, UTF-8, HTML characters escaped."""
    s = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    if "<" in s or ">" in s or "&" in s or "\u2028" in s or "\u2029" in s:
        s = (
            s.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
        )  # fmt: skip
    return s.encode()


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


def decode_body(raw: bytes) -> tuple[Any, Optional[str]]:
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


def _go_kind(value: Any) -> str:
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


def _go_type(value: Any) -> str:
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


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# field → (check, Go type name) for the request structs; null is always fine (zero value).
_CHAT_FIELDS = {
    "model": (lambda v: isinstance(v, str), "string"),
    "messages": (lambda v: isinstance(v, list), "[]openai.Message"),
    "stream": (lambda v: isinstance(v, bool), "bool"),
    "stream_options": (lambda v: isinstance(v, dict), "openai.StreamOptions"),
    "max_tokens": (_is_int, "int"),
    "seed": (_is_int, "int"),
    "temperature": (_is_num, "float64"),
    "top_p": (_is_num, "float64"),
    "frequency_penalty": (_is_num, "float64"),
    "presence_penalty": (_is_num, "float64"),
    "tools": (lambda v: isinstance(v, list), "[]api.Tool"),
}
_COMPLETION_FIELDS = {
    "model": (lambda v: isinstance(v, str), "string"),
    "prompt": (lambda v: isinstance(v, str), "string"),
    "stream": (lambda v: isinstance(v, bool), "bool"),
    "stream_options": (lambda v: isinstance(v, dict), "openai.StreamOptions"),
    "max_tokens": (_is_int, "int"),
    "seed": (_is_int, "int"),
    "temperature": (_is_num, "float32"),
    "top_p": (_is_num, "float32"),
    "suffix": (lambda v: isinstance(v, str), "string"),
}
_EMBED_FIELDS = {
    "model": (lambda v: isinstance(v, str), "string"),
    "encoding_format": (lambda v: isinstance(v, str), "string"),
    "dimensions": (_is_int, "int"),
}


def check_struct(body: Any, struct_name: str, fields: dict) -> dict:
    """What gin's ShouldBindJSON does to a decoded body: type errors for the known fields."""
    if body is None:
        return {}  # `null` decodes into a zero struct
    if not isinstance(body, dict):
        raise _bad(f"json: cannot unmarshal {_go_kind(body)} into Go value of type openai.{struct_name}")
    for name, (ok, go_type) in fields.items():
        value = body.get(name)
        if value is not None and not ok(value):
            kind = _go_kind(value)
            if kind == "number":
                kind = f"number {json.dumps(value)}"
            raise _bad(
                f"json: cannot unmarshal {kind} into Go struct field {struct_name}.{name} of type {go_type}"
            )
    return body


# --------------------------------------------------------------------------------------------
# Models, Host check, images, directives
# --------------------------------------------------------------------------------------------


def _find(name: str, names: tuple) -> Optional[str]:
    """Ollama's name matching (case-insensitive, default namespace 'library', default tag 'latest'):
    the same folding proxyd records models under, so it is written once, in proxyd/modelname.py."""
    want = canonical(name)
    if not want:
        return None
    return next((m for m in names if canonical(m) == want), None)


def _listed_name(name: str) -> str:
    """How Ollama lists a model: always with its tag."""
    return name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"


def _owner(name: str) -> str:
    parts = name.split("/")
    return parts[-2] if len(parts) >= 2 else "library"


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


def decode_image_url(url: str) -> bytes:
    """Ollama's decodeImageURL at HEAD (notes §4)."""
    if url.startswith(("http://", "https://")):
        raise _bad(IMAGE_URL_UNSUPPORTED)
    for prefix in _IMAGE_PREFIXES:
        if url.startswith(prefix):
            try:
                return base64.b64decode(url[len(prefix):], validate=True)
            except (ValueError, TypeError):
                raise _bad("invalid image input") from None
    raise _bad("invalid image input")


def looks_like_image(data: bytes) -> bool:
    """PNG, JPEG or WebP by magic bytes: what a runner's decoder would accept."""
    return (
        data.startswith(b"\x89PNG\r\n\x1a\n")
        or data.startswith(b"\xff\xd8\xff")
        or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")
    )


def directives(text: str) -> dict[str, str]:
    return {k: v.strip() for k, v in _DIRECTIVE.findall(text)}


@dataclass
class Reply:
    """What the emulated model generates for one request."""

    words: list
    finish_reason: str
    completion_tokens: int


def plan_reply(natural: int, max_tokens: Optional[int], pad_bytes: int = 0) -> Reply:
    """The reply's tokens and how it ends.

    Ollama counts the EOS token (notes §2): a natural stop after n visible tokens reports n + 1.
    num_predict (= max_tokens) stops generation after exactly that many tokens, so any
    max_tokens <= n cuts the reply (the EOS would have been token n + 1) with "length".
    """
    if pad_bytes:
        natural = max(natural, int(pad_bytes / _AVG_WORD_BYTES))
    if max_tokens is not None and 0 < max_tokens <= natural:
        n, finish, completion = max_tokens, "length", max_tokens
    else:
        n, finish, completion = natural, "stop", natural + 1
    words = [VOCAB[i % len(VOCAB)] if i == 0 else " " + VOCAB[i % len(VOCAB)] for i in range(n)]
    return Reply(words, finish, completion)


def embedding_vector(text: str, dims: int) -> list[float]:
    """A deterministic unit vector for ``text`` (float32 values, as Ollama returns)."""
    seed = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
    rng = random.Random(seed)
    v = [rng.gauss(0.0, 1.0) for _ in range(dims)]
    norm = math.sqrt(sum(x * x for x in v)) or 1.0
    return list(struct.unpack(f"<{dims}f", struct.pack(f"<{dims}f", *(x / norm for x in v))))


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(obj: Any) -> bytes:
    return b"data: " + go_json(obj) + b"\n\n"


_DONE = b"data: [DONE]\n\n"
# Kinds of stream events: content chunks count for cut_after / stall_after and get the token delay.
CONTENT, FINISH, TAIL = "content", "finish", "tail"
Events = Iterator[tuple[str, bytes]]


# --------------------------------------------------------------------------------------------
# Request parsing: body → a Job (what to generate) or an OllamaError
# --------------------------------------------------------------------------------------------


@dataclass
class Job:
    model: str  # as sent: Ollama echoes it
    stream: bool
    include_usage: bool
    max_tokens: Optional[int]
    steer_text: str  # where [[emu:...]] directives are read from
    messages: Optional[list] = None  # chat
    prompt: Optional[str] = None  # completions
    images: int = 0
    bad_image: bool = False
    wants_thinking: bool = False  # reasoning_effort other than "none": no emulated model thinks
    tools: Optional[list] = None  # chat: rendered into the prompt by the template, so counted
    suffix: str = ""  # completions: fill-in-the-middle text after the prompt


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n\n".join(p["text"] for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def _check_message(msg: Any, job: Job) -> None:
    """FromChatRequest's checks on one message: content type, parts, images, tool calls."""
    if not isinstance(msg, dict):
        raise _bad(
            f"json: cannot unmarshal {_go_kind(msg)} into Go struct field "
            "ChatCompletionRequest.messages of type openai.Message"
        )
    content = msg.get("content")
    if isinstance(content, list):
        for part in content:
            _check_part(part, job)
    elif not isinstance(content, str) and not (content is None and msg.get("tool_calls")):
        raise _bad(f"invalid message content type: {_go_type(content)}")
    for call in msg.get("tool_calls") or ():
        args = (call.get("function") or {}).get("arguments") if isinstance(call, dict) else None
        if isinstance(args, str):
            try:
                json.loads(args)
            except ValueError:
                raise _bad("invalid tool call arguments") from None


def _check_part(part: Any, job: Job) -> None:
    if not isinstance(part, dict):
        raise _bad("invalid message format")
    kind = part.get("type")
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise _bad("invalid message format")
    elif kind == "image_url":
        ref = part.get("image_url")
        url = ref.get("url") if isinstance(ref, dict) else ref
        if not isinstance(url, str):
            raise _bad("invalid message format")
        data = decode_image_url(url)
        job.images += 1
        job.bad_image = job.bad_image or not looks_like_image(data)
    elif kind == "input_audio":
        # Ollama hands the audio bytes to the model as "image" data; no emulated model takes audio.
        job.images += 1
        job.bad_image = True
    else:
        raise _bad("invalid message format")


def _stream_flags(body: dict) -> tuple[bool, bool]:
    opts = body.get("stream_options") or {}
    return bool(body.get("stream")), bool(opts.get("include_usage"))


def parse_chat(body: Any) -> Job:
    body = check_struct(body, "ChatCompletionRequest", _CHAT_FIELDS)
    messages = body.get("messages") or []
    if not messages:
        raise _bad("[] is too short - 'messages'")
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
    body = check_struct(body, "CompletionRequest", _COMPLETION_FIELDS)
    stop = body.get("stop")
    if isinstance(stop, list):
        for item in stop:
            if not isinstance(item, str):
                raise _bad(f"invalid type for 'stop' field: {_go_type(item)}")
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


def parse_embeddings(body: Any) -> tuple[str, list[str], str, Optional[int]]:
    """(model, inputs, encoding_format, dimensions), in the order Ollama validates them (§7)."""
    body = check_struct(body, "EmbedRequest", _EMBED_FIELDS)
    raw = body.get("input")
    if raw is None or raw == []:
        raise _bad("invalid input")
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise _bad(f"Invalid value for 'encoding_format' = {fmt}. Supported values: ['float', 'base64'].")
    inputs = [raw] if isinstance(raw, str) else raw
    if not isinstance(inputs, list) or not all(isinstance(x, str) for x in inputs):
        raise OllamaError(400, "invalid input type")
    return body.get("model") or "", inputs, fmt, body.get("dimensions")


# --------------------------------------------------------------------------------------------
# Handlers
# --------------------------------------------------------------------------------------------


class _AnyMethod:
    """SUPPORTED_METHODS for the 404 handler: gin answers 404 to every method on an unknown path."""

    def __contains__(self, method: object) -> bool:
        return True


class BaseHandler(tornado.web.RequestHandler):
    """Records the request, applies Ollama's Host check, writes gin-style plain 404/405."""

    def initialize(self, state: EmulatorState) -> None:
        self.state = state
        self.body_json: Any = None
        self.body_error: Optional[str] = None
        self._gone: Optional[asyncio.Event] = None

    def set_default_headers(self) -> None:
        self.clear_header("Server")  # Go's net/http sends none

    def compute_etag(self) -> Optional[str]:
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
        self._write_ollama_error(OllamaError(status_code, str(exc) if exc else self._reason))

    def _write_ollama_error(self, err: OllamaError) -> None:
        self.set_status(err.status)
        body = {
            "error": {
                "message": err.message,
                "type": openai_type_for_status(err.status),
                "param": None,
                "code": None,
            }
        }
        if err.middleware:
            self.set_header("Content-Type", "application/json; charset=utf-8")
            self.finish(go_json(body))
        else:
            self.set_header("Content-Type", "application/json")
            self.finish(go_json(body) + b"\n")

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
        models = self.state.options.models
        data = [
            {"id": _listed_name(m), "object": "model", "created": MODEL_CREATED, "owned_by": _owner(m)}
            for m in models
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
        if not canonical(name):  # ShowHandler: parseAndValidateModelRef -> 400 (errtypes.InvalidModelNameErrMsg)
            self._write_ollama_error(OllamaError(400, "invalid model name"))
            return
        found = _find(name, self.state.options.models)
        if found is None:
            self._write_ollama_error(OllamaError(404, f"model '{name}' not found"))
            return
        self.write_json({"id": name, "object": "model", "created": MODEL_CREATED, "owned_by": _owner(found)})


class InferenceHandler(BaseHandler):
    """Shared by chat, completions and embeddings: faults, delays, streaming, cancellation."""

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
                raise _bad(self.body_error)
            await self.serve(fault)
        except OllamaError as err:
            self._write_ollama_error(err)

    async def serve(self, fault: Optional[Fault]) -> None:
        raise NotImplementedError

    # -- helpers shared by the endpoints ----------------------------------------------------

    def steer(self, text: str, queued: Optional[Fault]) -> tuple[int, Optional[Fault]]:
        """Reads [[emu:...]] directives: (natural reply length, fault). A queued fault wins."""
        found = directives(text) if "[[emu:" in text else {}
        natural = DEFAULT_REPLY_TOKENS
        if "reply_tokens" in found:
            try:
                natural = min(max(int(found["reply_tokens"]), 0), MAX_REPLY_TOKENS)
            except ValueError:
                pass
        fault = queued
        if fault is None and "fault" in found:
            try:
                fault = parse_fault(found["fault"])
            except ValueError:
                log.debug("ignoring unknown fault directive %r", found["fault"])
        return natural, fault

    async def before_answer(self, fault: Optional[Fault]) -> bool:
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
                except asyncio.TimeoutError:
                    pass
        return self._gone.is_set()

    def drop_connection(self) -> None:
        """Closes the socket abruptly: no terminating chunk, no [DONE], no response at all."""
        stream = self.detach()
        stream.close()

    async def hang_until_gone(self) -> None:
        assert self._gone is not None
        await self._gone.wait()

    async def answer_once(self, body: Any, fault: Optional[Fault], delay: float) -> None:
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

    async def run_stream(self, events: Events, fault: Optional[Fault]) -> None:
        """Writes SSE events with the configured delays, faults and cancellation handling."""
        opts = self.state.options
        stop_at, cut = None, False
        if fault is not None and fault.name in ("cut_after", "stall_after"):
            stop_at, cut = fault.arg, fault.name == "cut_after"
        self.set_header("Content-Type", "text/event-stream")
        self.state.active_streams += 1
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

    def usage_allowed(self, job: Job, fault: Optional[Fault]) -> bool:
        no_usage = fault is not None and fault.name == "no_usage"
        return job.include_usage and self.state.options.send_usage and not no_usage

    def resolve_model(self, job: Job, missing_status: int) -> str:
        """The configured model a job asks for; Ollama's errors when there is none."""
        if not job.model:
            if missing_status == 400:
                raise OllamaError(400, "model is required")
            raise OllamaError(404, "model '' not found")
        found = _find(job.model, self.state.options.models)
        if found is None:
            raise OllamaError(404, f"model '{job.model}' not found")
        return found


class ChatHandler(InferenceHandler):
    async def serve(self, queued: Optional[Fault]) -> None:
        opts = self.state.options
        job = parse_chat(self.body_json)
        model = self.resolve_model(job, missing_status=400)
        if _find(model, opts.embedding_only_models):
            raise OllamaError(400, f'"{job.model}" does not support chat')
        if job.wants_thinking:
            raise OllamaError(400, f'"{job.model}" does not support thinking')
        natural, fault = self.steer(job.steer_text, queued)
        if not await self.before_answer(fault):
            return
        if job.images:
            if not _find(model, opts.vision_models):
                raise OllamaError(500, NO_VISION)
            if job.bad_image:
                raise OllamaError(500, NOT_AN_IMAGE)
        prompt = await self.rendered_chat_prompt(model, job) + opts.prompt_token_skew
        pad = fault.arg if fault is not None and fault.name == "huge" else 0
        reply = plan_reply(natural, job.max_tokens, pad)
        rid = f"chatcmpl-{random.randrange(999)}"
        if job.stream:
            await self.run_stream(self.chat_events(job, reply, rid, prompt, fault), fault)
            return
        body = {
            "id": rid,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": job.model,
            "system_fingerprint": FINGERPRINT,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(reply.words)},
                    "finish_reason": reply.finish_reason,
                }
            ],
            "usage": _usage(prompt, reply.completion_tokens),
        }
        delay = opts.first_byte_delay_s + len(reply.words) * opts.token_delay_s
        await self.answer_once(body, fault, delay)

    async def rendered_chat_prompt(self, model: str, job: Job) -> int:
        """The prompt the template renders: the messages, and each message's ``reasoning`` (Ollama's
        api.Message.Thinking) the way thinking templates (qwen3, deepseek-r1) write it back. Counted here
        apart from proxyd's estimate of it, so a test can tell the two apart."""
        messages = job.messages or []
        thoughts = [m["reasoning"] for m in messages if isinstance(m.get("reasoning"), str) and m["reasoning"]]
        if thoughts:
            messages = [{k: v for k, v in m.items() if k != "reasoning"} for m in messages]
        base = await self.state.tokens.chat_prompt(model, messages, job.tools)
        counts = await self.state.tokens.count_many(model, [f"<think>\n{t}\n</think>\n\n" for t in thoughts])
        return base + sum(counts)

    def chat_events(
        self, job: Job, reply: Reply, rid: str, prompt: int, fault: Optional[Fault]
    ) -> Events:
        usage = _usage(prompt, reply.completion_tokens) if self.usage_allowed(job, fault) else None
        if self.state.options.stream_format == "new":
            return _chat_events_new(job.model, rid, reply, usage)
        return _chat_events_old(job.model, rid, reply, usage)


def _chunk(rid: str, created: int, model: str, choices: list) -> dict:
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": FINGERPRINT,
        "choices": choices,
    }


def _chat_events_old(model: str, rid: str, reply: Reply, usage: Optional[dict]) -> Events:
    """§3a: role in every delta, `created` per chunk, finish_reason on a final empty-content chunk."""
    for word in reply.words:
        choice = {"index": 0, "delta": {"role": "assistant", "content": word}, "finish_reason": None}
        yield CONTENT, _sse(_chunk(rid, int(time.time()), model, [choice]))
    final = _chunk(
        rid,
        int(time.time()),
        model,
        [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": reply.finish_reason}],
    )
    yield FINISH, _sse(final)
    if usage is not None:
        yield TAIL, _sse({**final, "choices": [], "usage": usage})
    yield TAIL, _DONE


def _chat_events_new(model: str, rid: str, reply: Reply, usage: Optional[dict]) -> Events:
    """§3b: role only in the first delta, one `created`, a separate `{}` finish chunk."""
    created = int(time.time())
    words = reply.words or [""]  # an empty completion still opens with a role chunk
    for i, word in enumerate(words):
        delta = {"role": "assistant", "content": word} if i == 0 else {"content": word}
        choice = {"index": 0, "delta": delta, "finish_reason": None}
        yield CONTENT, _sse(_chunk(rid, created, model, [choice]))
    final = _chunk(rid, created, model, [{"index": 0, "delta": {}, "finish_reason": reply.finish_reason}])
    yield FINISH, _sse(final)
    if usage is not None:
        yield TAIL, _sse({**final, "choices": [], "usage": usage})
    yield TAIL, _DONE


class CompletionsHandler(InferenceHandler):
    async def serve(self, queued: Optional[Fault]) -> None:
        opts = self.state.options
        job = parse_completion(self.body_json)
        model = self.resolve_model(job, missing_status=404)
        if _find(model, opts.embedding_only_models):
            raise OllamaError(400, f'"{job.model}" does not support generate')
        if job.suffix and not _find(model, opts.insert_models):
            raise OllamaError(400, "does not support insert")  # a capability check, before the load answer
        natural, fault = self.steer(job.steer_text, queued)
        if not await self.before_answer(fault):
            return
        if job.prompt and job.suffix:
            # The template's fill-in-the-middle branch instead of a chat turn (qwen2.5-coder:
            # <|fim_prefix|>{prompt}<|fim_suffix|>{suffix}<|fim_middle|>, three special tokens).
            counts = await self.state.tokens.count_many(model, [job.prompt, job.suffix])
            prompt = sum(counts) + 3 + opts.prompt_token_skew
            pad = fault.arg if fault is not None and fault.name == "huge" else 0
            reply = plan_reply(natural, job.max_tokens, pad)
        elif job.prompt:
            prompt = await self.state.tokens.text_prompt(model, job.prompt) + opts.prompt_token_skew
            pad = fault.arg if fault is not None and fault.name == "huge" else 0
            reply = plan_reply(natural, job.max_tokens, pad)
        else:
            # An empty prompt only loads the model: text "", finish_reason "load", no metrics (§1).
            prompt, reply = 0, Reply([], "load", 0)
        rid = f"cmpl-{random.randrange(999)}"
        if job.stream:
            usage = _usage(prompt, reply.completion_tokens) if self.usage_allowed(job, fault) else None
            await self.run_stream(_completion_events(job.model, rid, reply, usage), fault)
            return
        body = {
            "id": rid,
            "object": "text_completion",
            "created": int(time.time()),
            "model": job.model,
            "system_fingerprint": FINGERPRINT,
            "choices": [{"text": "".join(reply.words), "index": 0, "finish_reason": reply.finish_reason}],
            "usage": _usage(prompt, reply.completion_tokens),
        }
        delay = opts.first_byte_delay_s + len(reply.words) * opts.token_delay_s
        await self.answer_once(body, fault, delay)


def _completion_events(model: str, rid: str, reply: Reply, usage: Optional[dict]) -> Events:
    """§3c: finish_reason on the done chunk; with include_usage every chunk has a zeroed usage."""
    zeroed = {"usage": _usage(0, 0)} if usage is not None else {}

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

    for word in reply.words:
        yield CONTENT, _sse(chunk([{"text": word, "index": 0, "finish_reason": None}]))
    final = chunk([{"text": "", "index": 0, "finish_reason": reply.finish_reason}])
    yield FINISH, _sse(final)
    if usage is not None:
        yield TAIL, _sse({**final, "choices": [], "usage": usage})
    yield TAIL, _DONE


class EmbeddingsHandler(InferenceHandler):
    async def serve(self, queued: Optional[Fault]) -> None:
        opts = self.state.options
        model_name, inputs, fmt, dimensions = parse_embeddings(self.body_json)
        if not model_name:
            raise OllamaError(404, "model '' not found")
        model = _find(model_name, opts.models)
        if model is None:
            raise OllamaError(404, f'model "{model_name}" not found, try pulling it first')
        if not _find(model, opts.embedding_models):
            # UNCONFIRMED text: Ollama's capability errors read `"NAME" does not support X`.
            raise OllamaError(400, f'"{model_name}" does not support embeddings')
        _, fault = self.steer(inputs[-1], queued)
        if not await self.before_answer(fault):
            return
        dims = opts.embedding_dims
        if _is_int(dimensions) and 0 < dimensions < dims:  # type: ignore[operator]
            dims = dimensions  # type: ignore[assignment]
        data = []
        for i, text in enumerate(inputs):
            vec = embedding_vector(text, dims)
            if fmt == "base64":
                vec = base64.b64encode(struct.pack(f"<{dims}f", *vec)).decode()  # type: ignore[assignment]
            data.append({"object": "embedding", "embedding": vec, "index": i})
        tokens = await self.state.tokens.embedding_input(model, inputs) + opts.prompt_token_skew
        body = {
            "object": "list",
            "data": data,
            "model": model_name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        await self.answer_once(body, fault, opts.first_byte_delay_s)


# --------------------------------------------------------------------------------------------
# Application, server, command line
# --------------------------------------------------------------------------------------------


def _no_access_log(handler: tornado.web.RequestHandler) -> None:
    """Per-request logging only at DEBUG: load benchmarks must not pay for it."""
    if log.isEnabledFor(logging.DEBUG):
        r = handler.request
        log.debug("%d %s %s %.1fms", handler.get_status(), r.method, r.uri, 1000 * r.request_time())


def make_app(state: EmulatorState) -> tornado.web.Application:
    args = {"state": state}
    return tornado.web.Application(
        [
            (r"/", RootHandler, args),
            (r"/api/version", VersionHandler, args),
            (r"/v1/chat/completions", ChatHandler, args),
            (r"/v1/completions", CompletionsHandler, args),
            (r"/v1/embeddings", EmbeddingsHandler, args),
            (r"/v1/models", ModelsHandler, args),
            (r"/v1/models/([^/]+)", ModelHandler, args),
        ],
        default_handler_class=NotFoundHandler,
        default_handler_args=args,
        log_function=_no_access_log,
    )


async def start_emulator(
    port: int = 0, address: str = "127.0.0.1", **option_overrides: Any
) -> tuple[tornado.httpserver.HTTPServer, int, EmulatorState]:
    """Starts an emulator on the running loop; port 0 picks a free port. Stop with server.stop()."""
    state = EmulatorState(EmulatorOptions(**option_overrides))
    app = make_app(state)
    server = tornado.httpserver.HTTPServer(app, max_body_size=_BIG_BODY, max_buffer_size=_BIG_BODY)
    sockets = tornado.netutil.bind_sockets(port, address)
    server.add_sockets(sockets)
    state.bound_address = sockets[0].getsockname()[0]
    return server, sockets[0].getsockname()[1], state


def _parse_args(argv: Optional[list]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m proxyd.emulator", description="Ollama /v1 emulator")
    p.add_argument("--port", type=int, default=11434)
    p.add_argument("--address", default="127.0.0.1")
    p.add_argument("--token-delay", type=float, default=0.0, help="seconds between streamed tokens")
    p.add_argument("--first-byte-delay", type=float, default=0.0, help="seconds before the first byte")
    p.add_argument("--stream-format", choices=("old", "new"), default="old")
    p.add_argument("--no-usage", action="store_true", help="never report usage in streams")
    p.add_argument("--prompt-token-skew", type=int, default=0)
    p.add_argument("--no-host-check", action="store_true")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


async def _serve(args: argparse.Namespace) -> None:
    server, port, state = await start_emulator(
        port=args.port,
        address=args.address,
        token_delay_s=args.token_delay,
        first_byte_delay_s=args.first_byte_delay,
        stream_format=args.stream_format,
        send_usage=not args.no_usage,
        prompt_token_skew=args.prompt_token_skew,
        check_host=not args.no_host_check,
    )
    shown = f"[{args.address}]" if ":" in args.address else args.address
    log.info("ollama emulator listening on http://%s:%d", shown, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.stop()
    try:
        await asyncio.wait_for(server.close_all_connections(), 2.0)
    except asyncio.TimeoutError:
        pass
    state.tokens.close()
    log.info("ollama emulator stopped")


def main(argv: Optional[list] = None) -> None:
    args = _parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
