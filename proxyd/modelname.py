"""One name per model, the way Ollama matches names.

Ollama serves ``moondream``, ``moondream:latest``, ``MoonDream`` and
``registry.ollama.ai/library/moondream:latest`` as the same model (names are case-insensitive, the
default registry and namespace may be left out, and ``:latest`` is implied). proxyd's limits, prices,
token counting and ledger must see them as one model too: otherwise copying the id that ``/v1/models``
lists (``moondream:latest``) escapes a per-model limit set for ``moondream``, and a spelling in
another case is billed at the default price. So every model name that proxyd looks up or records —
from a request, from config or from the admin API — goes through ``canonical`` first. What Ollama
receives is still what the client sent.
"""

from __future__ import annotations

_DEFAULT_PREFIXES = ("registry.ollama.ai/", "library/")


def canonical(name: str) -> str:
    """``' Registry.Ollama.ai/library/MoonDream:latest'`` -> ``'moondream'``; ``'Llama3.2:1B'`` ->
    ``'llama3.2:1b'``. Other registries and namespaces stay (``hf.co/org/model:q4``)."""
    name = name.strip().lower()
    for prefix in _DEFAULT_PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name.removesuffix(":latest")


def canonical_keys(mapping: dict, where: str) -> dict:
    """A config or API mapping keyed by model name, re-keyed by canonical name. Two keys naming the
    same model raise ValueError (which one was meant?). ``default`` is not a model name and stays."""
    out: dict = {}
    for key, value in mapping.items():
        name = "default" if key == "default" else canonical(str(key))
        if name in out:
            raise ValueError(f"{where}: '{key}' names the same model as another key ('{name}')")
        out[name] = value
    return out
