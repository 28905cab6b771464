"""OpenAI's Responses API (POST /v1/responses), as Ollama serves it (openai/responses.go, since v0.13.3).

Ollama turns a Responses request into a chat request (``FromResponsesRequest``: instructions become a
system message, each input item a message, function calls assistant tool calls, function outputs tool
messages) and its chat answer back into Responses events. proxyd estimates the prompt the same way: it
builds the chat messages Ollama builds and counts them with the chat template counter, and inlines the
images of ``input_image`` parts with the chat endpoint's SSRF-safe fetcher (Ollama itself takes only
data URLs).

The stream has no ``[DONE]`` line: it ends with ``response.completed`` (or ``response.incomplete`` /
``response.failed``), whose ``response.usage`` is the report. That event is withheld by ``relay_event``
and sent by ``stream_end`` after the settle (durable before the last byte), carrying the billed usage
when the upstream sent none.

Ollama keeps no responses: ``previous_response_id``, ``conversation`` and ``background`` (all of which
need a stored response) are refused with a 400; ``store: true`` is accepted and answered with the
response object's ``"store": false`` (docs/DESIGN.md, the section on issue #14, says why).
"""

from __future__ import annotations

import re
import time
from typing import Any

from .. import jsonio
from ..errors import InvalidRequest, UpstreamError, UpstreamUnavailable
from ..upstream import without_addresses
from ..validate import _flag, _go_keys, _model, _positive_int
from . import upstream_object
from .openai import OpenAIEndpoint

# The fields of Ollama's ResponsesRequest (openai/responses.go). Go matches keys case-insensitively, so
# a key that folds onto one of these ("MAX_OUTPUT_TOKENS") would be read by Ollama and not by proxyd:
# refused, as for chat (validate._go_keys). Keys that are no field (store, metadata, tool_choice, ...)
# are ignored by Ollama.
REQUEST_FIELDS = frozenset({
    "model", "background", "conversation", "include", "input", "instructions", "max_output_tokens",
    "reasoning", "temperature", "text", "top_p", "truncation", "tools", "stream",
})
MESSAGE_FIELDS = frozenset({"type", "role", "content"})
FUNCTION_CALL_FIELDS = frozenset({"id", "type", "call_id", "name", "arguments"})
FUNCTION_OUTPUT_FIELDS = frozenset({"type", "call_id", "output"})
REASONING_FIELDS = frozenset({"id", "type", "summary", "encrypted_content"})
PART_FIELDS = {
    "input_text": frozenset({"type", "text"}),
    "output_text": frozenset({"type", "text"}),
    "input_image": frozenset({"type", "detail", "file_id", "image_url"}),
}
TOOL_FIELDS = frozenset({"type", "name", "description", "strict", "parameters", "tools"})
# A web_search tool makes Ollama search the web through ollama.com and call the model again with the
# results (middleware/openai.go WebSearchResponsesWriter): calls proxyd can neither see nor meter.
TOOL_TYPES = ("function", "namespace")

# Fields whose type Ollama's decoder checks (a 400 from Ollama after a reservation, were they sent on).
_TYPES = (
    ("instructions", lambda v: isinstance(v, str), "a string"),
    ("temperature", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    ("top_p", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    ("truncation", lambda v: isinstance(v, str), "a string"),
    ("reasoning", lambda v: isinstance(v, dict), "an object"),
    ("text", lambda v: isinstance(v, dict), "an object"),
    ("include", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "an array of strings"),
    ("store", lambda v: isinstance(v, bool), "a boolean"),
)
# openai/openai.go thinkFromReasoningEffort: anything else is Ollama's 400.
_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "ultra", "max")

TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})
_DELTA = "response.output_text.delta"
_DELTA_FRAME = b"event: " + _DELTA.encode() + b"\ndata: "
# Events whose ``delta`` is model output (counted when the upstream reports no usage).
_TEXT_DELTAS = frozenset({
    _DELTA, "response.function_call_arguments.delta", "response.reasoning_summary_text.delta",
    "response.reasoning_text.delta", "response.refusal.delta",
})
_FRAMES: dict[str, bytes] = {}  # event type -> its "event: ...\ndata: " prefix
_CHAT_WHERE = re.compile(r"messages\[(\d+)\]\.content\[(\d+)\]")


class Responses(OpenAIEndpoint):
    name = "responses"
    operation = "responses"
    id_prefix = "resp_"

    @staticmethod
    def parse(body: dict[str, Any]) -> tuple[str, bool, bool, int | None]:
        """-> (model, stream, include_usage: always False, the client's max_output_tokens). The input
        items are checked by ``estimate`` (still before anything is reserved), which converts them."""
        _go_keys(body, REQUEST_FIELDS, "")
        model = _model(body)
        for name, what in (("previous_response_id", "continue a stored response"),
                           ("conversation", "continue a stored conversation"),
                           ("background", "run a response in the background for fetching later")):
            if body.get(name) not in (None, False, ""):
                raise InvalidRequest(f"'{name}' is not supported: Ollama keeps no responses, so it cannot {what}. "
                                     "Send the whole conversation in 'input' instead.", param=name)
        inp = body.get("input")
        if not (isinstance(inp, str) and inp) and not (isinstance(inp, list) and inp):
            raise InvalidRequest("'input' must be a non-empty string or a non-empty array of input items",
                                 param="input")
        for name, ok, what in _TYPES:
            value = body.get(name)
            if value is not None and not ok(value):
                raise InvalidRequest(f"'{name}' must be {what}", param=name)
        effort = (body.get("reasoning") or {}).get("effort")
        if effort not in (None, "") and effort not in _EFFORTS:  # "": Ollama's "not set"
            raise InvalidRequest(f"'reasoning.effort' must be one of {', '.join(_EFFORTS)}", param="reasoning.effort")
        return model, _flag(body, "stream"), False, _positive_int(body, "max_output_tokens")

    async def estimate(self, body: dict[str, Any], model: str, call: Any) -> int:
        messages, tools, images = chat_view(body)
        if images:
            try:
                call.sink.log_fields["images"] = await call.backend.images.inline(messages)
            except InvalidRequest as err:
                raise _renamed(err, images) from None
            for part, chat_part, _, _ in images:
                part["image_url"] = chat_part["image_url"]  # inlined: what Ollama gets
        return await call.tokens.chat_prompt(model, messages, tools)

    def forward_body(self, body: dict[str, Any], completion_tokens: int, stream: bool) -> dict[str, Any]:
        """max_output_tokens = the reserved budget (Ollama's num_predict), so the reservation stays an
        upper bound."""
        body["max_output_tokens"] = completion_tokens
        return body

    # -- the answer ------------------------------------------------------------------------------------

    def answer(self, raw: bytes, call: Any) -> bytes:
        doc = upstream_object(raw)
        call.usage = _usage(doc.get("usage"))
        output = doc.get("output")
        if isinstance(output, list):
            for item in output:
                _item_text(item, call.texts)
        _our_ids(doc, call.our_id.decode())
        return jsonio.dumps(doc)

    def relay_event(self, data: bytes, call: Any) -> bytes | None:
        try:
            doc = jsonio.loads(data)
        except ValueError:
            raise UpstreamUnavailable("Upstream sent an event that is not valid JSON.") from None
        if not isinstance(doc, dict):
            raise UpstreamUnavailable("Upstream sent an event that is not a JSON object.")
        kind = doc.get("type")
        if kind == _DELTA:  # nearly every event: relayed as it came
            delta = doc.get("delta")
            if isinstance(delta, str) and delta:
                call.texts.append(delta)
            return _DELTA_FRAME + data + b"\n\n"
        if kind == "error" or "error" in doc:
            err = doc.get("error", doc)
            message = str(err.get("message") if isinstance(err, dict) else err)
            raise UpstreamError(f"Upstream error mid-stream: {without_addresses(message)}", status=502, detail=message)
        if not isinstance(kind, str) or not kind.isprintable():  # no event line a client could misread
            raise UpstreamUnavailable("Upstream sent an event without a valid type.")
        response = doc.get("response")
        if kind in TERMINAL:
            # Withheld: sent by stream_end once the usage it reports is settled.
            call.upstream_done = True
            call.usage = _usage(response.get("usage")) if isinstance(response, dict) else None
            call.last_event = doc
            return None
        if isinstance(response, dict):  # response.created, response.in_progress: the response's id
            response["id"] = call.our_id.decode()
            if call.last_event is None:
                call.last_event = doc
            return _frame(kind) + jsonio.dumps(doc) + b"\n\n"
        if kind in _TEXT_DELTAS:
            delta = doc.get("delta")
            if isinstance(delta, str) and delta:
                call.texts.append(delta)
        elif kind == "response.output_item.added":
            item = doc.get("item")
            if isinstance(item, dict) and item.get("type") == "function_call" and isinstance(item.get("name"), str):
                call.texts.append(item["name"])
        return _frame(kind) + data + b"\n\n"

    def stream_end(self, call: Any, usage: Any) -> bytes:
        doc = call.last_event
        if doc is None or doc.get("type") not in TERMINAL:
            # The upstream ended with [DONE] but no terminal event (not Ollama): the client still gets
            # one, built from the response object the stream started with.
            start = doc.get("response") if isinstance(doc, dict) else None
            response = dict(start) if isinstance(start, dict) else {
                "object": "response", "created_at": int(time.time()), "model": call.body.get("model", "")}
            response.update(status="completed", output=response.get("output") or [])
            doc = {"type": "response.completed", "response": response}
        response = doc["response"] if isinstance(doc.get("response"), dict) else {}
        doc["response"] = response
        response["id"] = call.our_id.decode()
        if call.usage is None:
            # No usage came: OpenAI always reports it, so the client gets what proxyd billed.
            response["usage"] = {
                "input_tokens": usage.prompt_tokens, "output_tokens": usage.completion_tokens,
                "total_tokens": usage.prompt_tokens + usage.completion_tokens,
                "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0},
            }
        return _frame(doc["type"]) + jsonio.dumps(doc) + b"\n\n"


def _frame(kind: str) -> bytes:
    frame = _FRAMES.get(kind)
    if frame is None:
        frame = b"event: " + kind.encode() + b"\ndata: "
        if len(_FRAMES) < 256:  # the event types are a short fixed list; an odd upstream cannot grow it
            _FRAMES[kind] = frame
    return frame


def _usage(usage: Any) -> dict[str, int] | None:
    """Responses' usage as the pipeline's (prompt_tokens, completion_tokens); None if not a report."""
    if not isinstance(usage, dict):
        return None
    inp, out = usage.get("input_tokens"), usage.get("output_tokens")
    if type(inp) is not int or type(out) is not int:
        return None
    return {"prompt_tokens": inp, "completion_tokens": out}


def _item_text(item: Any, texts: list[str]) -> None:
    """An output item's model text: message parts, a function call's name and arguments, reasoning."""
    if not isinstance(item, dict):
        return
    kind = item.get("type")
    if kind == "message":
        for part in item.get("content") or ():
            if isinstance(part, dict):
                text = part.get("text") if part.get("type") == "output_text" else part.get("refusal")
                if isinstance(text, str) and text:
                    texts.append(text)
    elif kind == "function_call":
        texts.append(str(item.get("name") or "") + str(item.get("arguments") or ""))
    elif kind == "reasoning":
        for part in item.get("summary") or ():
            if isinstance(part, dict) and isinstance(part.get("text"), str) and part["text"]:
                texts.append(part["text"])


def _our_ids(doc: dict[str, Any], our_id: str) -> None:
    """proxyd's id on the response, and on the output items Ollama names after its own response id
    (``fc_<resp>_<n>``, ``rs_<resp>``): Ollama's ids are random numbers below a million, so they repeat."""
    upstream = doc.get("id")
    doc["id"] = our_id
    if not isinstance(upstream, str) or not upstream:
        return
    for item in doc.get("output") or ():
        if isinstance(item, dict) and isinstance(item.get("id"), str) and upstream in item["id"]:
            item["id"] = item["id"].replace(upstream, our_id)


# -- the chat request Ollama builds (FromResponsesRequest), for the estimate -------------------------


def chat_view(body: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None, list]:
    """The chat messages and tools Ollama builds from a Responses body, in the chat endpoint's shape (so
    the chat template counter and the image inliner take them as they are), and the image links:
    (the Responses part, its chat part, where in the input). Raises InvalidRequest where Ollama would
    refuse the body (400) or where proxyd could not meter it."""
    messages: list[dict[str, Any]] = []
    images: list = []
    instructions = body.get("instructions")
    if instructions:
        messages.append({"role": "system", "content": instructions})
    inp = body["input"]
    if isinstance(inp, str):
        messages.append({"role": "user", "content": inp})
    else:
        thinking = ""  # a reasoning item's text goes with the next assistant message
        for i, item in enumerate(inp):
            where = f"input[{i}]"
            if not isinstance(item, dict):
                raise InvalidRequest(f"{where} must be an object", param=where)
            kind = item.get("type")
            if kind is None and isinstance(item.get("role"), str):
                kind = "message"  # the shorthand {"role": ..., "content": ...}
            if kind == "message":
                msg = _message(item, where, len(messages), images)
                if msg["role"] == "assistant" and thinking:
                    msg["reasoning"], thinking = thinking, ""
                messages.append(msg)
            elif kind == "function_call":
                _go_keys(item, FUNCTION_CALL_FIELDS, where + ".")
                for name in ("call_id", "name", "arguments"):
                    _str_field(item, name, where)
                args = item.get("arguments") or ""
                if args:
                    try:
                        parsed = jsonio.loads(args)
                    except ValueError:
                        parsed = None
                    if not isinstance(parsed, dict):
                        raise InvalidRequest(f"{where}.arguments must be a JSON object in a string",
                                             param=f"{where}.arguments")
                call = {"id": item.get("call_id") or "", "type": "function",
                        "function": {"name": item.get("name") or "", "arguments": args or "{}"}}
                last = messages[-1] if messages else None
                if last is not None and last["role"] == "assistant":
                    last.setdefault("tool_calls", []).append(call)
                    if thinking:
                        last["reasoning"], thinking = thinking, ""
                else:
                    msg = {"role": "assistant", "content": None, "tool_calls": [call]}
                    if thinking:
                        msg["reasoning"], thinking = thinking, ""
                    messages.append(msg)
            elif kind == "function_call_output":
                _go_keys(item, FUNCTION_OUTPUT_FIELDS, where + ".")
                _str_field(item, "call_id", where)
                output = item.get("output")
                msg: dict[str, Any] = {"role": "tool", "tool_call_id": item.get("call_id") or ""}
                if isinstance(output, list):
                    msg["content"] = _content(output, f"{where}.output", len(messages), images)
                elif output is None or isinstance(output, str):
                    msg["content"] = output or ""
                else:
                    raise InvalidRequest(f"{where}.output must be a string or an array of content parts",
                                         param=f"{where}.output")
                messages.append(msg)
            elif kind == "reasoning":
                _go_keys(item, REASONING_FIELDS, where + ".")
                _str_field(item, "encrypted_content", where)
                thinking = item.get("encrypted_content") or ""
            elif kind == "web_search_call":
                pass  # history metadata: nothing of it reaches the model
            else:
                if not isinstance(kind, str):
                    raise InvalidRequest(f"{where} needs a 'type'", param=f"{where}.type")
                raise InvalidRequest(f"{where}: unsupported input item type '{kind}'", param=f"{where}.type")
        if thinking:
            messages.append({"role": "assistant", "content": "", "reasoning": thinking})
    if not messages:
        raise InvalidRequest("the request has no input to answer", param="input")
    return messages, _tools(body.get("tools")), images


def _str_field(obj: dict[str, Any], name: str, where: str) -> None:
    if obj.get(name) is not None and not isinstance(obj[name], str):
        raise InvalidRequest(f"{where}.{name} must be a string", param=f"{where}.{name}")


def _message(item: dict[str, Any], where: str, index: int, images: list) -> dict[str, Any]:
    _go_keys(item, MESSAGE_FIELDS, where + ".")
    role = item.get("role")
    if not isinstance(role, str) or not role:
        raise InvalidRequest(f"{where}.role must be a non-empty string", param=f"{where}.role")
    content = item.get("content")
    if content is None or isinstance(content, str):
        return {"role": role, "content": content or ""}
    if not isinstance(content, list):
        raise InvalidRequest(f"{where}.content must be a string or an array of content parts",
                             param=f"{where}.content")
    return {"role": role, "content": _content(content, f"{where}.content", index, images)}


def _content(parts: list, where: str, index: int, images: list) -> Any:
    """Content parts as Ollama joins them (texts concatenated, images attached), in chat shape: a string,
    or [text, image_url...] when there are images (``index``: the chat message's, for the inliner)."""
    texts: list[str] = []
    chat_images: list[tuple[dict, dict, str]] = []
    for j, part in enumerate(parts):
        at = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        fields = PART_FIELDS.get(kind) if isinstance(kind, str) else None
        if fields is None:
            if kind == "input_file":
                raise InvalidRequest(f"{at}: file inputs are not supported by Ollama", param=f"{at}.type")
            raise InvalidRequest(f"{at} must be a content part of type input_text, input_image or output_text",
                                 param=f"{at}.type")
        _go_keys(part, fields, at + ".")
        if kind == "input_image":
            url = part.get("image_url")
            if url is None or url == "":
                if part.get("file_id"):
                    raise InvalidRequest(f"{at}: file_id images are not supported (Ollama stores no files); "
                                         "send image_url", param=f"{at}.file_id")
                continue  # Ollama skips an image part without a URL
            if not isinstance(url, str):
                raise InvalidRequest(f"{at}.image_url must be a string", param=f"{at}.image_url")
            chat_images.append((part, {"type": "image_url", "image_url": url}, at))
        else:
            text = part.get("text")
            if not isinstance(text, str):
                raise InvalidRequest(f"{at}.text must be a string", param=f"{at}.text")
            texts.append(text)
    text = "".join(texts)
    if not chat_images:
        return text
    first = 1 if text else 0
    for k, (part, chat_part, at) in enumerate(chat_images):
        images.append((part, chat_part, at, f"messages[{index}].content[{first + k}]"))
    return ([{"type": "text", "text": text}] if text else []) + [chat for _, chat, _ in chat_images]


def _renamed(err: InvalidRequest, images: list) -> InvalidRequest:
    """The inliner's error, naming the image where the client put it (input[2].content[1]) rather than
    where the chat view has it (messages[3].content[1])."""
    names = {chat_where: at for _, _, at, chat_where in images}

    def swap(text: str | None) -> str | None:
        return _CHAT_WHERE.sub(lambda m: names.get(m.group(0), m.group(0)), text) if text else text

    err.message = swap(err.message) or err.message
    err.args = (err.message,)
    param = swap(err.param)
    err.param = "input" if param == "messages" else param
    return err


def _tools(tools: Any) -> list[dict[str, Any]] | None:
    """Responses tools as the chat tools Ollama hands the template (namespaces expanded)."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise InvalidRequest("'tools' must be an array", param="tools")
    out: list[dict[str, Any]] = []
    for i, tool in enumerate(tools):
        _tool(tool, f"tools[{i}]", "", out)
    return out


def _tool(tool: Any, where: str, prefix: str, out: list) -> None:
    if not isinstance(tool, dict):
        raise InvalidRequest(f"{where} must be an object", param=where)
    _go_keys(tool, TOOL_FIELDS, where + ".")
    kind = tool.get("type")
    if kind not in TOOL_TYPES:
        raise InvalidRequest(f"{where}: tool type {kind!r} is not supported (only 'function' and 'namespace')",
                             param=f"{where}.type")
    for name in ("name", "description"):
        _str_field(tool, name, where)
    name = tool.get("name") or ""
    if kind == "namespace":
        members = tool.get("tools")
        if not isinstance(members, list):
            raise InvalidRequest(f"{where}.tools must be an array", param=f"{where}.tools")
        for j, member in enumerate(members):
            _tool(member, f"{where}.tools[{j}]", prefix + name + "." if name else prefix, out)
        return
    params = tool.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise InvalidRequest(f"{where}.parameters must be an object", param=f"{where}.parameters")
    full = name if not prefix or name.startswith(prefix) else prefix + name
    out.append({"type": "function", "function": {"name": full, "description": tool.get("description") or "",
                                                  "parameters": params or {}}})
