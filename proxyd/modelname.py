"""One name per model, the way Ollama matches names.

Ollama serves ``moondream``, ``moondream:latest``, ``MoonDream`` and
``registry.ollama.ai/library/moondream:latest`` as the same model: names are case-insensitive, the
default registry and namespace may be left out, and a missing tag means ``:latest``. proxyd's limits,
prices, token counting and ledger must see them as one model too: otherwise copying the id that
``/v1/models`` lists (``moondream:latest``) escapes a per-model limit set for ``moondream``, and a
spelling in another case is billed at the default price. So a requested model is recorded and looked
up under ``canonical(name)``, always with its tag (``moondream:latest``); what Ollama receives is
still what the client sent.

Keys of ``limits.models`` (config and admin API) name one model each, folded the same way
(``moondream`` is ``moondream:latest``): a limit is kept per model, and its usage is read back under
that one name. Keys of ``pricing`` and ``models`` (token counting) are stateless lookups and keep a
missing tag as written, so that such a key covers a family — ``llama3.2`` prices ``llama3.2:1b`` and
``llama3.2:3b`` — while a tagged key (``llama3.2:latest``) covers exactly one model. Those lookups try
the exact name, then the family (``family``), then any ``default``.
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


def canonical_keys(mapping: dict, where: str, *, per_model: bool = False, keep_last: bool = False) -> dict:
    """A config or API mapping keyed by model name, re-keyed by ``config_key`` (``per_model``: by
    ``canonical``, one model per key). Raises ValueError for a key that names no model, when two keys
    name the same model (which one was meant?) or a key would read as ``default``. With ``keep_last``
    (limits stored before this folding existed: refusing them would stop the start) the later key
    wins and a warning says so."""
    out: dict = {}
    for key, value in mapping.items():
        name = canonical(str(key)) if per_model else config_key(str(key))
        if (not name or name.startswith(":") or name.endswith(":")) and not keep_last:
            raise ValueError(f"{where}: '{key}' is not a model name")
        if name == "default" and key != "default" and not keep_last:
            raise ValueError(f"{where}: write the default entry as 'default', not '{key}'")
        if name in out:
            if not keep_last:
                raise ValueError(f"{where}: '{key}' names the same model as another key ('{name}')")
            log.warning("%s: '%s' names the same model as an earlier key ('%s'); the later one applies", where, key, name)
        out[name] = value
    return out
