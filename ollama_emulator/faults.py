"""Fault injection: what a test can make the emulated Ollama do wrong, and how a request asks for it.

A fault is queued by a test (``state.add_fault("busy503")``: the next inference request takes it) or
written into the request's last user message (or completions prompt / last embeddings input) as a
directive, next to the reply length::

    [[emu:reply_tokens=40]]   natural reply length (default 12)
    [[emu:fault=cut_after:3]] a fault, as in FAULTS below

A queued fault wins over a directive. The faults act where the model would run: a request that fails
validation still gets its 400/404 (and still uses up a queued fault).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("ollama_emulator")

# Fault names; the ones with an argument are written NAME:ARG.
FAULTS = {
    "error500": None,  # the runner died: 500 with its message
    "busy503": None,  # the queue is full: 503 "server busy"
    "slow_first_byte": float,  # seconds before anything is answered
    "cut_after": int,  # content chunks (stream), then the connection drops; non-stream: drops at once
    "no_usage": None,  # a stream without its usage chunk
    "bad_json": None,  # a body (or first event) that is not JSON
    "huge": int,  # a reply of at least this many bytes
    "stall_after": int,  # content chunks (stream); body bytes after the headers (non-stream); then silence
}

DEFAULT_REPLY_TOKENS = 12
MAX_REPLY_TOKENS = 10_000_000
_DIRECTIVE = re.compile(r"\[\[emu:([a-z_]+)=([^\]]*)\]\]")


@dataclass(frozen=True)
class Fault:
    name: str
    arg: Any = None


def parse_fault(text: str) -> Fault:
    """``"cut_after:3"`` → Fault("cut_after", 3). Raises ValueError for unknown names or bad args."""
    name, _, raw = text.strip().partition(":")
    if name not in FAULTS:
        raise ValueError(f"unknown fault {name!r}; known: {', '.join(sorted(FAULTS))}")
    conv = FAULTS[name]
    if conv is None:
        return Fault(name)
    if not raw:
        raise ValueError(f"fault {name!r} needs an argument ({name}:N)")
    value = conv(raw)
    if value < 0:
        raise ValueError(f"fault {name!r} needs a non-negative argument")
    return Fault(name, value)


def directives(text: str) -> dict[str, str]:
    return {k: v.strip() for k, v in _DIRECTIVE.findall(text)}


def steer(text: str, queued: Fault | None) -> tuple[int, Fault | None]:
    """Reads [[emu:...]] directives: (natural reply length, fault). A queued fault wins."""
    found = directives(text) if "[[emu:" in text else {}
    natural = DEFAULT_REPLY_TOKENS
    if "reply_tokens" in found:
        try:
            natural = min(max(int(found["reply_tokens"]), 0), MAX_REPLY_TOKENS)
        except ValueError:
            pass
    fault = queued
    if fault is None and "fault" in found:
        try:
            fault = parse_fault(found["fault"])
        except ValueError:
            log.debug("ignoring unknown fault directive %r", found["fault"])
    return natural, fault


def pad_bytes(fault: Fault | None) -> int:
    """huge:N: the reply is padded to at least N bytes."""
    return fault.arg if fault is not None and fault.name == "huge" else 0
