"""The emulator's tokenizer: Llama 3's byte-pair ranks, read from the file the ``llama-models`` package
ships (``llama_models/llama3/tokenizer.model``), so nothing is downloaded.

An Ollama runner tokenizes the prompt its template rendered: special tokens written in the text (by the
template, or by a user who typed ``<|eot_id|>``) become one token each, the rest is byte-pair encoded
(Ollama's model/bytepairencoding.go splits on the special vocabulary first), and the model's BOS token
is prepended when its tokenizer adds one. ``Vocabulary.count`` does the same with tiktoken.

Only llama3.2 has its real vocabulary here. The other emulated models (moondream's GPT-2 vocabulary, a
ChatML model's) are counted with the same ranks and their own special tokens: their figures are of the
right shape, not the exact counts of those models.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import tiktoken

# Meta's Llama 3 pre-tokenizer (also the one Ollama's llama3 GGUFs carry).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
N_RANKS = 128_000

# The 256 special tokens after the ranks, in Meta's order (ids 128000..128255); all are control tokens
# in the GGUF, so all are split out of a prompt.
_LLAMA3_NAMED = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
    "<|eot_id|>", "<|python_tag|>", "<|image|>",
)  # fmt: skip
LLAMA3_SPECIALS = _LLAMA3_NAMED + tuple(f"<|reserved_special_token_{i}|>" for i in range(2, 256 - len(_LLAMA3_NAMED) + 2))
CHATML_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>")
GPT2_SPECIALS = ("<|endoftext|>",)

# Where an image's ``[img-N]`` tag stands in a rendered prompt: the runner splits the text there and puts
# the image's embedding positions in between (counted apart, per image). The text on either side is
# tokenized on its own.
IMAGE = "\x00[img]\x00"

# Texts shorter than this are encoded on the event loop; longer ones in a thread (tiktoken releases
# the GIL), so a 100k-token prompt does not stall the other requests of a load test.
OFFLOAD_CHARS = 16_384


@functools.lru_cache(maxsize=1)
def llama3_ranks() -> dict[bytes, int]:
    """``token rank`` lines, the token in base64: tiktoken's rank format, parsed here."""
    import llama_models

    path = os.path.join(os.path.dirname(llama_models.__file__), "llama3", "tokenizer.model")
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as fh:
        for line in fh:
            token, _, rank = line.strip().partition(b" ")
            if token:
                ranks[base64.b64decode(token)] = int(rank)
    if len(ranks) != N_RANKS:
        raise RuntimeError(f"{path}: {len(ranks)} ranks, expected {N_RANKS}")
    return ranks


@functools.lru_cache(maxsize=None)
def encoding(specials: tuple[str, ...]) -> tiktoken.Encoding:
    """The Llama 3 ranks with ``specials`` numbered after them; built once per process and set."""
    return tiktoken.Encoding(
        f"emulator-{len(specials)}",
        pat_str=LLAMA3_SPLIT,
        mergeable_ranks=llama3_ranks(),
        special_tokens={tok: N_RANKS + i for i, tok in enumerate(specials)},
    )


class Vocabulary:
    """One model's tokenizer: its special tokens and whether it adds a BOS token."""

    def __init__(self, specials: tuple[str, ...], adds_bos: bool) -> None:
        self.specials = specials
        self.adds_bos = adds_bos

    @property
    def encoding(self) -> tiktoken.Encoding:
        return encoding(self.specials)

    def count_prompt(self, prompt: str) -> int:
        """Tokens of a rendered prompt: special tokens recognised, BOS added if the model adds one."""
        enc = self.encoding
        pieces = prompt.split(IMAGE) if IMAGE in prompt else (prompt,)
        n = sum(len(enc.encode(p, allowed_special="all", disallowed_special=())) for p in pieces if p)
        return n + (1 if self.adds_bos else 0)

    def count_text(self, text: str) -> int:
        """Tokens of plain text (an embedding input, a test's expectation): no special tokens."""
        return len(self.encoding.encode_ordinary(text)) if text else 0


LLAMA3 = Vocabulary(LLAMA3_SPECIALS, adds_bos=True)
GPT2_STANDIN = Vocabulary(GPT2_SPECIALS, adds_bos=True)  # moondream: BOS = <|endoftext|> (phi-2's tokenizer)
CHATML_STANDIN = Vocabulary(CHATML_SPECIALS, adds_bos=False)  # Qwen-style: no BOS


class Counter:
    """Counts on the event loop or, for big texts, in a small thread pool. One per emulator;
    ``vocab_for`` names a model's vocabulary (templates.template_for)."""

    def __init__(self, vocab_for: Callable[[str], Vocabulary]) -> None:
        self._vocab_for = vocab_for
        self._pool: Optional[ThreadPoolExecutor] = None

    async def prompt(self, vocab: Vocabulary, prompt: str) -> int:
        if len(prompt) < OFFLOAD_CHARS:
            return vocab.count_prompt(prompt)
        return await asyncio.get_running_loop().run_in_executor(self._executor(), vocab.count_prompt, prompt)

    async def texts(self, vocab: Vocabulary, texts: list[str]) -> int:
        if sum(len(t) for t in texts) < OFFLOAD_CHARS:
            return sum(vocab.count_text(t) for t in texts)
        return await asyncio.get_running_loop().run_in_executor(
            self._executor(), lambda: sum(vocab.count_text(t) for t in texts)
        )

    def count(self, model: str, text: str) -> int:
        """Plain-text tokens, for tests that build an expected figure (``25 + count(model, text)``)."""
        return self._vocab_for(model).count_text(text)

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="emu-tokenize")
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
