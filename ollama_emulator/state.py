"""An emulator instance: its options and everything it owns (handlers get it through ``initialize``)."""

from __future__ import annotations

import collections
import socket
from dataclasses import dataclass

from .faults import Fault, parse_fault
from .templates import template_for
from .tokenizer import Counter


@dataclass
class EmulatorOptions:
    stream_format: str = "old"  # "old" = Ollama v0.5.2..v0.32.5 chat stream; "new" = v0.32.6+
    token_delay_s: float = 0.0  # sleep between streamed chunks (non-stream: n * delay in total)
    first_byte_delay_s: float = 0.0  # before headers / first chunk (model load + prompt eval)
    models: tuple = ("llama3.2:1b", "moondream", "nomic-embed-text")
    vision_models: tuple = ("moondream",)
    embedding_models: tuple = ("nomic-embed-text", "llama3.2:1b")  # models that answer /v1/embeddings
    check_host: bool = True  # Ollama's Host check: 403 with an empty body for a non-local Host
    prompt_token_skew: int = 0  # added to reported prompt_tokens (tells an estimate from a report)
    image_tokens: int = 729  # per image on vision models (moondream: 27x27 patches)
    embedding_dims: int = 64
    send_usage: bool = True  # False = an upstream that never reports usage in streams
    # Models that only embed: chat says `"X" does not support chat`, completions `... generate`.
    embedding_only_models: tuple = ("nomic-embed-text",)
    # Models whose template takes a completions `suffix` (fill-in-the-middle, like qwen2.5-coder); any
    # other model answers a suffix with 400 "does not support insert", as Ollama does.
    insert_models: tuple = ()
    # A fault every inference request takes when none is queued (a test's upstream that always answers
    # 503, or is always slow): FAULTS' syntax, e.g. "busy503", "slow_first_byte:0.2".
    fault: str | None = None
    loaded_models: tuple | None = None  # what /api/ps lists as in memory; None = nothing, as a fresh Ollama

    def __post_init__(self) -> None:
        if self.fault is not None:
            parse_fault(self.fault)
        if self.stream_format not in ("old", "new"):
            raise ValueError(f"stream_format must be 'old' or 'new', not {self.stream_format!r}")


class EmulatorState:
    """Everything one emulator instance owns, and what tests read back (requests, counters)."""

    def __init__(self, options: EmulatorOptions | None = None) -> None:
        self.options = options or EmulatorOptions()
        self.requests: collections.deque = collections.deque(maxlen=1000)
        self.faults: collections.deque = collections.deque()
        self.active_streams = 0
        self.max_active_streams = 0  # the most streams open at once (tests of concurrency limits)
        self.cancelled_streams = 0
        self.cancelled_answers = 0  # non-stream generations abandoned by the client (Ollama stops too)
        self.completed = 0  # inference responses delivered in full (stream reached [DONE])
        # The listening address, for the Host check (Ollama checks the listener, not the connection).
        # None when the app was served by someone else: then the connection's local address is used.
        self.bound_address: str | None = None
        self.hostname = socket.gethostname().lower()
        self.tokens = Counter(lambda model: template_for(model).vocab)

    def add_fault(self, fault: str) -> None:
        parse_fault(fault)  # fail at the caller, not later inside a request
        self.faults.append(fault)

    def take_fault(self) -> Fault | None:
        if self.faults:
            return parse_fault(self.faults.popleft())
        return parse_fault(self.options.fault) if self.options.fault is not None else None
