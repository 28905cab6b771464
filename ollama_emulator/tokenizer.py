"""The emulator's tokenizer: Llama 3's byte-pair ranks, read from the file the ``llama-models`` package
ships (``llama_models/llama3/tokenizer.model``), so nothing is downloaded.

An Ollama runner tokenizes the prompt its template rendered: special tokens written in the text (by the
template, or by a user who typed ``<|eot_id|>``) become one token each, the rest is byte-pair encoded
(Ollama's model/bytepairencoding.go splits on the special vocabulary first), and the model's BOS token
is prepended when its tokenizer adds one. ``Vocabulary.count_prompt`` does the same, with tiktoken
encoding the text between the special tokens.

Only llama3.2 has its real vocabulary here. The other emulated models (moondream's GPT-2 vocabulary, a
ChatML model's) are counted with the same ranks and their own special tokens: their figures are of the
right shape, not the exact counts of those models.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import os
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

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
LLAMA3_SPECIALS = _LLAMA3_NAMED + tuple(
    f"<|reserved_special_token_{i}|>" for i in range(2, 256 - len(_LLAMA3_NAMED) + 2)
)
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


@functools.lru_cache(maxsize=1)
def llama3_encoding() -> tiktoken.Encoding:
    """The Llama 3 ranks as a tiktoken Encoding, built once per process (~0.1 s). Special tokens are
    found by ``Vocabulary`` itself, so one Encoding serves every vocabulary."""
    return tiktoken.Encoding("emulator-llama3", pat_str=LLAMA3_SPLIT, mergeable_ranks=llama3_ranks(), special_tokens={})


# Every special token above is spelled <|...|>; a match is one only if the vocabulary has it. IMAGE
# matches too: it splits the text but is no token.
_MARKER = re.compile(r"<\|[^<>|\s]{1,64}\|>|" + re.escape(IMAGE))


@functools.lru_cache(maxsize=8192)
def _short_piece_tokens(piece: str) -> int:
    return len(llama3_encoding().encode_ordinary(piece))


def _piece_tokens(piece: str) -> int:
    """Tokens of the text between two special tokens. The template's own pieces ("system",
    "\\n\\nCutting Knowledge Date: December 2023\\n\\n", "assistant") come back on every request:
    short pieces are remembered, which halves the emulator's counting time on a small prompt."""
    if len(piece) <= 256:
        return _short_piece_tokens(piece)
    return len(llama3_encoding().encode_ordinary(piece))


class Vocabulary:
    """One model's tokenizer: its special tokens and whether it adds a BOS token."""

    def __init__(self, specials: tuple[str, ...], adds_bos: bool) -> None:
        self.specials = frozenset(specials)
        self.adds_bos = adds_bos

    def count_prompt(self, prompt: str) -> int:
        """Tokens of a rendered prompt: special tokens recognised (one each), the text between them
        byte-pair encoded piece by piece, BOS added if the model adds one. (tiktoken's own
        ``encode(allowed_special=...)`` does the same but costs ~40 us a call for 256 specials.)"""
        n = 1 if self.adds_bos else 0
        start = 0
        for m in _MARKER.finditer(prompt):
            marker = m.group()
            if marker in self.specials or marker == IMAGE:
                if m.start() > start:
                    n += _piece_tokens(prompt[start:m.start()])
                n += marker != IMAGE
                start = m.end()
        if start < len(prompt):
            n += _piece_tokens(prompt[start:])
        return n

    def count_text(self, text: str) -> int:
        """Tokens of plain text (an embedding input, a test's expectation): no special tokens."""
        return len(llama3_encoding().encode_ordinary(text)) if text else 0


LLAMA3 = Vocabulary(LLAMA3_SPECIALS, adds_bos=True)
GPT2_STANDIN = Vocabulary(GPT2_SPECIALS, adds_bos=True)  # moondream: BOS = <|endoftext|> (phi-2's tokenizer)
CHATML_STANDIN = Vocabulary(CHATML_SPECIALS, adds_bos=False)  # Qwen-style: no BOS


class Counter:
    """Counts on the event loop or, for big texts, in a small thread pool. One per emulator;
    ``vocab_for`` names a model's vocabulary (templates.template_for)."""

    def __init__(self, vocab_for: Callable[[str], Vocabulary]) -> None:
        self._vocab_for = vocab_for
        self._pool: ThreadPoolExecutor | None = None

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
