"""Ollama's native dialect: /api/chat, /api/generate, /api/embed and the older /api/embeddings.

What the ``ollama`` client libraries, Open WebUI and the ollama CLI speak (api/types.go, server/routes.go
at ollama/ollama fb30760). Its envelope is ``{"error": "..."}``; the key comes as ``Authorization:
Bearer`` (the clients send the headers they are given); ``stream`` defaults to *true*; a stream is
NDJSON, one object a line, ending with no marker line but on the object with ``done: true``, which
carries ``done_reason``, the durations, ``prompt_eval_count`` and ``eval_count``. That object is the
usage report: ``relay_event`` withholds it and ``stream_end`` sends it after the settle (durable
before the last byte), with the billed counts filled in when the upstream sent none.

The completion budget goes to Ollama as ``options.num_predict`` (its cap); the client's own
``options.num_predict`` is its requested cap, where -1 (unlimited) and -2 (fill the context) and 0
mean none was given. ``keep_alive`` is dropped: how long a model stays loaded is the operator's
setting (keep_alive 0 would unload a model other users are using, "24h" would pin one in memory).
Images are base64 strings (``images`` of a message, or of the request for /api/generate); they pass
through the same checks and decode budgets as chat's image parts (proxyd/images.py).

Prompt estimates: /api/chat as a chat request (messages, tools, images). /api/generate as Ollama
renders it: ``raw`` sends the prompt as is; a ``suffix`` fills the model's fill-in-the-middle
template; a ``template`` of the client's own is counted as its text plus the values it may insert
(system, prompt, suffix: an upper bound whatever it does with them); otherwise the prompt is one user
message under the model's chat template, after the ``system`` message if one was given (the model's
own default system prompt, unknown to proxyd, is not counted: the reported usage settles it).
``context`` (the deprecated token ids of an earlier answer) counts one token an id. An empty prompt
or message list only loads the model: nothing to estimate, nothing reserved, billed 0.
"""

from __future__ import annotations

from typing import Any

from .. import jsonio
from ..errors import InvalidRequest, PayloadTooLarge, ProxyError, UpstreamError
from ..images import ImagePart
from ..limits_http import rate_headers
from ..modelname import canonical, why_invalid
from ..upstream import without_addresses
from ..validate import MAX_MODEL_CHARS, MAX_TOKENS_CAP, _go_keys
from . import upstream_object

# The fields of Ollama's request structs (api/types.go). Go matches keys case-insensitively, so a
# case variant ("OPTIONS", "Stream") would be read by Ollama and not by proxyd: refused (_go_keys).
_COMMON = {"model", "stream", "format", "keep_alive", "options", "think", "truncate", "shift",
           "_debug_render_only", "logprobs", "top_logprobs"}
CHAT_FIELDS = frozenset(_COMMON | {"messages", "tools"})
GENERATE_FIELDS = frozenset(_COMMON | {"prompt", "suffix", "system", "template", "context", "raw", "images"})
EMBED_FIELDS = frozenset({"model", "input", "keep_alive", "truncate", "dimensions", "options"})
EMBEDDINGS_FIELDS = frozenset({"model", "prompt", "keep_alive", "options"})
MESSAGE_FIELDS = frozenset({"role", "content", "thinking", "images", "tool_calls", "tool_name", "tool_call_id"})
# done_reason of an answer that evaluated nothing: an empty request loaded (or unloaded) the model.
_NOTHING_EVALUATED = ("load", "unload")


class NativeEndpoint:
    """What the native endpoints share: the key, the envelope, the NDJSON framing, the usage report."""

    name = ""
    operation = ""
    id_prefix = ""  # the native API has no ids
    reserves_completion = True
    stream_content_type = "application/x-ndjson"
    fields: frozenset = frozenset()
    # Ollama's API has no rate-limit headers of its own: the OpenAI-style x-ratelimit-* (and proxyd's
    # x-proxyd-limit-*) are what a native client can read, and the same a chat client gets.
    rate_headers = staticmethod(rate_headers)

    @staticmethod
    def credentials(headers: Any) -> str | None:
        return headers.get("Authorization")

    def forward_body(self, body: dict[str, Any], completion_tokens: int, stream: bool) -> dict[str, Any]:
        """options.num_predict = the reserved budget (the reservation stays an upper bound); the stream
        flag written out, so Ollama's default does not matter."""
        options = body.get("options")
        body["options"] = {**options, "num_predict": completion_tokens} if options else {"num_predict": completion_tokens}
        body["stream"] = stream
        body.pop("keep_alive", None)
        return body

    # -- the answer ------------------------------------------------------------------------------------

    def answer(self, raw: bytes, call: Any) -> bytes:
        doc = upstream_object(raw)
        call.usage = reported_usage(doc)
        self.collect(doc, call.texts)
        return raw

    def relay_event(self, data: bytes, call: Any) -> bytes | None:
        doc = upstream_object(data, "Upstream sent a line that is not a JSON object.")
        if "error" in doc:
            message = str(doc["error"])
            raise UpstreamError(f"Upstream error mid-stream: {without_addresses(message)}", status=502, detail=message)
        self.collect(doc, call.texts)
        if doc.get("done") is True:
            # The usage report: held back until the settle (stream_end), so that the client's last
            # byte comes after the ledger has it.
            call.usage = reported_usage(doc)
            call.last_event = doc
            call.upstream_done = True
            return None
        return data + b"\n"

    def stream_end(self, call: Any, usage: Any) -> bytes:
        doc = call.last_event
        if call.usage is None and usage is not None:
            # The upstream reported no counts: the client sees what was billed (as OpenAI's usage chunk
            # does on chat completions).
            doc["prompt_eval_count"], doc["eval_count"] = usage.prompt_tokens, usage.completion_tokens
        return jsonio.dumps(doc) + b"\n"

    @staticmethod
    def collect(doc: dict[str, Any], texts: list[str]) -> None:
        """Text of the answer (for counting when the upstream reports no usage)."""

    # -- errors ------------------------------------------------------------------------------------------

    @staticmethod
    def error_body(err: ProxyError) -> bytes:
        return jsonio.dumps({"error": err.message})

    @staticmethod
    def error_event(err: ProxyError) -> bytes:
        # Ollama's own mid-stream error (streamResponse): the ollama client raises ResponseError on it.
        return jsonio.dumps({"error": err.message}) + b"\n"

    # -- parsing -----------------------------------------------------------------------------------------

    def plan(self, body: dict[str, Any]) -> tuple[str, bool]:
        """(model, stream) after the checks every native body gets."""
        _go_keys(body, self.fields, "")
        if body.get("_debug_render_only"):
            # Ollama then answers the rendered prompt in an object that is never done: nothing to meter.
            raise InvalidRequest("_debug_render_only is not available through proxyd", param="_debug_render_only")
        options = body.get("options")
        if options is not None and not isinstance(options, dict):
            raise InvalidRequest("'options' must be an object", param="options")
        stream = body.get("stream")
        if stream is not None and not isinstance(stream, bool):
            raise InvalidRequest("'stream' must be a boolean", param="stream")
        return native_model(body), stream is not False


class NativeChat(NativeEndpoint):
    name = "api.chat"
    operation = "api.chat"
    fields = CHAT_FIELDS

    def parse(self, body: dict[str, Any]) -> tuple[str, bool, bool, int | None]:
        model, stream = self.plan(body)
        messages = body.get("messages")
        if messages is None:
            messages = body["messages"] = []
        if not isinstance(messages, list):
            raise InvalidRequest("'messages' must be an array", param="messages")
        for i, msg in enumerate(messages):
            _message(msg, f"messages[{i}].")
        tools = body.get("tools")
        if tools is not None and not isinstance(tools, list):
            raise InvalidRequest("'tools' must be an array", param="tools")
        return model, stream, False, requested_cap(body) if messages else 0

    async def estimate(self, body: dict[str, Any], model: str, call: Any) -> int:
        messages = body["messages"]
        if not messages:
            return 0
        images = await inline_images(call, [(f"messages[{i}].images", m.get("images")) for i, m in enumerate(messages)])
        call.sink.log_fields["images"] = images
        shadow = [_as_openai(m) for m in messages]
        prompt = await call.tokens.chat_prompt(model, shadow, body.get("tools"))
        return prompt + images * call.tokens.for_model(model).image_tokens

    @staticmethod
    def collect(doc: dict[str, Any], texts: list[str]) -> None:
        message = doc.get("message")
        if isinstance(message, dict):
            _collect(message.get("content"), message.get("thinking"), message.get("tool_calls"), texts)


class NativeGenerate(NativeEndpoint):
    name = "api.generate"
    operation = "api.generate"
    fields = GENERATE_FIELDS

    def parse(self, body: dict[str, Any]) -> tuple[str, bool, bool, int | None]:
        model, stream = self.plan(body)
        for name in ("prompt", "suffix", "system", "template"):
            if body.get(name) is not None and not isinstance(body[name], str):
                raise InvalidRequest(f"'{name}' must be a string", param=name)
        raw = body.get("raw")
        if raw is not None and not isinstance(raw, bool):
            raise InvalidRequest("'raw' must be a boolean", param="raw")
        context = body.get("context")
        if context is not None and not (isinstance(context, list) and all(_is_int(t) for t in context)):
            raise InvalidRequest("'context' must be an array of integers (token ids)", param="context")
        if raw and (body.get("template") or body.get("system") or context):
            raise InvalidRequest("raw mode does not support template, system, or context", param="raw")
        _images(body.get("images"), "images")
        return model, stream, False, requested_cap(body) if body.get("prompt") else 0

    async def estimate(self, body: dict[str, Any], model: str, call: Any) -> int:
        prompt = body.get("prompt") or ""
        if not prompt:
            return 0  # loads the model only: Ollama evaluates nothing
        images = await inline_images(call, [("images", body.get("images"))])
        call.sink.log_fields["images"] = images
        tokens = call.tokens
        suffix, system, template = body.get("suffix") or "", body.get("system") or "", body.get("template") or ""
        extra = len(body.get("context") or ()) + images * tokens.for_model(model).image_tokens
        if body.get("raw"):
            (n,) = await tokens.count_many(model, [prompt])
        elif template:
            n = sum(await tokens.count_many(model, [template, system, prompt, suffix]))
        elif suffix:
            n = await tokens.text_prompt(model, prompt, suffix)
        else:
            messages = [{"role": "system", "content": system}] if system else []
            n = await tokens.chat_prompt(model, [*messages, {"role": "user", "content": prompt}])
        return n + extra

    @staticmethod
    def collect(doc: dict[str, Any], texts: list[str]) -> None:
        _collect(doc.get("response"), doc.get("thinking"), doc.get("tool_calls"), texts)


class NativeEmbed(NativeEndpoint):
    name = "api.embed"
    operation = "api.embed"
    reserves_completion = False
    fields = EMBED_FIELDS

    def parse(self, body: dict[str, Any]) -> tuple[str, bool, bool, int | None]:
        _go_keys(body, self.fields, "")
        raw = body.get("input")
        if not (raw is None or isinstance(raw, str) or (isinstance(raw, list) and all(isinstance(x, str) for x in raw))):
            raise InvalidRequest("'input' must be a string or an array of strings", param="input")
        return native_model(body), False, False, None

    async def estimate(self, body: dict[str, Any], model: str, call: Any) -> int:
        raw = body.get("input")
        inputs = [raw] if isinstance(raw, str) else raw or []
        return await call.tokens.embedding_input(model, inputs) if inputs else 0

    def forward_body(self, body: dict[str, Any], completion_tokens: int, stream: bool) -> dict[str, Any]:
        body.pop("keep_alive", None)
        return body

    def answer(self, raw: bytes, call: Any) -> bytes:
        doc = upstream_object(raw)
        count = doc.get("prompt_eval_count")
        if _is_int(count):
            call.usage = {"prompt_tokens": count, "completion_tokens": 0}
        elif not doc.get("embeddings"):
            call.usage = {"prompt_tokens": 0, "completion_tokens": 0}  # no input: nothing evaluated
        return raw


class NativeEmbeddings(NativeEmbed):
    """The older /api/embeddings: one ``prompt``, and no count in the answer: billed as counted (the
    estimate is the prompt's count, with the model's tokenizer)."""

    name = "api.embeddings"
    operation = "api.embeddings"
    fields = EMBEDDINGS_FIELDS

    def parse(self, body: dict[str, Any]) -> tuple[str, bool, bool, int | None]:
        _go_keys(body, self.fields, "")
        if body.get("prompt") is not None and not isinstance(body["prompt"], str):
            raise InvalidRequest("'prompt' must be a string", param="prompt")
        return native_model(body), False, False, None

    async def estimate(self, body: dict[str, Any], model: str, call: Any) -> int:
        prompt = body.get("prompt") or ""
        return (await call.tokens.count_many(model, [prompt]))[0] if prompt else 0

    def answer(self, raw: bytes, call: Any) -> bytes:
        doc = upstream_object(raw)
        if not doc.get("embedding"):
            call.usage = {"prompt_tokens": 0, "completion_tokens": 0}  # an empty prompt loads the model only
        return raw


# -- helpers ------------------------------------------------------------------------------------------


def native_model(body: dict[str, Any]) -> str:
    """The canonical model name (metered, limited and priced under it), or Ollama's 400."""
    model = body.get("model")
    if model is None or model == "":
        raise InvalidRequest("model is required", param="model")
    if not isinstance(model, str):
        raise InvalidRequest("'model' must be a string", param="model")
    if len(model) > MAX_MODEL_CHARS:
        raise InvalidRequest(f"'model' is too long (at most {MAX_MODEL_CHARS} characters)", param="model")
    name = canonical(model)
    if not name:
        raise InvalidRequest(f"invalid model name {model!r}: {why_invalid(model)}", param="model")
    return name


def requested_cap(body: dict[str, Any]) -> int | None:
    """The client's options.num_predict, as Ollama's Options.FromMap reads it (a JSON number, cut to an
    integer); 0, -1 (no limit) and -2 (fill the context) ask for no cap."""
    options = body.get("options")
    value = options.get("num_predict") if options else None
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequest('option "num_predict" must be of type integer', param="options.num_predict")
    if value != value or value in (float("inf"), float("-inf")):
        raise InvalidRequest('option "num_predict" must be a finite number', param="options.num_predict")
    cap = int(value)
    if cap > MAX_TOKENS_CAP:
        raise InvalidRequest(f"options.num_predict must be at most {MAX_TOKENS_CAP}", param="options.num_predict")
    return cap if cap > 0 else None


def reported_usage(doc: dict[str, Any]) -> dict[str, int] | None:
    """The usage of a final (done) object. Ollama leaves a zero count out (omitempty), so one count
    present means the other is 0; none present is no report, unless nothing was evaluated."""
    prompt, completion = doc.get("prompt_eval_count"), doc.get("eval_count")
    if _is_int(prompt) or _is_int(completion):
        return {"prompt_tokens": prompt if _is_int(prompt) else 0,
                "completion_tokens": completion if _is_int(completion) else 0}
    if doc.get("done_reason") in _NOTHING_EVALUATED:
        return {"prompt_tokens": 0, "completion_tokens": 0}
    return None


async def inline_images(call: Any, holders: list[tuple[str, Any]]) -> int:
    """Each base64 image through the image pipeline (the size limits, the check that it is an image,
    the decode budgets, GIF/BMP/TIFF to PNG, downscaling), written back as base64. Returns the count."""
    slots = []
    for where, images in holders:
        for j, image in enumerate(images or ()):
            holder = {"url": "data:;base64," + image}
            slots.append((images, j, ImagePart(f"{where}[{j}]", holder, "url", holder["url"])))
    if not slots:
        return 0
    try:
        await call.backend.images.inline([], [part for _, _, part in slots])
    except (InvalidRequest, PayloadTooLarge) as exc:
        # The image pipeline speaks of chat's image_url parts and data URLs; these are base64 strings.
        exc.message = exc.message.replace("image_url in ", "image in ").replace("image_url parts", "images")
        exc.message = exc.message.replace("the data URL's payload", "the image").replace("the data URL", "the image")
        if exc.param:
            exc.param = exc.param.removesuffix(".image_url")
        raise
    for images, j, part in slots:
        images[j] = part.holder["url"].partition(",")[2]
    return len(slots)


def _images(images: Any, where: str) -> None:
    if images is not None and not (isinstance(images, list) and all(isinstance(x, str) for x in images)):
        raise InvalidRequest(f"{where} must be an array of base64 strings", param=where)


def _message(msg: Any, where: str) -> None:
    if not isinstance(msg, dict):
        raise InvalidRequest(f"{where[:-1]} must be an object", param=where[:-1])
    _go_keys(msg, MESSAGE_FIELDS, where)
    if not isinstance(msg.get("role"), str):
        raise InvalidRequest(f"{where}role must be a string", param=f"{where}role")
    for name in ("content", "thinking", "tool_name", "tool_call_id"):
        if msg.get(name) is not None and not isinstance(msg[name], str):
            raise InvalidRequest(f"{where}{name} must be a string", param=f"{where}{name}")
    _images(msg.get("images"), f"{where}images")
    calls = msg.get("tool_calls")
    if calls is None:
        return
    if not isinstance(calls, list) or not all(
        isinstance(c, dict) and isinstance(c.get("function"), dict)
        and isinstance(c["function"].get("name", ""), str)
        and isinstance(c["function"].get("arguments") or {}, dict) for c in calls
    ):
        raise InvalidRequest(f"{where}tool_calls must be an array of {{function: {{name, arguments: {{...}}}}}} objects",
                             param=f"{where}tool_calls")


def _as_openai(msg: dict[str, Any]) -> dict[str, Any]:
    """A native message in the shape the chat estimate reads (proxyd/tokens.py chat_prompt): the role
    lowercased as Ollama's Message.UnmarshalJSON does, thinking as reasoning, tool_name as the name,
    tool call arguments as a JSON string (the estimate re-writes them as Go does)."""
    out: dict[str, Any] = {"role": msg["role"].lower(), "content": msg.get("content") or ""}
    if msg.get("thinking"):
        out["reasoning"] = msg["thinking"]
    if msg.get("tool_name"):
        out["name"] = msg["tool_name"]
    if msg.get("tool_call_id"):
        out["tool_call_id"] = msg["tool_call_id"]
    if msg.get("tool_calls"):
        out["tool_calls"] = [{"function": {"name": c["function"].get("name", ""),
                                           "arguments": jsonio.dumps(c["function"].get("arguments") or {}).decode()}}
                             for c in msg["tool_calls"]]
    return out


def _collect(content: Any, thinking: Any, tool_calls: Any, texts: list[str]) -> None:
    if isinstance(content, str) and content:
        texts.append(content)
    if isinstance(thinking, str) and thinking:
        texts.append(thinking)
    for call in tool_calls if isinstance(tool_calls, list) else ():
        fn = call.get("function") if isinstance(call, dict) else None
        if isinstance(fn, dict):
            texts.append(str(fn.get("name") or "") + jsonio.dumps(fn.get("arguments") or {}).decode())


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)

