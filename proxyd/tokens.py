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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterable

import tiktoken
from tiktoken.load import load_tiktoken_bpe

from .modelname import canonical_keys, family

# Meta's pre-tokenizer regex for Llama 3 (the same one llama_models uses).
_LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

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
# template puts this instruction into the system block and the last user message (shared/notes/
# ollama-wire.md §11: "Tools change the template"; the wording is the library template's, not measured).
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

    llama3 (Ollama's llama3.2 template, measured in shared/notes/ollama-wire.md §11): 25 tokens for a
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
        tools with long descriptions are thousands of tokens that a reservation must cover."""
        shape = self.for_model(model)
        texts: list[str] = []
        roles: list[str] = []
        images = 0
        for msg in messages:
            role = msg.get("role", "user")
            parts = list(_message_texts(msg))
            images += _count_images(msg)
            texts.append("\n\n".join(parts))
            roles.append(role)
        if isinstance(tools, list) and tools:
            texts.append(TOOLS_PREAMBLE + "\n".join(_json(t) for t in tools))
            roles.append("system")  # no turn of its own: only its tokens
        counts = await self.count_many(model, texts)
        t = shape.template
        total = t.base
        turns = 0
        systems = 0
        for role, n in zip(roles, counts, strict=True):
            if role in ("system", "developer"):
                if t.system_counts:
                    total += n + (t.system_join if systems else 0)
                systems += 1
            else:
                total += n
                turns += 1
        total += t.per_message * max(0, turns - 1)
        return total + images * shape.image_tokens

    async def text_prompt(self, model: str, prompt: str) -> int:
        """/v1/completions: Ollama wraps the prompt in the chat template as one user message. An empty
        prompt only loads the model (finish_reason "load"): Ollama evaluates nothing and reports 0."""
        if not prompt:
            return 0
        shape = self.for_model(model)
        (n,) = await self.count_many(model, [prompt])
        return shape.template.base + n

    async def embedding_input(self, model: str, inputs: list[str]) -> int:
        counts = await self.count_many(model, inputs)
        return sum(counts)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _json(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))  # compact, as Go writes it
    except (TypeError, ValueError):  # not JSON-able: Ollama refuses the request anyway
        return str(value)


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
            yield str(fn.get("name", "")) + str(fn.get("arguments", ""))


def _count_images(msg: dict[str, Any]) -> int:
    content = msg.get("content")
    if not isinstance(content, list):
        return 0
    return sum(1 for p in content if isinstance(p, dict) and p.get("type") == "image_url")
