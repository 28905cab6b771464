"""JSON on the request path: orjson, with the standard library as the fallback for what orjson will not write.

Why orjson: every proxied request is parsed (the client's body, Ollama's answer, each stream event) and
its body written again; orjson does that several times faster than ``json``, and since neither
releases the GIL, a 600 KB prompt holds the event loop (and every other request) for that much less.

Differences from ``json`` that matter here, all on the side of strictness:
- ``loads`` accepts UTF-8 only and refuses NaN/Infinity and unpaired surrogate escapes (not JSON text,
  and nothing Ollama or SQLite could store): the client gets a 400 for them;
- ``loads`` turns an integer beyond 64 bits into a float (validators then refuse it as not an integer);
- ``dumps`` refuses integers beyond 64 bits and strings with lone surrogates: those fall back to
  ``json`` (ASCII-escaped), so writing never fails;
- ``loads`` reads up to 1,024 levels of nesting but ``dumps`` writes only 254 (and ``json``, the
  fallback, about 990 before a RecursionError): a request body is therefore limited to MAX_DEPTH
  levels when it is read (``too_deep``), so that every body proxyd accepts can be forwarded.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

loads = orjson.loads  # bytes | str -> object; raises orjson.JSONDecodeError, a ValueError
JSONDecodeError = orjson.JSONDecodeError

# Nesting levels of arrays and objects a request body may have. Real ones use a handful (a tool's JSON
# schema perhaps a dozen); orjson.dumps stops at 254, so the body could not be forwarded past that, and
# Ollama's Go decoder would take 10,000. 128 is far above any real body and well inside what is written.
MAX_DEPTH = 128


def too_deep(raw: bytes, doc: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether ``doc`` (parsed from ``raw``) nests arrays/objects more than ``limit`` levels deep.

    A body cannot be nested deeper than it has opening brackets, so counting them (two C-level scans,
    ~0.1 µs per KB) settles nearly every body; brackets inside strings only make the count larger.
    Bodies with more than ``limit`` of them (long conversations, big schemas) get an exact walk of
    their containers, never of their text.
    """
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    stack = [(doc, 1)] if type(doc) is dict or type(doc) is list else []
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        for child in node.values() if type(node) is dict else node:
            if type(child) is dict or type(child) is list:
                stack.append((child, depth + 1))
    return False


def dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON bytes."""
    try:
        return orjson.dumps(obj)
    except TypeError:  # an int beyond 64 bits, a lone surrogate
        return json.dumps(obj, separators=(",", ":")).encode()
