"""POST /v1/responses, as Ollama serves it (openai/responses.go and middleware/openai.go ResponsesMiddleware
at ollama/ollama fb30760).

The middleware decodes a ResponsesRequest, turns it into a chat request (``FromResponsesRequest``:
instructions a system message, each input item a message, function calls assistant tool calls, function
outputs tool messages, reasoning items the next assistant message's Thinking), runs the chat handler
and converts its answer:

- not streamed: one response object (``ToResponse``, the struct's field order), ``status`` always
  "completed" (Ollama reports no incomplete responses, even when num_predict cut the answer), ``store``
  always false, ``usage`` {input_tokens, output_tokens, total_tokens, input_tokens_details
  {cached_tokens: 0}, output_tokens_details {reasoning_tokens: 0}};
- streamed (``ResponsesStreamConverter``): ``event: <type>\\ndata: <json>`` events, each JSON a Go map
  (keys sorted) with its ``type`` and a ``sequence_number`` from 0: response.created,
  response.in_progress, then for the text output_item.added, content_part.added, one
  output_text.delta per chunk, output_text.done, content_part.done, output_item.done, and
  response.completed carrying the usage. No ``[DONE]`` line.

Errors are the chat handler's, in OpenAI's envelope (writeError). Ids: ``resp_<n>`` and ``msg_<n>``
with n a random number below 1,000,000.

Faults as for chat (faults.py): each output_text.delta is a content chunk for cut_after / stall_after;
``no_usage`` (and the ``send_usage=False`` option) make the emulator an upstream that reports no usage:
``usage`` is null (Ollama itself always reports it).
"""

from __future__ import annotations

import json
import random
import time
from typing import Any

from . import names
from .faults import Fault, pad_bytes, steer
from .handlers import InferenceHandler
from .jobs import Job, decode_image_url, looks_like_image
from .replies import Reply, plan_reply
from .templates import Message, _arguments, collate, template_for, tool_json
from .tokenizer import IMAGE
from .wire import CONTENT, FINISH, OllamaError, bad, check_struct, go_json, go_kind, is_int, sorted_maps

REQUEST_FIELDS = {
    "model": (lambda v: isinstance(v, str), "string"),
    "background": (lambda v: isinstance(v, bool), "bool"),
    "include": (lambda v: isinstance(v, list), "[]string"),
    "instructions": (lambda v: isinstance(v, str), "string"),
    "max_output_tokens": (is_int, "int"),
    "reasoning": (lambda v: isinstance(v, dict), "openai.ResponsesReasoning"),
    "temperature": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "float64"),
    "text": (lambda v: isinstance(v, dict), "openai.ResponsesText"),
    "top_p": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "float64"),
    "truncation": (lambda v: isinstance(v, str), "string"),
    "tools": (lambda v: isinstance(v, list), "[]openai.ResponsesTool"),
    "stream": (lambda v: isinstance(v, bool), "bool"),
}
_EFFORTS = ("", "none", "minimal", "low", "medium", "high", "max", "xhigh", "ultra")


def _content(raw: Any, where: str) -> tuple[str, int, bool]:
    """convertResponsesContent: (the texts concatenated, images, whether one is not an image)."""
    if isinstance(raw, str):
        return raw, 0, False
    if raw is None:
        return "", 0, False
    if not isinstance(raw, list):
        raise bad(f"{where}: content must be a string or array: json: cannot unmarshal {go_kind(raw)} "
                  "into Go value of type []json.RawMessage")
    text, images, broken = "", 0, False
    for j, part in enumerate(raw):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text"):
            text += part.get("text") or ""
        elif kind == "input_image":
            url = part.get("image_url") or ""
            if url:
                data = decode_image_url(url)
                images += 1
                broken = broken or not looks_like_image(data)
        elif kind == "input_file":
            raise bad("file inputs are not currently supported")
        else:
            raise bad(f"{where}: content[{j}]: unknown content type: {kind if isinstance(kind, str) else ''}")
    return text, images, broken


def parse_responses(body: Any) -> tuple[Job, list[Message], list, dict]:
    """The Job, Ollama's chat messages, its tools (as chat tools, for the template) and the request."""
    body = check_struct(body, "ResponsesRequest", REQUEST_FIELDS)
    effort = (body.get("reasoning") or {}).get("effort") or ""
    messages: list[Message] = []
    job = Job(model=body.get("model") or "", stream=bool(body.get("stream")), include_usage=True,
              max_tokens=body.get("max_output_tokens"), steer_text="")
    if body.get("instructions"):
        messages.append(Message("system", body["instructions"]))
    raw = body.get("input")
    if isinstance(raw, str):
        if raw:
            messages.append(Message("user", raw))
    elif isinstance(raw, list):
        thinking = ""
        for i, item in enumerate(raw):
            where = f"input[{i}]"
            if not isinstance(item, dict):
                raise bad(f"{where}: json: cannot unmarshal {go_kind(item)} into Go value of type struct "
                          '{ Type string "json:\\"type\\""; Role string "json:\\"role\\"" }')
            kind = item.get("type") or ("message" if item.get("role") else "")
            if kind == "message":
                text, images, broken = _content(item.get("content"), where)
                job.images += images
                job.bad_image = job.bad_image or broken
                msg = Message(item.get("role") or "", text or (IMAGE if images else ""), images=images)
                if msg.role == "assistant" and thinking:
                    msg.thinking, thinking = thinking, ""
                messages.append(msg)
            elif kind == "function_call":
                args = item.get("arguments") or ""
                if args:
                    try:
                        value = json.loads(args)
                    except ValueError as e:
                        raise bad(f"failed to parse function call arguments: {e}") from None
                    if not isinstance(value, dict):
                        raise bad("failed to parse function call arguments: json: cannot unmarshal "
                                  f"{go_kind(value)} into Go value of type map[string]interface {{}}")
                call = (item.get("name") or "", _arguments(args or "{}"))
                if messages and messages[-1].role == "assistant":
                    messages[-1].tool_calls.append(call)
                    if thinking:
                        messages[-1].thinking, thinking = thinking, ""
                else:
                    messages.append(Message("assistant", "", thinking, [call]))
                    thinking = ""
            elif kind == "function_call_output":
                output = item.get("output")
                text, images, broken = _content(output, where) if isinstance(output, list) else (output or "", 0, False)
                job.images += images
                messages.append(Message("tool", text, images=images))
            elif kind == "reasoning":
                thinking = item.get("encrypted_content") or ""
            elif kind == "web_search_call":
                pass
            elif not kind:
                raise bad(f"{where}: input item missing required 'type' field")
            else:
                raise bad(f'{where}: unknown input item type: "{kind}"')
        if thinking:
            messages.append(Message("assistant", "", thinking))
    elif raw is not None:
        raise bad(f"input must be a string or array: json: cannot unmarshal {go_kind(raw)} into Go value "
                  "of type []json.RawMessage")
    if effort not in _EFFORTS:
        raise bad(f'invalid reasoning value: "{effort}" (must be "minimal", "low", "medium", "high", "xhigh", '
                  '"ultra", "max", or "none")')
    job.wants_thinking = effort not in ("", "none")
    tools = []
    for tool in body.get("tools") or ():
        if isinstance(tool, dict):
            tools.append({"type": "function", "function": {"name": tool.get("name") or "",
                                                           "description": tool.get("description") or "",
                                                           "parameters": tool.get("parameters")}})
    users = [m for m in messages if m.role == "user"]
    job.steer_text = users[-1].content if users else ""
    return job, messages, tools, body


def response_object(rid: str, model: str, request: dict, status: str, output: list, use: dict | None,
                    created: int, completed: int | None) -> dict:
    """The response object (ToResponse's struct order; stream events send it as a Go map: sorted)."""
    text_format = (request.get("text") or {}).get("format") or {"type": "text"}
    reasoning = request.get("reasoning") or {}
    return {
        "id": rid, "object": "response", "created_at": created, "completed_at": completed, "status": status,
        "incomplete_details": None, "model": model, "previous_response_id": None,
        "instructions": request.get("instructions") or None, "output": output, "error": None,
        "tools": request.get("tools") or [], "tool_choice": "auto",
        "truncation": request.get("truncation") or "disabled", "parallel_tool_calls": True,
        "text": {"format": text_format},
        "top_p": request["top_p"] if request.get("top_p") is not None else 1.0,
        "presence_penalty": 0, "frequency_penalty": 0, "top_logprobs": 0,
        "temperature": request["temperature"] if request.get("temperature") is not None else 1.0,
        "reasoning": ({"effort": reasoning.get("effort") or None, "summary": reasoning.get("summary") or None}
                      if reasoning.get("effort") or reasoning.get("summary") else None),
        "usage": use, "max_output_tokens": request.get("max_output_tokens"), "max_tool_calls": None,
        "store": False, "background": bool(request.get("background")), "service_tier": "default",
        "metadata": {}, "safety_identifier": None, "prompt_cache_key": None,
    }


def responses_usage(prompt: int, completion: int) -> dict:
    return {"input_tokens": prompt, "output_tokens": completion, "total_tokens": prompt + completion,
            "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}}


def _message_item(item_id: str, text: str, status: str = "completed") -> dict:
    return {"id": item_id, "type": "message", "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


class _Events:
    """ResponsesStreamConverter for a text answer: the events, each with its sequence_number."""

    def __init__(self) -> None:
        self.seq = 0

    def __call__(self, kind: str, data: dict) -> bytes:
        data["type"] = kind
        data["sequence_number"] = self.seq
        self.seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + go_json(sorted_maps(data)) + b"\n\n"


def responses_events(rid: str, item_id: str, model: str, request: dict, words: list, use: dict | None):
    """(kind, bytes) per chunk the chat handler would write: the first word's chunk also opens the
    response and the message; the done chunk closes them and completes the response."""
    ev = _Events()
    opening = ev("response.created", {"response": response_object(rid, model, request, "in_progress", [], None,
                                                                  int(time.time()), None)})
    opening += ev("response.in_progress", {"response": response_object(rid, model, request, "in_progress", [],
                                                                       None, int(time.time()), None)})
    text = ""
    for i, word in enumerate(words):
        out = opening if i == 0 else b""
        if i == 0:
            out += ev("response.output_item.added", {"output_index": 0, "item": {
                "id": item_id, "type": "message", "status": "in_progress", "role": "assistant", "content": []}})
            out += ev("response.content_part.added", {"item_id": item_id, "output_index": 0, "content_index": 0,
                                                      "part": {"type": "output_text", "text": "", "annotations": [],
                                                               "logprobs": []}})
        text += word
        out += ev("response.output_text.delta", {"item_id": item_id, "output_index": 0, "content_index": 0,
                                                 "delta": word, "logprobs": []})
        yield CONTENT, out
    out = b"" if words else opening
    output = []
    if words:
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        out += ev("response.output_text.done", {"item_id": item_id, "output_index": 0, "content_index": 0,
                                                "text": text, "logprobs": []})
        out += ev("response.content_part.done", {"item_id": item_id, "output_index": 0, "content_index": 0,
                                                 "part": part})
        out += ev("response.output_item.done", {"output_index": 0, "item": _message_item(item_id, text)})
        output = [_message_item(item_id, text)]
    now = int(time.time())
    out += ev("response.completed", {"response": response_object(rid, model, request, "completed", output, use,
                                                                 now, now)})
    yield FINISH, out


class ResponsesHandler(InferenceHandler):
    async def serve(self, queued: Fault | None) -> None:
        opts = self.state.options
        job, messages, tools, request = parse_responses(self.body_json)
        model = self.resolve_model(job, missing_status=400)  # /api/chat: "model is required"
        if names.find(model, opts.embedding_only_models):
            raise OllamaError(400, f'"{job.model}" does not support chat')
        if job.wants_thinking:
            raise OllamaError(400, f'"{job.model}" does not support thinking')
        natural, fault = steer(job.steer_text, queued)
        if not await self.before_answer(fault):
            return
        if job.images:
            if not names.find(model, opts.vision_models):
                raise OllamaError(500, "this model is missing data required for image input")
            if job.bad_image:
                raise OllamaError(500, "Failed to create new sequence: failed to process inputs: image: unknown format")
        if messages:
            template = template_for(model)
            system, collated = collate(messages)
            text = template.render(system, collated, [tool_json(t) for t in tools])
            prompt = await self.state.tokens.prompt(template.vocab, text)
            prompt += sum(m.images for m in messages) * opts.image_tokens + opts.prompt_token_skew
            reply = plan_reply(natural, job.max_tokens, pad_bytes(fault))
        else:
            # No messages: the chat handler only loads the model (done_reason "load", no metrics).
            prompt, reply = 0, Reply([], "load", 0)
        reported = opts.send_usage and not (fault is not None and fault.name == "no_usage")
        use = responses_usage(prompt, reply.completion_tokens) if reported else None
        rid, item_id = f"resp_{random.randrange(999999)}", f"msg_{random.randrange(999999)}"
        if job.stream:
            await self.run_stream(responses_events(rid, item_id, job.model, request, reply.words, use), fault)
            return
        now = int(time.time())
        body = response_object(rid, job.model, request, "completed", [_message_item(item_id, reply.text)], use,
                               now, now)
        await self.answer_once(body, fault, opts.first_byte_delay_s + len(reply.words) * opts.token_delay_s)
