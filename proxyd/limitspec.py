"""Limits as written: their names, what each measures, parsing (config and admin API) and merging.

A limit is a field name (``tokens_per_day``) that measures one ``Metric`` (requests, tokens or cost)
over one ``Window`` (a sliding minute, a UTC day or month, all time, or the requests in flight). The
admission (proxyd/limits.py in memory; see docs/DESIGN.md for a shared one) checks them; this module
only says what they are. USD amounts are kept as integer nano-USD (proxyd/pricing.py).
"""

from __future__ import annotations

import logging
import math
import re
from decimal import Decimal, InvalidOperation
from enum import IntEnum
from typing import Any

from .errors import InvalidRequest
from .modelname import canonical_keys
from .pricing import usd_str

log = logging.getLogger("proxyd.limits")

# The largest count limit (requests, tokens, concurrency): 2**53 - 1, the largest integer every JSON
# reader holds exactly (JavaScript's Number, Go's float64 — in which a client sees the limit shown back)
# and far beyond any quota (9e15 tokens). A JSON number past 64 bits reaches proxyd as a float already
# rounded (orjson), so only a bound below 2**53 can promise that the limit stored is the limit written.
MAX_COUNT = 2**53 - 1
# The largest USD amount: a bill no one runs up, whose nano-USD (1e21) is still an exact integer here.
# USD is shown as a decimal string, which every reader holds exactly.
MAX_USD = Decimal(10**12)
# A USD amount written as a string: digits, and at most 9 decimals (nano-USD, the unit kept). No sign,
# exponent, spaces, "_" or non-ASCII digits, which Decimal() and float() would all take.
_USD_TEXT = re.compile(r"[0-9]+(?:\.[0-9]{1,9})?")


class Metric(IntEnum):
    """What a limit counts; also the index of an amount in ``Bucket.used``/``reserved`` (an IntEnum
    indexes a list at C speed: names in the code, no cost per request)."""

    REQUESTS = 0
    TOKENS = 1
    COST = 2  # nano-USD


class Window:
    """Over what a limit counts (plain strings: they are compared on every admission)."""

    MINUTE = "minute"  # sliding, exact
    DAY = "day"  # UTC calendar day
    MONTH = "month"  # UTC calendar month
    TOTAL = "total"  # never resets
    CONCURRENT = "concurrent"  # requests in flight


# name -> (what it counts, over what)
LIMIT_FIELDS: dict[str, tuple[Metric, str]] = {
    "requests_per_minute": (Metric.REQUESTS, Window.MINUTE),
    "tokens_per_minute": (Metric.TOKENS, Window.MINUTE),
    "requests_per_day": (Metric.REQUESTS, Window.DAY),
    "tokens_per_day": (Metric.TOKENS, Window.DAY),
    "tokens_per_month": (Metric.TOKENS, Window.MONTH),
    "cost_per_day_usd": (Metric.COST, Window.DAY),
    "cost_per_month_usd": (Metric.COST, Window.MONTH),
    "total_tokens": (Metric.TOKENS, Window.TOTAL),
    "total_cost_usd": (Metric.COST, Window.TOTAL),
    "max_concurrent_requests": (Metric.REQUESTS, Window.CONCURRENT),
}
# Windows that free up within seconds: their refusals are retryable (RateLimited), the others are quotas.
SHORT_TERM = {Window.MINUTE, Window.CONCURRENT}
METRIC_NAMES = ("requests", "tokens", "cost")

Limits = dict[str, Any]  # field -> int (nano-USD for cost) | None (unlimited); "models" -> {model: Limits}


def parse_limits(raw: Any, where: str, *, allow_models: bool = True, stored: bool = False) -> Limits:
    """Validates a limits mapping from config or the admin API; USD amounts become nano-USD ints.

    Absent fields inherit; ``null`` means unlimited (kept as None so it overrides an inherited value).
    """
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InvalidRequest(f"{where} must be an object", param=where)
    out: Limits = {}
    for name, value in raw.items():
        if name == "models" and allow_models:
            if not isinstance(value, dict):
                raise InvalidRequest(f"{where}.models must be an object of model -> limits", param=f"{where}.models")
            # Parsed under the names the client wrote (errors name them), then keyed as requests are
            # looked up: by canonical model name (proxyd/modelname.py).
            parsed = {m: parse_limits(v, f"{where}.models.{m}", allow_models=False, stored=stored) for m, v in value.items()}
            try:
                out["models"] = canonical_keys(parsed, f"{where}.models", per_model=True, keep_last=stored)
            except ValueError as exc:
                raise InvalidRequest(str(exc), param=f"{where}.models") from None
            continue
        if name not in LIMIT_FIELDS:
            known = ", ".join(sorted(LIMIT_FIELDS))
            raise InvalidRequest(f"{where}: unknown limit '{name}' (known: {known})", param=f"{where}.{name}")
        out[name] = _parse_amount(name, value, f"{where}.{name}", stored)
    return out


def _parse_amount(name: str, value: Any, where: str, stored: bool = False) -> int | None:
    """One limit value: ``None`` (unlimited), a whole number of requests/tokens, or USD -> nano-USD.

    Counts are JSON integers from 0 to MAX_COUNT (an integral float such as ``1e3`` too: JSON has one
    number type); USD is a JSON number or a decimal string of at most 9 decimals, from 0 to MAX_USD.
    Values stored by an older proxyd that this refuses are read as it read them, clamped to the
    maximum, with a warning: refusing them would stop the start."""
    try:
        return _usd(value, where) if name.endswith("_usd") else _count(value, where)
    except InvalidRequest as exc:
        if not stored:
            raise
        legacy = _legacy_amount(name, value)
        if legacy is None:
            raise
        log.warning("%s; the stored value is read as %s (set the limit again to fix it)", exc.message, legacy)
        return legacy


def _count(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequest(f"{where} must be a whole number (0 to {MAX_COUNT}) or null", param=where)
    if isinstance(value, float) and not value.is_integer():  # NaN and infinity are not integers either
        raise InvalidRequest(f"{where} must be a whole number (0 to {MAX_COUNT}), not {value!r}", param=where)
    if value < 0:
        raise InvalidRequest(f"{where} must be >= 0", param=where)
    if value > MAX_COUNT:
        # Also what a JSON integer past 64 bits becomes: orjson reads it as an already-rounded float.
        raise InvalidRequest(f"{where} must be at most {MAX_COUNT} (use null for no limit)", param=where)
    return int(value)


def _usd(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InvalidRequest(f"{where} must be an amount of USD (a number or a decimal string such as \"12.50\") or null",
                             param=where)
    if isinstance(value, str):
        if not _USD_TEXT.fullmatch(value):
            raise InvalidRequest(
                f"{where} must be a decimal amount of USD such as \"12.50\" (digits, at most 9 decimals), not {value!r}",
                param=where)
        usd = Decimal(value)
    elif isinstance(value, float) and not math.isfinite(value):
        raise InvalidRequest(f"{where} must be a finite amount of USD", param=where)
    else:
        # repr: the shortest decimal that reads back as this float, i.e. the number as the client wrote it.
        usd = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    if usd < 0:
        raise InvalidRequest(f"{where} must be >= 0", param=where)
    if usd > MAX_USD:
        raise InvalidRequest(f"{where} must be at most {MAX_USD} USD (use null for no limit)", param=where)
    nusd = usd.scaleb(9)
    if nusd != nusd.to_integral_value():
        raise InvalidRequest(f"{where} has more than 9 decimals (the unit kept is 1e-9 USD)", param=where)
    return int(nusd)


def _legacy_amount(name: str, value: Any) -> int | None:
    """What proxyd before issue #12 made of a stored value (None if it refused it too), within range."""
    try:
        if name.endswith("_usd"):
            usd = Decimal(str(value))
            if not usd.is_finite() or usd < 0:
                return None
            return int(min(usd, MAX_USD).scaleb(9))
        if isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer() and value >= 0:
            return min(int(value), MAX_COUNT)
    except (InvalidOperation, ValueError, OverflowError):
        pass
    return None


def merge(*layers: Limits) -> Limits:
    """Later layers win field by field; ``models`` merge per model."""
    out: Limits = {}
    for layer in layers:
        for name, value in layer.items():
            if name == "models":
                models = out.setdefault("models", {})
                for model, lim in value.items():
                    models[model] = {**models.get(model, {}), **lim}
            else:
                out[name] = value
    return out


def to_api(limits: Limits) -> dict[str, Any]:
    """Limits as shown in the API: USD as decimal strings."""
    out: dict[str, Any] = {}
    for name, value in limits.items():
        if name == "models":
            out["models"] = {m: to_api(v) for m, v in value.items()}
        elif name.endswith("_usd") and value is not None:
            out[name] = usd_str(value)
        else:
            out[name] = value
    return out
