"""What the emulated model answers: deterministic replies and embeddings.

A reply is ``n`` words from a fixed vocabulary in which every word is exactly one Llama 3 token, with or
without a leading space (checked in tests/test_emulator.py with the ranks tokenizer.py loads), so the
relayed text of a reply of ``n`` words counts ``n`` tokens: a proxy that counts what it relays can be
checked against the ``completion_tokens`` reported here.
"""

from __future__ import annotations

import hashlib
import math
import random
import struct
from dataclasses import dataclass

VOCAB = (
    "alpha", "beta", "gamma", "delta", "epsilon", "eta", "theta", "lambda", "mu", "nu",
    "xi", "pi", "rho", "sigma", "tau", "phi", "chi", "psi", "omega",
)  # fmt: skip
_AVG_WORD_BYTES = sum(len(w) + 1 for w in VOCAB) / len(VOCAB)  # for huge:BYTES padding


@dataclass
class Reply:
    """What the emulated model generates for one request."""

    words: list
    finish_reason: str
    completion_tokens: int

    @property
    def text(self) -> str:
        return "".join(self.words)


def plan_reply(natural: int, max_tokens: int | None, pad_bytes: int = 0) -> Reply:
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
