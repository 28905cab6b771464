"""One name per model, the way Ollama matches names.

Ollama serves ``moondream``, ``moondream:latest``, ``MoonDream`` and
``registry.ollama.ai/library/moondream:latest`` as the same model: names are case-insensitive, the
default registry and namespace may be left out, and a missing tag means ``:latest``. proxyd's limits,
prices, token counting and ledger must see them as one model too: otherwise copying the id that
``/v1/models`` lists (``moondream:latest``) escapes a per-model limit set for ``moondream``, and a
spelling in another case is billed at the default price. So a requested model is recorded and looked
up under ``canonical(name)``, always with its tag (``moondream:latest``); what Ollama receives is
still what the client sent.

Keys in config and in the admin API (``pricing``, ``models``, ``limits.models``) go through
``config_key``: the same folding, but a key without a tag stays without one, because such a key names
a family — ``moondream`` applies to ``moondream:latest``, ``llama3.2`` to ``llama3.2:1b`` and
``llama3.2:3b`` — while a tagged key (``llama3.2:latest``) names exactly one model. Lookups try the
exact name, then the family (``family``), then any ``default``.
"""

from __future__ import annotations

import logging

log = logging.getLogger("proxyd.modelname")

_DEFAULT_PREFIXES = ("registry.ollama.ai/", "library/")


def config_key(name: str) -> str:
    """``'Registry.Ollama.ai/library/MoonDream'`` -> ``'moondream'``; tags are kept as written."""
    name = name.strip().lower()
    for prefix in _DEFAULT_PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name


def canonical(name: str) -> str:
    """A requested model as Ollama resolves it: ``' MoonDream'`` -> ``'moondream:latest'``,
    ``'Llama3.2:1B'`` -> ``'llama3.2:1b'``. Other registries and namespaces stay (``hf.co/org/m:q4``).
    An empty result (``''``, ``':latest'``) is not a model name."""
    name = config_key(name)
    if not name or name.startswith(":"):
        return ""
    return name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"


def family(name: str) -> str:
    """The untagged name a family key would use: ``'llama3.2:1b'`` -> ``'llama3.2'``."""
    return name.rsplit(":", 1)[0] if ":" in name.rsplit("/", 1)[-1] else name


def canonical_keys(mapping: dict, where: str, *, keep_last: bool = False) -> dict:
    """A config or API mapping keyed by model name, re-keyed by ``config_key``. Raises ValueError when
    two keys name the same model (which one was meant?) or a key would read as ``default``. With
    ``keep_last`` (limits stored before this folding existed: refusing them would stop the start) the
    later key wins and a warning says so."""
    out: dict = {}
    for key, value in mapping.items():
        name = config_key(str(key))
        if name == "default" and key != "default" and not keep_last:
            raise ValueError(f"{where}: write the default entry as 'default', not '{key}'")
        if name in out:
            if not keep_last:
                raise ValueError(f"{where}: '{key}' names the same model as another key ('{name}')")
            log.warning("%s: '%s' names the same model as an earlier key ('%s'); the later one applies", where, key, name)
        out[name] = value
    return out
