"""Token counting: the estimate of a request before it is forwarded, and counting relayed text.

Tokenizers are tiktoken ``Encoding`` objects. tiktoken's built-in encodings download their rank files
at first use, which fails offline, so proxyd loads the Llama 3 ranks that ship inside the PyPI package
``llama-models`` (``llama3/tokenizer.model``); they are exact for llama3.x. A model is mapped to a
tokenizer and a chat-template shape in config (``models.<name>``); unknown models fall back to the
Llama 3 ranks with a generic per-message overhead, which is close for most modern BPE vocabularies.

Encoding costs about 1 µs per token and tiktoken releases the GIL, so large texts are encoded in a
thread pool: a 100k-token prompt must not stall the event loop for everyone else.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Iterable

import orjson
import tiktoken
from tiktoken.load import load_tiktoken_bpe

from .modelname import canonical_keys, family

# Meta's pre-tokenizer regex for Llama 3 (the same one llama_models uses).
_LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Fill-in-the-middle markers a template adds around a prompt and its suffix (qwen2.5-coder, starcoder2:
# 3 special tokens; codellama: BOS, 3 markers and spaces; deepseek-coder: BOS and 3): an upper bound.
SUFFIX_OVERHEAD = 8

# Texts shorter than this are encoded inline: handing them to a thread costs more than encoding.
OFFLOAD_CHARS = 16_384


@functools.lru_cache(maxsize=None)
def llama3_encoding() -> tiktoken.Encoding:
    import llama_models

    path = os.path.join(os.path.dirname(llama_models.__file__), "llama3", "tokenizer.model")
    ranks = load_tiktoken_bpe(path)
    return tiktoken.Encoding("llama3", pat_str=_LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens={})


ENCODINGS = {"llama3": llama3_encoding}

# What a tool-capable template adds when a request has tools, besides each tool's JSON: Ollama's llama3.2
# template puts this instruction into the system block and the last user message (the library's
# llama3.2 template at ollama/ollama fb30760, v0.33.0-rc2; the wording is the template's, not measured).
TOOLS_PREAMBLE = (
    "Environment: ipython\n\nWhen you receive a tool call response, use the output to format an answer to the "
    "orginal user question.\n\nYou are a helpful assistant with tool calling capabilities.\n\n"
    "Given the following functions, please respond with a JSON for a function call with its proper arguments "
    "that best answers the given prompt.\n\nRespond in the format {\"name\": function name, \"parameters\": "
    "dictionary of argument name and its value}. Do not use variables.\n\n"
)


@dataclass(frozen=True)
class TemplateShape:
    """How a model's chat template adds tokens around the message texts.

    llama3 (Ollama's llama3.2 template at ollama/ollama fb30760, measured with its vocabulary): 25 tokens for a
    single user message (BOS, a system block with the knowledge-date line, headers, eot, the
    generation header), +5 per further user/assistant message; system text only adds its own tokens.
    moondream: no system slot (system messages are dropped), ~7 tokens per question turn + BOS.
    """

    base: int  # fixed tokens per request, covering the first user/assistant message
    per_message: int  # each further user/assistant/tool message
    system_counts: bool  # whether system text reaches the prompt at all
    system_join: int  # tokens joining several system messages


TEMPLATES = {
    "llama3": TemplateShape(base=25, per_message=5, system_counts=True, system_join=1),
    "moondream": TemplateShape(base=8, per_message=7, system_counts=False, system_join=0),
    "generic": TemplateShape(base=8, per_message=5, system_counts=True, system_join=5),
    "none": TemplateShape(base=0, per_message=0, system_counts=True, system_join=0),
}


@dataclass(frozen=True)
class ModelTokens:
    encoding: tiktoken.Encoding
    template: TemplateShape
    image_tokens: int


class TokenCounter:
    """Counts tokens per model, as configured. Built once; shared by all handlers."""

    def __init__(self, models: dict[str, dict[str, Any]], default: dict[str, Any]) -> None:
        # Keyed by canonical name, as requests are (proxyd/modelname.py). The caches below are keyed by
        # the config entry a name resolves to, not by the name: names come from clients, so a cache
        # per name would grow with every made-up one (~1.2 KB each, measured), never freed.
        self._models = canonical_keys(models, "config: models")
        self._default = default
        self._specs: dict[str | None, dict[str, Any]] = {}
        self._cache: dict[str | None, ModelTokens] = {}
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tokenize")

    def _entry(self, model: str) -> str | None:
        """The models entry that applies: the model's own, its family's (before ':'), or None."""
        if model in self._models:
            return model
        fam = family(model)
        return fam if fam in self._models else None

    def spec(self, model: str) -> dict[str, Any]:
        """A model's settings: its own entry (or its family's) over the defaults."""
        entry = self._entry(model)
        found = self._specs.get(entry)
        if found is None:
            found = self._specs[entry] = {**self._default, **(self._models[entry] if entry else {})}
        return found

    def for_model(self, model: str) -> ModelTokens:
        entry = self._entry(model)
        found = self._cache.get(entry)
        if found is None:
            spec = self.spec(model)
            found = self._cache[entry] = ModelTokens(
                encoding=ENCODINGS[spec.get("tokenizer", "llama3")](),
                template=TEMPLATES[spec.get("template", "generic")],
                image_tokens=int(spec.get("image_tokens", 0)),
            )
        return found

    # -- counting ---------------------------------------------------------------------------

    def count(self, model: str, text: str) -> int:
        return len(self.for_model(model).encoding.encode_ordinary(text)) if text else 0

    async def count_many(self, model: str, texts: list[str]) -> list[int]:
        """Counts each text; big batches go to a thread so the event loop keeps serving."""
        enc = self.for_model(model).encoding
        if sum(len(t) for t in texts) < OFFLOAD_CHARS:
            return [len(enc.encode_ordinary(t)) if t else 0 for t in texts]
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._pool, lambda: [len(enc.encode_ordinary(t)) if t else 0 for t in texts]
        )

    # -- estimates of a request's prompt -----------------------------------------------------

    async def chat_prompt(self, model: str, messages: list[dict[str, Any]], tools: Any = None) -> int:
        """Prompt tokens of a chat request as the model's template will render it. Tool definitions
        count too: the template writes each one's JSON (and an instruction) into the prompt, and ten
        tools with long descriptions are thousands of tokens that a reservation must cover. So does every
        other message field Ollama hands the template (``_template_extras``): a field the estimate left
        out would be a prompt of any size the client chooses, reserved as nothing."""
        shape = self.for_model(model)
        texts: list[str] = []
        owner: list[int] = []  # texts[i] belongs to messages[owner[i]]; -1: the tools
        images = 0
        for i, msg in enumerate(messages):
            texts.append("\n\n".join(_message_texts(msg)))
            owner.append(i)
            if len(msg) > 2 or msg.get("role") not in _PLAIN_ROLES:  # the common case skips the call
                for extra in _template_extras(msg):
                    texts.append(extra)
                    owner.append(i)
            images += _count_images(msg)
        if isinstance(tools, list) and tools:
            texts.append(TOOLS_PREAMBLE + "\n".join(go_json(t) for t in tools))
            owner.append(-1)
        counts = await self.count_many(model, texts)
        per_message = [0] * len(messages)
        roles = [msg.get("role", "user") for msg in messages]
        for i, n in zip(owner, counts, strict=True):
            if i < 0:  # tools: no turn of their own, only their tokens, in the system block
                per_message.append(n)
                roles.append("system")
            else:
                per_message[i] += n
        t = shape.template
        total = t.base
        turns = 0
        systems = 0
        for role, n in zip(roles, per_message, strict=True):
            if role in ("system", "developer"):
                if t.system_counts:
                    total += n + (t.system_join if systems else 0)
                systems += 1
            else:
                total += n
                turns += 1
        total += t.per_message * max(0, turns - 1)
        return total + images * shape.image_tokens

    async def text_prompt(self, model: str, prompt: str, suffix: str | None = None) -> int:
        """/v1/completions: Ollama wraps the prompt in the chat template as one user message. An empty
        prompt only loads the model (finish_reason "load"): Ollama evaluates nothing and reports 0.

        With a ``suffix`` (fill-in-the-middle) Ollama renders the model's template with the prompt and
        the suffix instead of a chat turn (server/routes.go GenerateHandler: ``values.Suffix``), e.g.
        ``<|fim_prefix|>{prompt}<|fim_suffix|>{suffix}<|fim_middle|>``: both texts, plus the template's
        markers (SUFFIX_OVERHEAD covers those of the FIM templates in Ollama's library)."""
        if not prompt:
            return 0
        shape = self.for_model(model)
        if suffix:
            n_prompt, n_suffix = await self.count_many(model, [prompt, suffix])
            return SUFFIX_OVERHEAD + n_prompt + n_suffix
        (n,) = await self.count_many(model, [prompt])
        return shape.template.base + n

    async def embedding_input(self, model: str, inputs: list[str]) -> int:
        counts = await self.count_many(model, inputs)
        return sum(counts)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


_EXPONENT = re.compile(rb"[0-9][eE][-+]?[0-9]")
_GO_ESCAPES = (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029"))


def go_json(value: Any) -> str:
    """``value`` as Go's json.Marshal writes it, which is how Ollama's templates write tools and tool
    call arguments: compact; ``<``, ``>``, ``&``, U+2028 and U+2029 escaped (``\\u003c``: 6 characters
    for 1, so a tool description of ``<`` is ~3x the tokens of its text); every number a float64 in
    Go's format (``1e20`` is ``100000000000000000000``). Counting our own spelling instead would let a
    body be rendered into several times the prompt its estimate reserved."""
    try:
        raw = orjson.dumps(value)
        if _EXPONENT.search(raw):  # only a number in exponent form can grow (strings may match: harmless)
            raw = orjson.dumps(_go_numbers(value))
        text = raw.decode()
    except (TypeError, ValueError):  # beyond orjson (an int past 64 bits, depth): close enough, and rare
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)
    if "<" in text or ">" in text or "&" in text or "\u2028" in text or "\u2029" in text:
        for char, escape in _GO_ESCAPES:
            text = text.replace(char, escape)
    return text


def _go_numbers(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _go_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_go_numbers(v) for v in value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return orjson.Fragment(go_float(float(value)))
    return value


def go_float(x: float) -> str:
    """A float64 as encoding/json writes it (encode.go floatEncoder): shortest digits, in 'f' notation
    for 1e-6 <= |x| < 1e21, else 'e' notation with a negative exponent's leading zero dropped."""
    a = abs(x)
    if a != 0 and (a < 1e-6 or a >= 1e21):
        return repr(x).replace("e-0", "e-")  # Python's repr is already exponent form in that range
    return format(Decimal(repr(x)).normalize(), "f")


# How thinking-capable templates (qwen3, deepseek-r1) write an assistant message's thinking.
THINKING_OPEN, THINKING_CLOSE = "<think>\n", "\n</think>\n\n"
# Roles every template shape above covers; any other role string may be written out by a template
# (``<|im_start|>{{ .Role }}``), so its text counts.
_PLAIN_ROLES = frozenset({"system", "user", "assistant", "tool", "developer"})


def _message_texts(msg: dict[str, Any]) -> Iterable[str]:
    content = msg.get("content")
    if isinstance(content, str):
        yield content
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                yield part["text"]
    for call in msg.get("tool_calls") or ():
        fn = call.get("function") if isinstance(call, dict) else None
        if isinstance(fn, dict):
            # As templates write a call (llama3.2: {"name": ..., "parameters": ...}; qwen: inside
            # <tool_call> tags), with the arguments as Go re-writes them after parsing.
            yield f'<tool_call>\n{{"name": "{fn.get("name", "")}", "arguments": {_go_arguments(fn.get("arguments"))}}}\n</tool_call>'


def _go_arguments(arguments: Any) -> str:
    """Tool call arguments as Ollama renders them: parsed (openai.go FromCompletionToolCall), then
    written by json.Marshal. Unparseable ones are counted as sent (Ollama refuses them: 400)."""
    if not isinstance(arguments, str):
        return str(arguments)
    try:
        return go_json(orjson.loads(arguments))
    except (ValueError, RecursionError):  # not JSON, or nested past what Python writes back
        return arguments


def _template_extras(msg: dict[str, Any]) -> Iterable[str]:
    """A message's fields besides its content that reach the template, each counted on its own (an
    upper bound, whatever the template makes of them). openai/openai.go FromChatRequest copies
    ``reasoning`` to api.Message.Thinking, ``name`` to ToolName (tool messages), ``tool_call_id`` and
    each tool call's ``id``; ``thinking`` and ``reasoning_content`` are not fields of Ollama's OpenAI
    message, so they never reach a template."""
    reasoning = msg.get("reasoning")
    if isinstance(reasoning, str) and reasoning:
        yield THINKING_OPEN + reasoning + THINKING_CLOSE
    for field in ("name", "tool_call_id"):
        value = msg.get(field)
        if isinstance(value, str) and value:
            yield value
    for call in msg.get("tool_calls") or ():
        if isinstance(call, dict) and isinstance(call.get("id"), str):
            yield call["id"]
    role = msg.get("role")
    if isinstance(role, str) and role.lower() not in _PLAIN_ROLES:
        yield role


def _count_images(msg: dict[str, Any]) -> int:
    content = msg.get("content")
    if not isinstance(content, list):
        return 0
    return sum(1 for p in content if isinstance(p, dict) and p.get("type") == "image_url")
