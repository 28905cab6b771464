"""One name per model, the way Ollama parses and matches names.

Ollama serves ``moondream``, ``moondream:latest``, ``MoonDream``, ``moondream:local``,
``registry.ollama.ai/library/moondream:latest`` and ``https://registry.ollama.ai/library/moondream`` as
the same model. proxyd's limits, prices, token counting and ledger must see them as one model too:
otherwise a spelling Ollama accepts escapes a per-model limit or is billed at the default price. So a
requested model is recorded and looked up under ``canonical(name)``, always with its tag
(``moondream:latest``); what Ollama receives is still what the client sent.

The rules are a port of Ollama's own (ollama/ollama at fb30760996871fa9460115c753afd2c60d4ab0f7,
v0.33.0-rc2), in the order its handlers apply them (server/model_resolver.go ``parseAndValidateModelRef``):

1. ``internal/modelref`` ``ParseRef``: surrounding white space is trimmed (Go's ``strings.TrimSpace``);
   a last ``:cloud`` or ``:local`` (any case) names the source and is cut off, as is ``-cloud`` at the
   end of a tag (``gpt-oss:20b-cloud``); two source suffixes (``m:cloud:local``) are an error.
2. ``types/model/name.go`` ``ParseName``: ``[scheme://]host/namespace/model:tag``, split from the right
   (a ``:`` after the last ``/`` starts the tag; then model, namespace and host at each ``/``); the
   scheme is dropped; missing parts default to ``registry.ollama.ai``, ``library`` and ``latest``. A
   separator with nothing on one side (``moondream:``, ``/m``, ``a//m``) makes that part missing.
3. ``Name.IsValid``: every part present and valid — it starts with a letter, digit or ``_``; then
   host: also ``- _ . :`` (1..350 bytes); namespace: ``- _`` (1..80); model and tag: ``- _ .`` (1..80).
   ``@digest`` is not parsed at this version, so a name with ``@`` is invalid. Ollama answers 400
   ``invalid model name`` to anything else, and proxyd refuses it the same way before any reservation.
4. Ollama then looks the name up among installed models part by part with ``strings.EqualFold``
   (server/routes.go ``getExistingName``): names are case-insensitive. Valid parts are ASCII, so
   lower-casing them is that folding exactly.

The canonical form is Ollama's ``DisplayShortest`` of the folded name: ``moondream:latest``,
``namespace/model:tag``, ``host/namespace/model:tag``. A cloud model (``:cloud`` / ``-cloud``) keeps
Ollama's own name for it (``modelref.NormalizePullName``: ``gpt-oss:20b-cloud``, ``qwen3:cloud``): it
runs elsewhere and is a different model from the local one.

Keys of ``limits.models`` (config and admin API) name one model each, folded the same way
(``moondream`` is ``moondream:latest``): a limit is kept per model, and its usage is read back under
that one name. Keys of ``pricing`` and ``models`` (token counting) are stateless lookups and keep a
missing tag as written, so that such a key covers a family — ``llama3.2`` prices ``llama3.2:1b`` and
``llama3.2:3b`` — while a tagged key (``llama3.2:latest``) covers exactly one model. Those lookups try
the exact name, then the family (``family``), then any ``default``.
"""

from __future__ import annotations

import functools
import logging
import re
from typing import NamedTuple

log = logging.getLogger("proxyd.modelname")

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"
MISSING_PART = "!MISSING!"  # Ollama's marker for a part a separator promised; never valid

# Go's strings.TrimSpace trims what unicode.IsSpace calls space. Python's str.strip() also trims
# U+001C..U+001F, which Go keeps (and then refuses the name), so the set is spelled out.
_GO_SPACE = "\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"

# types/model/name.go isValidPart, one pattern per part kind (ASCII only: Go tests bytes).
_HOST = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,349}")
_NAMESPACE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,79}")
_MODEL = _TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}")


class Name(NamedTuple):
    """types/model/name.go ``Name``: parts as parsed, not necessarily valid."""

    host: str = ""
    namespace: str = ""
    model: str = ""
    tag: str = ""
    scheme: str = ""


class InvalidName(ValueError):
    """A name Ollama refuses; the message is Ollama's."""


def _cut_promised(s: str, sep: str) -> tuple[str, str, bool]:
    """name.go cutPromised: cut at the last ``sep``; an empty side becomes MISSING_PART."""
    i = s.rfind(sep)
    if i < 0:
        return s, "", False
    return s[:i] or MISSING_PART, s[i + len(sep):] or MISSING_PART, True


def parse_name_bare(s: str) -> Name:
    """name.go ParseNameBare: the parts as written, no defaults."""
    tag = ""
    # "/" is an illegal tag character, so a ":" after the last "/" starts the tag (a ":" before it
    # belongs to the host's port).
    if s.rfind(":") > s.rfind("/"):
        s, tag, _ = _cut_promised(s, ":")
    s, model, promised = _cut_promised(s, "/")
    if not promised:
        return Name(model=s, tag=tag)
    s, namespace, promised = _cut_promised(s, "/")
    if not promised:
        return Name(namespace=s, model=model, tag=tag)
    scheme, found, host = s.partition("://")
    if not found:
        scheme, host = "", s
    return Name(host, namespace, model, tag, scheme)


def parse_name(s: str) -> Name:
    """name.go ParseName: ParseNameBare merged with the defaults."""
    n = parse_name_bare(s)
    return Name(n.host or DEFAULT_HOST, n.namespace or DEFAULT_NAMESPACE, n.model, n.tag or DEFAULT_TAG,
                n.scheme or "https")


def is_valid(n: Name) -> bool:
    """name.go Name.IsValid (= IsFullyQualified): host, namespace, model and tag present and valid."""
    return bool(_HOST.fullmatch(n.host) and _NAMESPACE.fullmatch(n.namespace)
                and _MODEL.fullmatch(n.model) and _TAG.fullmatch(n.tag))


def name_string(n: Name) -> str:
    """name.go Name.String: the parts that are set, without the scheme."""
    out = (n.host + "/" if n.host else "") + (n.namespace + "/" if n.namespace else "") + n.model
    return out + (":" + n.tag if n.tag else "")


def display_shortest(n: Name) -> str:
    """name.go DisplayShortest: default host and namespace left out; model and tag always."""
    if n.host.lower() != DEFAULT_HOST:
        prefix = f"{n.host}/{n.namespace}/"
    elif n.namespace.lower() != DEFAULT_NAMESPACE:
        prefix = f"{n.namespace}/"
    else:
        prefix = ""
    return f"{prefix}{n.model}:{n.tag}"


def _source_suffix(raw: str) -> tuple[str, str]:
    """modelref parseSourceSuffix: (base, "cloud" | "local" | "")."""
    i = raw.rfind(":")
    if i >= 0:
        suffix_raw = raw[i + 1:].strip(_GO_SPACE)
        suffix = suffix_raw.lower()
        if suffix in ("cloud", "local"):
            return raw[:i], suffix
        if "/" not in suffix_raw and suffix.endswith("-cloud"):
            return raw[: i + 1] + suffix_raw[: -len("-cloud")], "cloud"
    return raw, ""


def parse_ref(raw: str) -> tuple[str, str]:
    """modelref ParseRef: (base name, source). Raises InvalidName for no name or two source suffixes."""
    raw = raw.strip(_GO_SPACE)
    if not raw:
        raise InvalidName("model is required")
    base, source = _source_suffix(raw)
    if source and _source_suffix(base)[1]:
        raise InvalidName(f"use either :local or :cloud, not both: {raw!r}")
    return base, source


def _fold(n: Name) -> Name:
    return Name(n.host.lower(), n.namespace.lower(), n.model.lower(), n.tag.lower())


def resolve(name: str) -> Name:
    """The model Ollama serves for ``name``, folded; a cloud model under Ollama's name for it
    (modelref.NormalizePullName). Raises InvalidName (Ollama: 400) for a name Ollama refuses."""
    base, source = parse_ref(name)
    n = parse_name(base)
    if not is_valid(n):
        raise InvalidName("invalid model name")
    if source == "cloud":
        # toLegacyCloudPullName: "gpt-oss:20b" -> "gpt-oss:20b-cloud", "qwen3" -> "qwen3:cloud"
        n = parse_name(base + "-cloud" if base.rfind(":") > base.rfind("/") else base + ":cloud")
    return _fold(n)


@functools.lru_cache(maxsize=1024)  # names repeat; a cache hit costs no Python call on the request path
def canonical(name: str) -> str:
    """A requested model as Ollama resolves it: ``' MoonDream'`` -> ``'moondream:latest'``,
    ``'https://registry.ollama.ai/library/moondream'`` -> ``'moondream:latest'``, ``'Llama3.2:1B'`` ->
    ``'llama3.2:1b'``, ``'hf.co/Org/M:Q4'`` -> ``'hf.co/org/m:q4'``. ``''`` for a name Ollama refuses
    (``'moondream:'``, ``':latest'``, ``'a/b:c/d'``, ``'m@sha256:...'``); ``why_invalid`` says why."""
    try:
        return display_shortest(resolve(name))
    except InvalidName:
        return ""


def why_invalid(name: str) -> str:
    """Ollama's message for a name ``canonical`` refuses."""
    try:
        resolve(name)
    except InvalidName as exc:
        return str(exc)
    return ""


def config_key(name: str) -> str:
    """A ``pricing``/``models`` key: folded like ``canonical`` but a missing tag stays missing (the key
    covers the family): ``'Registry.Ollama.ai/library/MoonDream'`` -> ``'moondream'``. ``''`` if invalid."""
    try:
        base, source = parse_ref(name)
        tagged = base.rfind(":") > base.rfind("/")
        n = resolve(name)
    except InvalidName:
        return ""
    full = display_shortest(n)
    return full if tagged or source == "cloud" else family(full)


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
        if not name:
            if not keep_last:
                raise ValueError(f"{where}: '{key}' is not a model name (Ollama: {why_invalid(str(key))})")
            # Stored before names were checked as Ollama checks them: no request can name it now.
            log.warning("%s: '%s' is not a model name Ollama accepts; ignored", where, key)
            continue
        if name == "default" and key != "default" and not keep_last:
            raise ValueError(f"{where}: write the default entry as 'default', not '{key}'")
        if name in out:
            if not keep_last:
                raise ValueError(f"{where}: '{key}' names the same model as another key ('{name}')")
            log.warning("%s: '%s' names the same model as an earlier key ('%s'); the later one applies", where, key, name)
        out[name] = value
    return out
