"""Ollama's native API (/api/chat, /api/generate, /api/embed, /api/embeddings, /api/tags, /api/show,
/api/ps), from ollama/ollama at fb30760 (v0.33.0-rc2): api/types.go (ChatRequest, GenerateRequest,
ChatResponse, GenerateResponse, Metrics, EmbedResponse) and server/routes.go (the handlers, their
error texts and statuses, streamResponse, writeChatResponse).

What differs from the OpenAI-compatible routes:

- ``stream`` defaults to true (``*bool``, nil = stream); a stream is NDJSON (``application/x-ndjson``),
  one Go-encoded object a line, no [DONE]: the last object has ``done: true``, ``done_reason`` and the
  metrics (durations in nanoseconds, ``prompt_eval_count``, ``eval_count``; all omitempty, so absent
  when 0). A non-stream answer is that last object with the whole text, as ``c.JSON`` writes it
  (``application/json; charset=utf-8``, no trailing newline).
- Errors are ``{"error": "..."}``; one after the stream started is such a line (streamResponse).
- ``created_at`` is Go's time.Time in JSON: RFC 3339 with up to nine fraction digits, trailing zeros cut.
- Images are base64 strings in ``images`` (a message's, or the request's for /api/generate).
- An empty ``messages`` / ``prompt`` only loads the model: one object, ``done_reason: "load"``, no
  metrics, written by ``c.JSON`` even when a stream was asked for.

The faults are the OpenAI routes' (faults.py): ``no_usage`` drops the counts from the final object,
stream or not (an upstream that reports none); ``cut_after``/``stall_after`` count content lines.
Management routes (pull, push, create, delete, copy, blobs) are not emulated: proxyd refuses them.
"""

from __future__ import annotations

import base64
import hashlib
import random
import re
import time
from typing import Any

from . import names
from .faults import Fault, pad_bytes, steer
from .handlers import BaseHandler, InferenceHandler
from .jobs import looks_like_image
from .replies import embedding_vector, plan_reply
from .templates import Message, collate, template_for, tool_json
from .wire import (
    CONTENT,
    FINISH,
    MODEL_CREATED,
    NO_VISION,
    NOT_AN_IMAGE,
    OllamaError,
    go_json,
    go_kind,
    is_int,
    marshal,
    sorted_maps,
)

NDJSON = "application/x-ndjson"
GIN_JSON = "application/json; charset=utf-8"
_GO_TEMPLATE_VALUE = re.compile(r"\{\{-?\s*\.(System|Prompt|Response|Suffix)\s*-?\}\}")


def created_at(ns: int | None = None) -> str:
    """time.Time's MarshalJSON (RFC3339Nano in UTC): fraction digits without trailing zeros."""
    ns = time.time_ns() if ns is None else ns
    seconds, frac = divmod(ns, 1_000_000_000)
    text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    if frac:
        text += "." + f"{frac:09d}".rstrip("0")
    return text + "Z"


def metrics(prompt: int, completion: int, started_ns: int) -> dict[str, int]:
    """api.Metrics in field order, omitempty: zero counts are left out."""
    total = max(time.time_ns() - started_ns, 1)
    out = {"total_duration": total, "load_duration": max(total // 10, 1)}
    if prompt:
        out["prompt_eval_count"] = prompt
    out["prompt_eval_duration"] = max(total // 5, 1)
    if completion:
        out["eval_count"] = completion
    out["eval_duration"] = max(total // 2, 1)
    return out


class NativeHandler(InferenceHandler):
    """Native errors ({"error"}), gin's binding errors, the default stream, and NDJSON."""

    stream_content_type = NDJSON

    async def post(self) -> None:
        fault = self.state.take_fault()
        try:
            if self.body_error is not None:
                raise OllamaError(400, "missing request body" if self.body_error == "EOF" else self.body_error)
            if self.body_json is not None and not isinstance(self.body_json, dict):
                raise OllamaError(400, f"json: cannot unmarshal {go_kind(self.body_json)} into Go value of type api.{self.struct}")
            self.body_json = self.body_json or {}
            await self.serve(fault)
        except OllamaError as err:
            self.write_ollama_error(err)

    struct = ""

    def write_ollama_error(self, err: OllamaError) -> None:
        self.set_status(err.status)
        self.set_header("Content-Type", GIN_JSON)
        self.finish(go_json({"error": err.message}))

    def streams(self) -> bool:
        value = self.body_json.get("stream")
        return value is None or bool(value)

    def usage_dropped(self, fault: Fault | None) -> bool:
        return (fault is not None and fault.name == "no_usage") or (self.streams() and not self.state.options.send_usage)

    def load_answer(self, body: dict) -> None:
        """An empty request loads the model: one object, as c.JSON writes it, also for a stream."""
        self.set_header("Content-Type", GIN_JSON)
        self.finish(go_json(body))
        self.state.completed += 1

    async def generate(self, fault: Fault | None, words: list, final: dict, piece, started: int) -> None:
        """Streams ``piece(word)`` lines then ``final``, or answers ``final`` holding the whole text.
        Timestamps and durations are taken as each line goes out."""
        if self.streams():
            await self.run_stream(self._lines(words, final, piece, started), fault)
            return
        self._finalize(final, started)
        opts = self.state.options
        await self.answer_once(final, fault, opts.first_byte_delay_s + len(words) * opts.token_delay_s)

    def _lines(self, words: list, final: dict, piece, started: int):
        for word in words:
            yield CONTENT, go_json(piece(word)) + b"\n"
        self._finalize(final, started)
        yield FINISH, go_json(final) + b"\n"

    @staticmethod
    def _finalize(final: dict, started: int) -> None:
        final["created_at"] = created_at()
        counts = final.pop("counts", None)
        if counts is not None:
            final.update(metrics(*counts, started))

    def write_json(self, obj: Any, content_type: str = GIN_JSON) -> None:
        self.set_header("Content-Type", content_type)
        self.finish(go_json(obj))

    def check_images(self, model: str, images: list, where: str) -> int:
        """ImageData is []byte: each must be base64 (else the bind fails); the runner refuses what is
        not an image, a model without vision refuses any."""
        bad_image = False
        for item in images:
            if not isinstance(item, str):
                raise OllamaError(400, f"json: cannot unmarshal {go_kind(item)} into Go struct field {where} of type []uint8")
            try:
                data = base64.b64decode(item, validate=True)
            except ValueError:
                raise OllamaError(400, "illegal base64 data at input byte 0") from None
            bad_image = bad_image or not looks_like_image(data)
        if images and not names.find(model, self.state.options.vision_models):
            raise OllamaError(500, NO_VISION)
        if bad_image:
            raise OllamaError(500, NOT_AN_IMAGE)
        return len(images)


def _num_predict(body: dict) -> int | None:
    """options.num_predict as Options.FromMap reads it (a float is cut to an int); <= 0: no cap."""
    options = body.get("options")
    value = options.get("num_predict") if isinstance(options, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return int(value) if int(value) > 0 else None


def _steer_text(messages: list) -> str:
    users = [m for m in messages if isinstance(m, dict) and str(m.get("role", "")).lower() == "user"]
    content = users[-1].get("content") if users else ""
    return content if isinstance(content, str) else ""


def from_native(messages: list) -> list[Message]:
    """api.Message as the template sees it: the role lowercased (Message.UnmarshalJSON), tool call
    arguments as Go re-marshals a map (sorted keys, numbers as float64)."""
    out = []
    for m in messages:
        calls = []
        for call in m.get("tool_calls") or ():
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict):
                args = fn.get("arguments")
                calls.append((str(fn.get("name") or ""), marshal(sorted_maps(args)) if isinstance(args, dict) else "{}"))
        content = m.get("content") if isinstance(m.get("content"), str) else ""
        thinking = m.get("thinking") if isinstance(m.get("thinking"), str) else ""
        out.append(Message(str(m.get("role") or "").lower(), content, thinking, calls, len(m.get("images") or ())))
    return out


class NativeChatHandler(NativeHandler):
    struct = "ChatRequest"

    async def serve(self, queued: Fault | None) -> None:
        opts, body, started = self.state.options, self.body_json, time.time_ns()
        messages = body.get("messages") or []
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise OllamaError(400, "json: cannot unmarshal into Go struct field ChatRequest.messages of type []api.Message")
        for i, m in enumerate(messages):
            if m.get("content") is not None and not isinstance(m["content"], str):
                raise OllamaError(400, f"json: cannot unmarshal {go_kind(m['content'])} into Go struct field "
                                       "ChatRequest.messages.content of type string")
        requested = body.get("model") or ""
        if not requested or names.resolve(requested) is None:
            raise OllamaError(400, "model is required")
        model = names.find(requested, opts.models)
        if model is None:
            raise OllamaError(404, f"model '{requested}' not found")
        if names.find(model, opts.embedding_only_models):
            raise OllamaError(400, f'"{requested}" does not support chat')
        think = body.get("think")
        if think is True or (isinstance(think, str) and think not in ("", "false")):
            raise OllamaError(400, f'"{requested}" does not support thinking')
        natural, fault = steer(_steer_text(messages), queued)
        if not await self.before_answer(fault):
            return
        if not messages:
            return self.load_answer({"model": requested, "created_at": created_at(),
                                     "message": {"role": "assistant", "content": ""}, "done": True,
                                     "done_reason": "load"})
        images = sum(self.check_images(model, m.get("images") or [], "ChatRequest.messages.images") for m in messages)
        template = template_for(model)
        system, collated = collate(from_native(messages))
        tools = body.get("tools")
        text = template.render(system, collated, [tool_json(t) for t in tools] if isinstance(tools, list) else [])
        prompt = await self.state.tokens.prompt(template.vocab, text) + images * opts.image_tokens + opts.prompt_token_skew
        reply = plan_reply(natural, _num_predict(body), pad_bytes(fault))
        final = {"model": requested, "created_at": created_at(), "message": {"role": "assistant", "content": ""},
                 "done": True, "done_reason": reply.finish_reason}
        if not self.streams():
            final["message"]["content"] = reply.text
        if not self.usage_dropped(fault):
            final["counts"] = (prompt, reply.completion_tokens)  # the metrics, filled in as it is sent

        def piece(word: str) -> dict:
            return {"model": requested, "created_at": created_at(), "message": {"role": "assistant", "content": word},
                    "done": False}

        await self.generate(fault, reply.words, final, piece, started)


class NativeGenerateHandler(NativeHandler):
    struct = "GenerateRequest"

    async def serve(self, queued: Fault | None) -> None:
        opts, body, started = self.state.options, self.body_json, time.time_ns()
        for field in ("prompt", "suffix", "system", "template"):
            if body.get(field) is not None and not isinstance(body[field], str):
                raise OllamaError(400, f"json: cannot unmarshal {go_kind(body[field])} into Go struct field "
                                       f"GenerateRequest.{field} of type string")
        requested = body.get("model") or ""
        if names.resolve(requested) is None:
            raise OllamaError(404, f"model '{requested}' not found")
        model = names.find(requested, opts.models)
        if model is None:
            raise OllamaError(404, f"model '{requested}' not found")
        prompt_text, suffix = body.get("prompt") or "", body.get("suffix") or ""
        system, template_text = body.get("system") or "", body.get("template") or ""
        context = body.get("context") or []
        raw = bool(body.get("raw"))
        if raw and (template_text or system or context):
            raise OllamaError(400, "raw mode does not support template, system, or context")
        if names.find(model, opts.embedding_only_models):
            raise OllamaError(400, f'"{requested}" does not support generate')
        if suffix and not names.find(model, opts.insert_models):
            raise OllamaError(400, f"{_full_name(model)} does not support insert")
        natural, fault = steer(prompt_text, queued)
        if not await self.before_answer(fault):
            return
        if not prompt_text:
            return self.load_answer({"model": requested, "created_at": created_at(), "response": "", "done": True,
                                     "done_reason": "load"})
        images = self.check_images(model, body.get("images") or [], "GenerateRequest.images")
        template = template_for(model)
        if raw:
            text = prompt_text
        elif template_text:
            # A template of the request's own: its {{ .System }} / {{ .Prompt }} / ... filled in (the
            # emulator does not run Go templates; the other actions are left as written).
            values = {"System": system, "Prompt": prompt_text, "Response": "", "Suffix": suffix}
            text = _GO_TEMPLATE_VALUE.sub(lambda m: values[m.group(1)], template_text)
        elif suffix and template.fim is not None:
            text = template.fim(prompt_text, suffix)
        else:
            msgs = ([Message("system", system)] if system else []) + [Message("user", prompt_text, images=images)]
            text = template.render(*collate(msgs), [])
        prompt = await self.state.tokens.prompt(template.vocab, text) + len(context) + images * opts.image_tokens
        prompt += opts.prompt_token_skew
        reply = plan_reply(natural, _num_predict(body), pad_bytes(fault))
        final: dict[str, Any] = {"model": requested, "created_at": created_at(),
                                 "response": "" if self.streams() else reply.text, "done": True,
                                 "done_reason": reply.finish_reason}
        if not raw:
            # The conversation so far as token ids, for the (deprecated) context of the next request.
            final["context"] = [random.randrange(128_000) for _ in range(prompt + len(reply.words))]
        if not self.usage_dropped(fault):
            final["counts"] = (prompt, reply.completion_tokens)  # the metrics, filled in as it is sent

        def piece(word: str) -> dict:
            return {"model": requested, "created_at": created_at(), "response": word, "done": False}

        await self.generate(fault, reply.words, final, piece, started)


def _full_name(model: str) -> str:
    name = names.resolve(model)
    return f"{name.host}/{name.namespace}/{name.model}:{name.tag}" if name is not None else model


class NativeEmbedHandler(NativeHandler):
    struct = "EmbedRequest"

    async def serve(self, queued: Fault | None) -> None:
        opts, body, started = self.state.options, self.body_json, time.time_ns()
        requested = body.get("model") or ""
        if names.resolve(requested) is None:
            raise OllamaError(404, f"model '{requested}' not found")
        raw = body.get("input")
        if isinstance(raw, str):
            inputs = [raw] if raw else []
        elif isinstance(raw, list) and all(isinstance(x, str) for x in raw):
            inputs = raw
        elif raw is None:
            inputs = []
        else:
            raise OllamaError(400, "invalid input type")
        model = names.find(requested, opts.models)
        if model is None:
            raise OllamaError(404, f'model "{requested}" not found, try pulling it first')
        if not names.find(model, opts.embedding_models):
            raise OllamaError(400, f"{_full_name(model)} does not support embeddings")
        _, fault = steer(inputs[-1] if inputs else "", queued)
        if not await self.before_answer(fault):
            return
        if not inputs:
            self.write_json({"model": requested, "embeddings": []})
            return
        dims = opts.embedding_dims
        dimensions = body.get("dimensions")
        if is_int(dimensions) and 0 < dimensions < dims:
            dims = dimensions
        vectors = [embedding_vector(text, dims) for text in inputs]
        tokens = await self.state.tokens.texts(template_for(model).vocab, inputs) + opts.prompt_token_skew
        answer: dict[str, Any] = {"model": requested, "embeddings": vectors}
        total = max(time.time_ns() - started, 1)
        answer.update(total_duration=total, load_duration=max(total // 10, 1))
        if not (fault is not None and fault.name == "no_usage"):
            answer["prompt_eval_count"] = tokens
        await self.answer_once(answer, fault, opts.first_byte_delay_s)


class NativeEmbeddingsHandler(NativeHandler):
    """The older /api/embeddings: one prompt, one vector, no usage at all."""

    struct = "EmbeddingRequest"

    async def serve(self, queued: Fault | None) -> None:
        opts, body = self.state.options, self.body_json
        requested = body.get("model") or ""
        if not requested or names.resolve(requested) is None:
            raise OllamaError(400, "model is required")
        prompt = body.get("prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise OllamaError(400, f"json: cannot unmarshal {go_kind(prompt)} into Go struct field "
                                   "EmbeddingRequest.prompt of type string")
        model = names.find(requested, opts.models)
        if model is None:
            raise OllamaError(404, f'model "{requested}" not found, try pulling it first')
        _, fault = steer(prompt or "", queued)
        if not await self.before_answer(fault):
            return
        vector = embedding_vector(prompt, opts.embedding_dims) if prompt else []
        await self.answer_once({"embedding": vector}, fault, opts.first_byte_delay_s)


# -- the model routes ------------------------------------------------------------------------------


def _details(model: str) -> dict[str, Any]:
    family = "nomic-bert" if "embed" in model else "llama"
    return {"parent_model": "", "format": "gguf", "family": family, "families": [family],
            "parameter_size": "1.2B", "quantization_level": "Q8_0"}


def _modified_at() -> str:
    return created_at(MODEL_CREATED * 1_000_000_000)


class TagsHandler(BaseHandler):
    """GET/HEAD /api/tags: api.ListResponse."""

    def get(self) -> None:
        models = [{"name": names.listed_name(m), "model": names.listed_name(m), "modified_at": _modified_at(),
                   "size": 1_000_000_000, "digest": hashlib.sha256(m.encode()).hexdigest(),
                   "details": _details(m)} for m in self.state.options.models]
        self.set_header("Content-Type", GIN_JSON)
        self.finish(go_json({"models": models}))

    head = get


class PsHandler(BaseHandler):
    """GET /api/ps: api.ProcessResponse. The models a test says are in memory (``loaded_models``, for
    routing tests); none by default, as a freshly started Ollama."""

    def get(self) -> None:
        loaded = self.state.options.loaded_models or ()
        models = [{"name": names.listed_name(m), "model": names.listed_name(m), "size": 1_000_000_000,
                   "digest": hashlib.sha256(m.encode()).hexdigest(), "details": _details(m),
                   "expires_at": _modified_at(), "size_vram": 1_000_000_000} for m in loaded]
        self.set_header("Content-Type", GIN_JSON)
        self.finish(go_json({"models": models}))


class ShowHandler(BaseHandler):
    """POST /api/show: api.ShowResponse for an installed model."""

    def post(self) -> None:
        self.set_header("Content-Type", GIN_JSON)
        body = self.body_json if isinstance(self.body_json, dict) else {}
        error = None
        if self.body_error is not None:
            error = "missing request body" if self.body_error == "EOF" else self.body_error
        elif self.body_json is not None and not isinstance(self.body_json, dict):
            error = f"json: cannot unmarshal {go_kind(self.body_json)} into Go value of type api.ShowRequest"
        for field in ("model", "name", "system", "template"):
            if error is None and body.get(field) is not None and not isinstance(body[field], str):
                error = f"json: cannot unmarshal {go_kind(body[field])} into Go struct field ShowRequest.{field} of type string"
        requested = body.get("model") or body.get("name") or ""
        if error is not None or not requested:
            self.set_status(400)
            self.finish(go_json({"error": error or "model is required"}))
            return
        model = names.find(requested, self.state.options.models)
        if model is None:
            self.set_status(404)
            self.finish(go_json({"error": f"model '{requested}' not found"}))
            return
        caps = ["embedding"] if names.find(model, self.state.options.embedding_only_models) else ["completion"]
        if names.find(model, self.state.options.vision_models):
            caps.append("vision")
        self.finish(go_json({"modelfile": f"FROM {model}\n", "parameters": "", "template": "{{ .Prompt }}",
                             "details": _details(model), "model_info": {"general.architecture": "llama"},
                             "capabilities": caps, "modified_at": _modified_at()}))


ROUTES = [
    (r"/api/chat", NativeChatHandler),
    (r"/api/generate", NativeGenerateHandler),
    (r"/api/embed", NativeEmbedHandler),
    (r"/api/embeddings", NativeEmbeddingsHandler),
    (r"/api/tags", TagsHandler),
    (r"/api/show", ShowHandler),
    (r"/api/ps", PsHandler),
]
