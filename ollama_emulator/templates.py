"""How Ollama turns a request into the prompt it counts, for the emulated models.

``prompt_tokens`` is the length of the prompt the model evaluated, so the emulator renders that prompt
as Ollama does and tokenizes it (tokenizer.py):

1. openai/openai.go ``FromChatRequest``: each message becomes an api.Message; a content *array* becomes
   one message per part (an image part: a message with an image and no text), the message's tool calls
   (arguments parsed) and ``reasoning`` (as Thinking) going to the last of them.
2. template/template.go ``collate``: the contents of all system messages are joined with "\\n\\n" into
   .System; consecutive messages of one role (not "tool") merge, contents joined with "\\n\\n".
3. The model's template renders .System, .Messages and .Tools (tools and tool-call arguments as Go's
   json.Marshal writes them: the struct's field order, map keys sorted).
4. The runner tokenizes the text (BOS added, special tokens split out) and puts each image's embedding
   positions where its ``[img-N]`` tag stands.

The templates, by model:

- ``llama3.2:1b``: the Ollama library's llama3.2 template (registry blob 966de95ca8a6), written out in
  ``_llama32`` below, with the real Llama 3 vocabulary.
- ``moondream`` (and ``moondream:*``): its legacy template ``{{ if .Prompt }} Question: {{ .Prompt
  }}\\n\\n{{ end }} Answer: {{ .Response }}\\n\\n``, executed per prompt/response pair as template.go
  does for a template without .Messages (so system messages are dropped).
- any other model: Ollama's own template/chatml.gotmpl, with a qwen2.5-coder style fill-in-the-middle
  branch for /v1/completions with a ``suffix``.

Where the emulator knowingly departs from Ollama (docs/DESIGN.md "The emulator is a package of its
own"):

- An image next to text counts ``image_tokens`` positions and nothing else: the ``[img-N]`` tag and the
  "\\n\\n" that joins an image part to the text parts are not rendered, so a prompt with one image is
  exactly ``image_tokens`` more than the same prompt without it (a test relies on it). An image-only
  message is its tag, as in Ollama.
- The assistant turns of the llama3.2 template also write their Thinking (``<think>\\n…\\n</think>``,
  as thinking templates such as qwen3's do), which the real llama3.2 template leaves out: a test double
  for the proxy's estimate of templated fields needs a template that renders them.
- No context window: the whole prompt is counted, however long (Ollama truncates to num_ctx).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .names import resolve
from .tokenizer import CHATML_STANDIN, GPT2_STANDIN, IMAGE, LLAMA3, Vocabulary
from .wire import marshal, sorted_maps


@dataclass
class Message:
    """api.Message, the fields a template reads."""

    role: str
    content: str = ""
    thinking: str = ""
    tool_calls: list = field(default_factory=list)  # [(name, arguments as Go writes them)]
    images: int = 0


# -- 1. the OpenAI request as Ollama's api.Message list --------------------------------------------


def from_openai(messages: list) -> list[Message]:
    """FromChatRequest. The body was validated before (jobs.parse_chat), so only shapes it let through
    reach here; anything Ollama would have refused is skipped rather than raised.

    Images: Ollama gives each image part a message of its own whose text is the image's ``[img-N]``
    tag, joined to the text parts by collate's "\\n\\n". The emulator does that for a message with no
    text (``IMAGE`` stands for the tag), but attaches the images of a message that has text to its last
    text part without a tag (module docstring)."""
    out: list[Message] = []
    for msg in messages:
        content = msg.get("content")
        reasoning = msg.get("reasoning") if isinstance(msg.get("reasoning"), str) else ""
        calls = _tool_calls(msg.get("tool_calls"))
        role = msg.get("role") if isinstance(msg.get("role"), str) else ""
        if isinstance(content, list):
            parts = [p for p in content if isinstance(p, dict)]
            texts = [p.get("text") or "" for p in parts if p.get("type") == "text"]
            images = sum(1 for p in parts if p.get("type") in ("image_url", "input_audio"))
            if texts:
                out += [Message(role, text) for text in texts]
                out[-1].images = images
            else:
                out += [Message(role, IMAGE, images=1) for _ in range(images)]
            if out and calls:  # "we'll add them to the last message"
                out[-1].tool_calls, out[-1].thinking = calls, reasoning
        else:
            out.append(Message(role, content if isinstance(content, str) else "", reasoning, calls))
    return out


def _tool_calls(raw: Any) -> list:
    calls = []
    for call in raw if isinstance(raw, list) else ():
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict):
            continue
        name = fn.get("name") if isinstance(fn.get("name"), str) else ""
        calls.append((name, _arguments(fn.get("arguments"))))
    return calls


def _arguments(raw: Any) -> str:
    """api.ToolCallFunctionArguments as the template prints it (templateArgs: a Go map, so json.Marshal
    sorts its keys, at every level, and writes every number as a float64)."""
    try:
        value = json.loads(raw) if isinstance(raw, str) else None
    except ValueError:
        value = None
    return marshal(sorted_maps(value)) if isinstance(value, dict) else "{}"


# -- 2. collate ------------------------------------------------------------------------------------


def collate(messages: list[Message]) -> tuple[str, list[Message]]:
    system = [m.content for m in messages if m.role == "system"]
    merged: list[Message] = []
    for m in messages:
        if merged and merged[-1].role == m.role and m.role != "tool":
            prev = merged[-1]
            merged[-1] = Message(prev.role, prev.content + "\n\n" + m.content, prev.thinking, prev.tool_calls,
                                 prev.images)
        else:
            merged.append(m)
    return "\n\n".join(system), merged


# -- 3. the templates -------------------------------------------------------------------------------

SH, EH, EOT = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
_LLAMA32_TOOLS_SYSTEM = (
    "When you receive a tool call response, use the output to format an answer to the orginal user question."
    "\n\nYou are a helpful assistant with tool calling capabilities."
)  # sic: "orginal", as in the template
_LLAMA32_TOOLS_USER = (
    "\n\nGiven the following functions, please respond with a JSON for a function call with its proper arguments "
    "that best answers the given prompt.\n\nRespond in the format {\"name\": function name, \"parameters\": "
    "dictionary of argument name and its value}. Do not use variables.\n\n"
)


def _llama32(system: str, messages: list[Message], tools: list[str]) -> str:
    """Ollama library llama3.2 (blob 966de95ca8a6), line by line; the template's whitespace trimming
    ({{- ... }}) is already applied to the literal text."""
    out = [SH, "system", EH, "\n\nCutting Knowledge Date: December 2023\n\n"]
    if system:
        out.append(system)
    if tools:
        out.append(_LLAMA32_TOOLS_SYSTEM)
    out.append(EOT)
    for i, m in enumerate(messages):
        last = i == len(messages) - 1
        if m.role == "user":
            out += [SH, "user", EH]
            if tools and last:
                out += [_LLAMA32_TOOLS_USER, *(t + "\n" for t in tools), "\n", m.content, EOT]
            else:
                out += ["\n\n", m.content, EOT]
            if last:
                out += [SH, "assistant", EH, "\n\n"]
        elif m.role == "assistant":
            out += [SH, "assistant", EH]
            if m.thinking:  # the emulator's addition (module docstring)
                out += ["\n\n<think>\n", m.thinking, "\n</think>"]
            if m.tool_calls:
                out.append("\n")
                out += [f'\n{{"name": "{name}", "parameters": {args}}}' for name, args in m.tool_calls]
            else:
                out += ["\n\n", m.content]
            if not last:
                out.append(EOT)
        elif m.role == "tool":
            out += [SH, "ipython", EH, "\n\n", m.content, EOT]
            if last:
                out += [SH, "assistant", EH, "\n\n"]
        # any other role (developer, a made-up one, system itself): no branch in the template
    return "".join(out)


def _moondream(system: str, messages: list[Message], tools: list[str]) -> str:
    """template.go Execute for a template without .Messages: one execution per prompt/response pair,
    the last one cut after {{ .Response }}. The template has no .System: system text is dropped."""
    out: list[str] = []
    prompt = response = ""

    def execute(full: bool) -> None:
        if prompt:
            out.append(f" Question: {prompt}\n\n")
        out.append(f" Answer: {response}" + ("\n\n" if full else ""))

    for m in messages:
        if m.role == "system":
            if prompt or response:
                execute(True)
                prompt = response = ""
        elif m.role == "user":
            if response:
                execute(True)
                prompt = response = ""
            prompt = m.content
        elif m.role == "assistant":
            response = m.content
    execute(False)
    return "".join(out)


def _chatml(system: str, messages: list[Message], tools: list[str]) -> str:
    """template/chatml.gotmpl: every collated message (system ones too) in its own turn."""
    turns = [f"<|im_start|>{m.role}\n{m.content}<|im_end|>\n" for m in messages]
    return "".join(turns) + "<|im_start|>assistant\n"


def _fim(prompt: str, suffix: str) -> str:
    """qwen2.5-coder's {{ if .Suffix }} branch: the prompt and the suffix between three markers."""
    return f"<|fim_prefix|>{prompt}<|fim_suffix|>{suffix}<|fim_middle|>"


@dataclass(frozen=True)
class Template:
    name: str
    vocab: Vocabulary
    render: Callable[[str, list[Message], list[str]], str]
    fim: Callable[[str, str], str] | None = None


LLAMA32 = Template("llama3.2", LLAMA3, _llama32)
MOONDREAM = Template("moondream", GPT2_STANDIN, _moondream)
CHATML = Template("chatml", CHATML_STANDIN, _chatml, _fim)


@functools.lru_cache(maxsize=256)
def template_for(model: str) -> Template:
    """The template an emulated model has (``model`` as the emulator lists it)."""
    name = resolve(model)
    if name is not None and name.folded() == ("registry.ollama.ai", "library", "llama3.2", "1b"):
        return LLAMA32
    if name is not None and name.folded()[:3] == ("registry.ollama.ai", "library", "moondream"):
        return MOONDREAM
    return CHATML


def chat_prompt(model: str, messages: list, tools: Any) -> tuple[Template, str, int]:
    """(template, rendered prompt, images) of a chat request to ``model``."""
    template = template_for(model)
    msgs = from_openai(messages)
    system, collated = collate(msgs)
    tool_texts = [tool_json(t) for t in tools] if isinstance(tools, list) else []
    return template, template.render(system, collated, tool_texts), sum(m.images for m in msgs)


def completion_prompt(model: str, prompt: str, suffix: str) -> tuple[Template, str]:
    """/v1/completions: GenerateHandler renders the prompt as one user message, or, with a suffix, the
    template's fill-in-the-middle branch (only models that take a suffix get this far)."""
    template = template_for(model)
    if suffix and template.fim is not None:
        return template, template.fim(prompt, suffix)
    system, collated = collate([Message("user", prompt)])
    return template, template.render(system, collated, [])


# -- tools as the template prints them --------------------------------------------------------------


def tool_json(tool: Any) -> str:
    """template.go templateTool, json.Marshal'ed: the fields Ollama's structs keep, in their order."""
    tool = tool if isinstance(tool, dict) else {}
    fn = tool.get("function") if isinstance(tool.get("function"), dict) else {}
    params = fn.get("parameters") if isinstance(fn.get("parameters"), dict) else {}
    out: dict[str, Any] = {"type": _str(tool.get("type"))}
    if tool.get("items"):
        out["items"] = sorted_maps(tool["items"])
    p: dict[str, Any] = {"type": _str(params.get("type"))}
    for key in ("$defs", "items"):
        if params.get(key):
            p[key] = sorted_maps(params[key])
    if _strings(params.get("required")):
        p["required"] = _strings(params.get("required"))
    props = params.get("properties")
    # templateProperties is a Go map (keys sorted); a missing one is nil: null.
    p["properties"] = {k: _property(props[k]) for k in sorted(props)} if isinstance(props, dict) else None
    out["function"] = {"name": _str(fn.get("name")), "description": _str(fn.get("description")), "parameters": p}
    return marshal(out)


def _property(prop: Any) -> dict[str, Any]:
    """api.ToolProperty: anyOf, type (one type as a string), items, description, enum, properties (in
    the order given: an ordered map), required; each left out when empty. Other keys are dropped."""
    prop = prop if isinstance(prop, dict) else {}
    out: dict[str, Any] = {}
    if isinstance(prop.get("anyOf"), list) and prop["anyOf"]:
        out["anyOf"] = [_property(p) for p in prop["anyOf"]]
    types = [prop["type"]] if isinstance(prop.get("type"), str) else _strings(prop.get("type"))
    if types:
        out["type"] = types[0] if len(types) == 1 else types
    if prop.get("items"):
        out["items"] = sorted_maps(prop["items"])
    if _str(prop.get("description")):
        out["description"] = prop["description"]
    if isinstance(prop.get("enum"), list) and prop["enum"]:
        out["enum"] = sorted_maps(prop["enum"])
    if isinstance(prop.get("properties"), dict) and prop["properties"]:
        out["properties"] = {k: _property(v) for k, v in prop["properties"].items()}
    if _strings(prop.get("required")):
        out["required"] = _strings(prop.get("required"))
    return out


def _str(v: Any) -> str:
    return v if isinstance(v, str) else ""


def _strings(v: Any) -> list[str]:
    return [x for x in v if isinstance(x, str)] if isinstance(v, list) else []
