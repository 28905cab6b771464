"""Ollama's model names, as its handlers read them: the emulator's own port of the Go code.

Written from ollama/ollama at fb30760996871fa9460115c753afd2c60d4ab0f7 (v0.33.0-rc2), and on purpose
not from proxyd/modelname.py: the proxy folds names the same way, and a test double that borrowed the
proxy's code would agree with the proxy's bugs. The steps, in the order server/model_resolver.go
``parseAndValidateModelRef`` runs them:

- ``internal/modelref/modelref.go`` ``ParseRef``: trim white space; a last ``:cloud`` / ``:local`` (any
  case), or a tag ending in ``-cloud``, names where the model runs and is cut off; two of them are an
  error. ``NormalizePullName`` spells a cloud model ``model:tag-cloud`` or ``model:cloud``.
- ``types/model/name.go`` ``ParseName``: ``[scheme://]host/namespace/model:tag`` cut from the right, the
  missing parts filled from ``registry.ollama.ai``, ``library`` and ``latest``; a separator with an empty
  side yields ``!MISSING!`` (which no part rule accepts). ``IsValid`` checks every part byte by byte.
- ``server/routes.go`` ``getExistingName``: an installed model matches when every part is equal under
  ``strings.EqualFold``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

DEFAULT_HOST, DEFAULT_NAMESPACE, DEFAULT_TAG = "registry.ollama.ai", "library", "latest"
MISSING = "!MISSING!"

# What unicode.IsSpace calls space (strings.TrimSpace). Not str.strip()'s set: that one also trims
# U+001C..U+001F, which Go leaves in place.
GO_SPACE = (
    "\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)

_ALNUM_ = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")
# name.go isValidPart: after the first byte, '-' and '_' everywhere, '.' but not in a namespace, ':'
# only in a host. Lengths in bytes: 1..350 for a host, 1..80 for the others.
_HOST, _NAMESPACE, _MODEL, _TAG = range(4)
_EXTRA = {
    _HOST: frozenset(b"-_.:"),
    _NAMESPACE: frozenset(b"-_"),
    _MODEL: frozenset(b"-_."),
    _TAG: frozenset(b"-_."),
}
_MAX_LEN = {_HOST: 350, _NAMESPACE: 80, _MODEL: 80, _TAG: 80}


class ModelName(NamedTuple):
    host: str
    namespace: str
    model: str
    tag: str

    def is_valid(self) -> bool:
        """name.go IsValid (IsFullyQualified): all four parts present and well formed."""
        return all(_part_ok(kind, part) for kind, part in enumerate(self))

    def folded(self) -> tuple[str, str, str, str]:
        """What EqualFold compares. Valid parts are ASCII, where EqualFold is plain case folding."""
        return (self.host.lower(), self.namespace.lower(), self.model.lower(), self.tag.lower())


def _part_ok(kind: int, part: str) -> bool:
    data = part.encode("utf-8", "surrogatepass")
    if not 1 <= len(data) <= _MAX_LEN[kind]:
        return False
    # Go ranges over the string's runes and tests the byte where each one starts; a non-ASCII rune
    # starts with a byte >= 0x80, which no rule accepts, so testing every byte decides the same.
    if data[0] not in _ALNUM_:
        return False
    extra = _EXTRA[kind]
    return all(b in _ALNUM_ or b in extra for b in data[1:])


def _cut_last(s: str, sep: str) -> tuple[str, str, bool]:
    """name.go cutPromised: split at the last ``sep``; an empty side becomes MISSING."""
    i = s.rfind(sep)
    if i < 0:
        return s, "", False
    return s[:i] or MISSING, s[i + len(sep):] or MISSING, True


def parse_name(s: str) -> ModelName:
    """name.go ParseName: ParseNameBare, then the defaults for whatever was not written."""
    host = namespace = tag = ""
    if s.rfind(":") > s.rfind("/"):  # "/" cannot be in a tag, so this ":" is the tag's and not a port's
        s, tag, _ = _cut_last(s, ":")
    s, model, promised = _cut_last(s, "/")
    if not promised:
        model = s
    else:
        s, namespace, promised = _cut_last(s, "/")
        if not promised:
            namespace = s
        else:
            scheme, sep, rest = s.partition("://")
            host = rest if sep else scheme
    return ModelName(host or DEFAULT_HOST, namespace or DEFAULT_NAMESPACE, model, tag or DEFAULT_TAG)


def has_explicit_tag(name: str) -> bool:
    """modelref HasExplicitTag: a ':' after the last '/' (a registry port does not count)."""
    return name.rfind(":") > name.rfind("/")


class RefusedName(ValueError):
    """A name Ollama refuses (the message is Ollama's)."""


def _source_suffix(raw: str) -> tuple[str, str]:
    """modelref parseSourceSuffix: (what is left, "cloud" | "local" | "")."""
    i = raw.rfind(":")
    if i < 0:
        return raw, ""
    suffix_raw = raw[i + 1:].strip(GO_SPACE)
    suffix = suffix_raw.lower()
    if suffix in ("cloud", "local"):
        return raw[:i], suffix
    if "/" not in suffix_raw and suffix.endswith("-cloud"):
        return raw[:i + 1] + suffix_raw[: len(suffix_raw) - len("-cloud")], "cloud"
    return raw, ""


def parse_ref(raw: str) -> tuple[str, str]:
    """modelref ParseRef: (base name, source). Raises RefusedName as Ollama errs."""
    raw = raw.strip(GO_SPACE)
    if not raw:
        raise RefusedName("model is required")
    base, source = _source_suffix(raw)
    if source and _source_suffix(base)[1]:
        raise RefusedName(f"use either :local or :cloud, not both: {raw!r}")
    return base, source


@functools.lru_cache(maxsize=4096)  # a handful of names repeat on every request of a load test
def resolve(raw: str) -> ModelName | None:
    """The model a request names, or None when Ollama refuses the name. A cloud model is named as
    modelref.NormalizePullName names it (``qwen3:cloud``, ``gpt-oss:20b-cloud``): another model than
    the local one of the same name."""
    try:
        base, source = parse_ref(raw)
    except RefusedName:
        return None
    name = parse_name(base)
    if not name.is_valid():
        return None
    if source == "cloud":
        name = parse_name(base + "-cloud" if has_explicit_tag(base) else base + ":cloud")
    return name


def find(requested: str, installed: tuple) -> str | None:
    """The installed model (as configured) that ``requested`` names, as getExistingName matches it."""
    want = resolve(requested)
    if want is None:
        return None
    key = want.folded()
    for candidate in installed:
        have = resolve(candidate)
        if have is not None and have.folded() == key:
            return candidate
    return None


def listed_name(name: str) -> str:
    """How /v1/models lists an installed model: always with its tag."""
    return name if has_explicit_tag(name) else name + ":" + DEFAULT_TAG


def owner(name: str) -> str:
    """``owned_by`` in /v1/models: the name's namespace."""
    return parse_name(name).namespace
