"""JSON on the request path: orjson, with the standard library as the fallback for what orjson will not write.

Why orjson: every proxied request is parsed (the client's body, Ollama's answer, each stream event) and
its body written again; orjson does that several times faster than ``json``, and since neither
releases the GIL, a 600 KB prompt holds the event loop (and every other request) for that much less.

Differences from ``json`` that matter here, all on the side of strictness:
- ``loads`` accepts UTF-8 only and refuses NaN/Infinity and unpaired surrogate escapes (not JSON text,
  and nothing Ollama or SQLite could store): the client gets a 400 for them;
- ``loads`` turns an integer beyond 64 bits into a float (validators then refuse it as not an integer);
- ``dumps`` refuses integers beyond 64 bits and strings with lone surrogates: those fall back to
  ``json`` (ASCII-escaped), so writing never fails.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

loads = orjson.loads  # bytes | str -> object; raises orjson.JSONDecodeError, a ValueError
JSONDecodeError = orjson.JSONDecodeError


def dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON bytes."""
    try:
        return orjson.dumps(obj)
    except TypeError:  # an int beyond 64 bits, a lone surrogate
        return json.dumps(obj, separators=(",", ":")).encode()
