"""What the bench sends: the request bodies of every phase, and the limits each proxy user gets."""

from __future__ import annotations

import base64
import io
import random
from typing import Any

MODEL = "llama3.2:1b"

# Every limit configured (so every check runs on every request), none of them reachable by the bench.
GENEROUS = {
    "requests_per_minute": 1_000_000_000,
    "tokens_per_minute": 10**15,
    "requests_per_day": 10**12,
    "tokens_per_day": 10**15,
    "tokens_per_month": 10**15,
    "cost_per_day_usd": 10**9,
    "cost_per_month_usd": 10**9,
    "total_tokens": 10**15,
    "total_cost_usd": 10**9,
    "max_concurrent_requests": 100_000,
}


def small_chat() -> dict[str, Any]:
    return {"model": MODEL, "max_tokens": 32, "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is 2+2?"}]}


def stream_chat(tokens: int, directive: str = "") -> dict[str, Any]:
    return {"model": MODEL, "stream": True, "max_tokens": 256, "messages": [
        {"role": "user", "content": f"Tell me a story. [[emu:reply_tokens={tokens}]]{directive}"}]}


def big_prompt_chat(tokens: int) -> dict[str, Any]:
    # The emulator's vocabulary words are one Llama 3 token each, with or without the leading space:
    # ``tokens`` words are exactly that many tokens (plus the template), ~5.7 bytes per token.
    words = ("alpha", "beta", "gamma", "delta", "epsilon", "theta", "lambda", "sigma", "omega")
    rng = random.Random(7)
    text = " ".join(rng.choice(words) for _ in range(tokens))
    # slow_first_byte: the upstream takes 0.5 s before answering, as a model evaluating a long prompt
    # would, so these requests stay in flight while the small ones are measured.
    return {"model": MODEL, "max_tokens": 8, "messages": [
        {"role": "user", "content": "[[emu:fault=slow_first_byte:0.5]] Summarise: " + text}]}


def tiny_png_data_url() -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 40, 40)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def vision_chat() -> dict[str, Any]:
    return {"model": "moondream", "max_tokens": 32, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": tiny_png_data_url()}},
        {"type": "text", "text": "Describe this image."}]}]}


def embeddings() -> dict[str, Any]:
    return {"model": "nomic-embed-text", "input": ["hello world", "the quick brown fox"]}
