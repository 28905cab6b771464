"""Limits: their names, how configured and overridden limits merge, and the in-memory admission state.

Every limit is checked against ``used + reserved + this request`` at admission, synchronously on the
event loop (no await between check and increment), so two concurrent requests can never both pass a
check that only one fits: the event loop is the lock. A reservation is a ``Hold`` (pending) that ends
exactly once, posted with the actual usage (``settle``) or released (``void``), like TigerBeetle's
two-phase transfers.

Windows:
- per minute: a sliding log (each admitted request is an entry with its timestamp and tokens), exact:
  no boundary burst as with fixed windows; an entry's tokens are corrected to the actual at settle;
- per day / month: UTC calendar periods; a request is billed to the period in which it was admitted;
- total: never resets;
- concurrency: requests in flight.

Money is integer nano-USD (1e-9 USD). Amounts are ``[requests, tokens, cost_nusd]`` lists.
"""

from __future__ import annotations

import calendar
import logging
import math
import re
import time
from collections import deque
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, Callable

from .errors import InvalidRequest, QuotaExceeded, RateLimited
from .modelname import canonical_keys

log = logging.getLogger("proxyd.limits")

NANO = 10**9
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

# name -> (metric index into an amount [requests, tokens, cost], window)
LIMIT_FIELDS: dict[str, tuple[int, str]] = {
    "requests_per_minute": (0, "minute"),
    "tokens_per_minute": (1, "minute"),
    "requests_per_day": (0, "day"),
    "tokens_per_day": (1, "day"),
    "tokens_per_month": (1, "month"),
    "cost_per_day_usd": (2, "day"),
    "cost_per_month_usd": (2, "month"),
    "total_tokens": (1, "total"),
    "total_cost_usd": (2, "total"),
    "max_concurrent_requests": (0, "concurrent"),
}
SHORT_TERM = {"minute", "concurrent"}
METRIC_NAMES = ("requests", "tokens", "cost")

Limits = dict[str, Any]  # field -> int (nano-USD for cost) | None (unlimited); "models" -> {model: Limits}


# -- parsing and merging ---------------------------------------------------------------------------


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


def usd_str(nusd: int) -> str:
    whole, frac = divmod(abs(nusd), NANO)
    return f"{'-' if nusd < 0 else ''}{whole}.{frac:09d}"


# -- periods ---------------------------------------------------------------------------------------


_CAL: tuple = (None, None)  # (whole second, (day key, month key, day end, month end)), swapped atomically


def _calendar(t: float) -> tuple:
    """Day/month keys and period ends of the UTC second containing t, computed once per second."""
    global _CAL
    s = int(t // 1)
    cached = _CAL
    if cached[0] == s:
        return cached[1]
    g = time.gmtime(s)
    day_end = calendar.timegm((g.tm_year, g.tm_mon, g.tm_mday, 0, 0, 0)) + 86400
    year, month = (g.tm_year + 1, 1) if g.tm_mon == 12 else (g.tm_year, g.tm_mon + 1)
    values = (f"{g.tm_year:04d}-{g.tm_mon:02d}-{g.tm_mday:02d}", f"{g.tm_year:04d}-{g.tm_mon:02d}",
              day_end, calendar.timegm((year, month, 1, 0, 0, 0)))
    _CAL = (s, values)
    return values


def day_key(t: float) -> str:
    return _calendar(t)[0]


def month_key(t: float) -> str:
    return _calendar(t)[1]


def period_end(window: str, t: float) -> float | None:
    """When the calendar period containing t ends (UTC), or None for total."""
    if window == "day":
        return _calendar(t)[2]
    if window == "month":
        return _calendar(t)[3]
    return None


def go_duration(seconds: float) -> str:
    """OpenAI's reset format: Go-style durations such as 6m0s, 1.5s, 23h47m36s."""
    if seconds < 1:
        return f"{max(0, int(seconds * 1000))}ms"
    s = int(seconds)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    if h:
        return f"{h}h{m}m{sec}s"
    if m:
        return f"{m}m{sec}s"
    frac = seconds - s
    return f"{s}s" if frac < 0.001 else f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"


# -- admission state -------------------------------------------------------------------------------


class SlidingMinute:
    """Per-minute sliding log: one entry (time, requests, tokens) per admitted request, sums kept
    incrementally. The entries live in three parallel deques of plain numbers, addressed by a sequence
    number, instead of one list per entry: numbers are not tracked by Python's cyclic GC, while a
    minute of lists at 1,500 requests/s (two windows each) was ~180k tracked objects that every full
    collection had to walk (measured: 26 ms pauses and ~8% of the CPU; docs/DESIGN.md)."""

    __slots__ = ("times", "reqs", "toks", "base", "requests", "tokens")
    SPAN = 60.0

    def __init__(self) -> None:
        self.times: deque[float] = deque()
        self.reqs: deque[int] = deque()
        self.toks: deque[int] = deque()
        self.base = 0  # sequence number of the oldest entry still held
        self.requests = 0
        self.tokens = 0

    def expire(self, now: float) -> None:
        times = self.times
        horizon = now - self.SPAN
        while times and times[0] <= horizon:
            times.popleft()
            self.requests -= self.reqs.popleft()
            self.tokens -= self.toks.popleft()
            self.base += 1

    def add(self, now: float, tokens: int) -> int:
        """Enters a request; returns its sequence number (for ``adjust``)."""
        self.times.append(now)
        self.reqs.append(1)
        self.toks.append(tokens)
        self.requests += 1
        self.tokens += tokens
        return self.base + len(self.times) - 1

    def adjust(self, seq: int, requests: int, tokens: int) -> None:
        """Corrects a still-live entry (settle: actual tokens; void: nothing)."""
        i = seq - self.base
        if i < 0:  # already expired out of the window: nothing left to correct
            return
        self.requests += requests - self.reqs[i]
        self.tokens += tokens - self.toks[i]
        self.reqs[i] = requests
        self.toks[i] = tokens

    @property
    def entries(self) -> list[tuple[float, int, int]]:
        return list(zip(self.times, self.reqs, self.toks))

    def used(self, metric: int) -> int:
        return self.requests if metric == 0 else self.tokens

    def reset_in(self, now: float) -> float:
        return (self.times[-1] + self.SPAN - now) if self.times else 0.0

    def free_at(self, metric: int, need: int, now: float) -> float:
        """Earliest time at which ``need`` units of the metric will have left the window."""
        freed = 0
        for t, r, k in zip(self.times, self.reqs, self.toks):
            freed += r if metric == 0 else k
            if freed >= need:
                return t + self.SPAN
        return now + self.SPAN


@dataclass(slots=True)
class Bucket:
    """Used and reserved amounts of one user/scope in one calendar period (or total)."""

    used: list = field(default_factory=lambda: [0, 0, 0])
    reserved: list = field(default_factory=lambda: [0, 0, 0])


@dataclass(slots=True)
class Hold:
    """A pending reservation. Ended exactly once by ``Limiter.settle`` or ``Limiter.void``."""

    user_id: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    cost_nusd: int
    admitted_at: float
    buckets: list  # Bucket objects reserved against
    minute_entries: list  # (SlidingMinute, sequence number)
    concurrency_keys: list
    checks: list  # (Check, metric, window) as they stood just before this admission
    state: str = "pending"

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(slots=True)
class Check:
    """One limit that applies to a request, with what is used and reserved against it."""

    scope: str  # "*" (all models) or a model name
    name: str
    limit: int
    used: int
    reserved: int
    reset_at: float | None  # when the window frees (None: never)

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.used - self.reserved)


class Limiter:
    """All in-memory admission state of one proxy process."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.buckets: dict[tuple[str, str, str], Bucket] = {}
        self.minutes: dict[tuple[str, str], SlidingMinute] = {}
        self.concurrent: dict[tuple[str, str], int] = {}
        self.pending = 0  # holds not yet ended: 0 whenever the proxy is idle
        self._today = ""

    # -- state loading ---------------------------------------------------------------------

    def load_used(self, user_id: str, model: str, period: str, requests: int, tokens: int, cost: int) -> None:
        """Seeds settled usage (from the ledger at start) for both the model and the all-models scope."""
        for scope in (model, "*"):
            b = self._bucket(user_id, scope, period)
            b.used[0] += requests
            b.used[1] += tokens
            b.used[2] += cost

    def load_minute(self, user_id: str, model: str, t: float, tokens: int, *, attempt_only: bool = False) -> None:
        """Seeds one request of the last minute (at start; call in time order). A voided one is an
        attempt: one request in the all-models window, no tokens (as ``void`` leaves it)."""
        for scope in ("*",) if attempt_only else (model, "*"):
            self._minute(user_id, scope, t).add(t, 0 if attempt_only else tokens)

    def _bucket(self, user_id: str, scope: str, period: str) -> Bucket:
        key = (user_id, scope, period)
        b = self.buckets.get(key)
        if b is None:
            b = self.buckets[key] = Bucket()
        return b

    def _minute(self, user_id: str, scope: str, now: float) -> SlidingMinute:
        key = (user_id, scope)
        w = self.minutes.get(key)
        if w is None:
            w = self.minutes[key] = SlidingMinute()
        w.expire(now)
        return w

    # -- the checks ----------------------------------------------------------------------------

    def checks(self, user_id: str, scope: str, limits: Limits, now: float) -> list[tuple[Check, int, str]]:
        """Every configured (non-null) limit of one scope: (Check, metric index, window)."""
        out = []
        periods = {"day": "d" + day_key(now), "month": "m" + month_key(now), "total": "total"}
        for name, value in limits.items():
            if value is None or name == "models":
                continue
            metric, window = LIMIT_FIELDS[name]
            if window == "minute":
                w = self._minute(user_id, scope, now)
                c = Check(scope, name, value, w.used(metric), 0, now + w.reset_in(now))
            elif window == "concurrent":
                c = Check(scope, name, value, self.concurrent.get((user_id, scope), 0), 0, None)
            else:
                b = self.buckets.get((user_id, scope, periods[window]))
                used, reserved = (b.used[metric], b.reserved[metric]) if b else (0, 0)
                c = Check(scope, name, value, used, reserved, period_end(window, now))
            out.append((c, metric, window))
        return out

    def reserve(
        self,
        *,
        user_id: str,
        model: str,
        user_limits: Limits,
        model_limits: Limits,
        prompt_tokens: int,
        completion_tokens: int,
        completion_is_default: bool,
        min_completion_tokens: int,
        price: tuple[int, int],
    ) -> Hold:
        """Admits a request or raises RateLimited / QuotaExceeded. No await inside: atomic on the loop.

        When the completion budget is proxyd's default (the client set no max_tokens) and does not fit a
        token or cost limit, it is shrunk to what fits (not below ``min_completion_tokens``): the client
        asked for no particular length, so answering shorter beats refusing. An explicit max_tokens is
        the client's contract and is refused instead of silently cut.
        """
        now = self.clock()
        if day_key(now) != self._today:
            self._drop_old_periods(now)
        all_checks = self.checks(user_id, "*", user_limits, now) + self.checks(user_id, model, model_limits, now)
        in_price, out_price = price

        # 1. How many completion tokens fit every token and cost limit?
        fit = completion_tokens
        binding: tuple[Check, str] | None = None
        for c, metric, window in all_checks:
            if metric == 0:
                continue
            room = c.limit - c.used - c.reserved
            if metric == 1:
                can = room - prompt_tokens
            else:
                room_after_prompt = room * 10**6 - prompt_tokens * in_price
                can = room_after_prompt // out_price if out_price else (completion_tokens if room_after_prompt >= 0 else -1)
            if can < fit:
                fit, binding = can, (c, window)
        if binding is not None:
            if completion_is_default and fit >= min_completion_tokens:
                completion_tokens = fit
            else:
                # What the smallest admissible form of this request needs of each limit, in the limit's
                # unit: with proxyd's default budget the prompt plus min_completion_tokens (the budget
                # would have been shrunk that far), not the full default the client never asked for.
                # A limit it exceeds even with nothing used is the answer ("never fits": change the
                # request; the one it exceeds most, so that a fix for it fits the others), whichever
                # limit is tightest now; otherwise the tightest ("wait or top up").
                least = min_completion_tokens if completion_is_default else completion_tokens

                def need_of(metric: int) -> int:
                    if metric == 1:
                        return prompt_tokens + least
                    return -(-(prompt_tokens * in_price + least * out_price) // 10**6)  # rounded up: exact

                c, window = binding
                worst = 1.0
                for check, metric, win in all_checks:
                    if metric != 0:
                        over = need_of(metric) / check.limit if check.limit else float("inf")
                        if over > worst:
                            c, window, worst = check, win, over
                need = need_of(LIMIT_FIELDS[c.name][0])
                raise self._refusal(c, window, now, need, user_id, all_checks, default_budget=completion_is_default)

        # 2. Requests and concurrency.
        for c, metric, window in all_checks:
            if metric == 0 and c.used + c.reserved + 1 > c.limit:
                raise self._refusal(c, window, now, 1, user_id, all_checks)

        # 3. Reserve against every window of both scopes (also those without a limit, so usage reads stay
        #    cheap and a limit set later sees what is already in flight).
        tokens = prompt_tokens + completion_tokens
        cost = _cost(prompt_tokens, completion_tokens, price)
        periods = ("d" + day_key(now), "m" + month_key(now), "total")
        buckets, entries, conc = [], [], []
        for scope in ("*", model):
            for period in periods:
                b = self._bucket(user_id, scope, period)
                b.reserved[0] += 1
                b.reserved[1] += tokens
                b.reserved[2] += cost
                buckets.append(b)
            w = self._minute(user_id, scope, now)
            entries.append((w, w.add(now, tokens)))
            key = (user_id, scope)
            self.concurrent[key] = self.concurrent.get(key, 0) + 1
            conc.append(key)
        self.pending += 1
        return Hold(user_id, model, prompt_tokens, completion_tokens, cost, now, buckets, entries, conc, all_checks)

    def _drop_old_periods(self, now: float) -> None:
        """Once a day: forget buckets of past days/months that nothing is reserved against any more,
        so memory stays bounded by users x models, not by how long the process has run."""
        self._today = day_key(now)
        current = {"d" + self._today, "m" + month_key(now), "total"}
        for key in [k for k, b in self.buckets.items() if k[2] not in current and not any(b.reserved)]:
            del self.buckets[key]

    def settle(self, hold: Hold, prompt_tokens: int, completion_tokens: int, cost_nusd: int) -> None:
        """Posts the actual usage in place of the reservation. Exactly once per hold."""
        self._end(hold, "settled")
        tokens = prompt_tokens + completion_tokens
        for b in hold.buckets:
            b.used[0] += 1
            b.used[1] += tokens
            b.used[2] += cost_nusd
        for w, entry in hold.minute_entries:
            w.adjust(entry, 1, tokens)

    def void(self, hold: Hold) -> None:
        """Releases the reservation: nothing is billed. The attempt still counts against the user's
        requests per minute (all-models scope): a request Ollama failed on (a 500, an unknown model)
        took Ollama's time too, and if failures were free a client could repeat one without limit.
        Its tokens are released, and so is the model scope's entry, so that made-up model names
        leave no state behind (``_forget_if_unused``)."""
        self._end(hold, "voided")
        (all_models, seq), *per_model = hold.minute_entries  # reserve() enters the "*" scope first
        all_models.adjust(seq, 1, 0)
        for w, entry in per_model:
            w.adjust(entry, 0, 0)
        self._forget_if_unused(hold.user_id, hold.model, hold.admitted_at)

    def _forget_if_unused(self, user_id: str, scope: str, t: float) -> None:
        """Drops a model scope's state when nothing is used or reserved in it (every request to it was
        voided, e.g. a model name Ollama does not have): model names come from clients, and made-up
        ones must not pile up state for the life of the process."""
        keys = [(user_id, scope, p) for p in ("d" + day_key(t), "m" + month_key(t), "total")]
        if any(k in self.buckets and (any(self.buckets[k].used) or any(self.buckets[k].reserved)) for k in keys):
            return
        w = self.minutes.get((user_id, scope))
        if (w is not None and (w.requests or w.tokens)) or self.concurrent.get((user_id, scope)):
            return
        for k in keys:
            self.buckets.pop(k, None)
        self.minutes.pop((user_id, scope), None)
        self.concurrent.pop((user_id, scope), None)

    def _end(self, hold: Hold, state: str) -> None:
        if hold.state != "pending":
            raise RuntimeError(f"hold already {hold.state}")
        hold.state = state
        for b in hold.buckets:
            b.reserved[0] -= 1
            b.reserved[1] -= hold.tokens
            b.reserved[2] -= hold.cost_nusd
        for key in hold.concurrency_keys:
            self.concurrent[key] -= 1
        self.pending -= 1

    # -- refusals and headers ------------------------------------------------------------------

    def _refusal(self, c: Check, window: str, now: float, need: int, user_id: str, checks: list, *,
                 default_budget: bool = False):
        """The refusal for limit ``c``. ``need`` is what the request needs of it, in the limit's unit
        (requests, tokens or nano-USD): more than the whole limit means it can never fit (not
        retryable, and the client is told what to change); otherwise it fits once usage frees up.
        The error carries every check made (``checks``), for the x-ratelimit-* headers of the 429.

        A day, month or total limit is named in proxyd's own x-proxyd-limit-* headers, never in
        x-ratelimit-*: OpenAI's headers describe per-minute windows, and pacing tools read them so
        (a daily quota shown there reads as "100 tokens a minute, wait 2h34m")."""
        err = self._refusal_error(c, window, now, need, user_id, default_budget)
        err.checks = checks
        if window not in SHORT_TERM:
            err.headers.update(limit_headers(c, c.remaining))
        return err

    def _refusal_error(self, c: Check, window: str, now: float, need: int, user_id: str, default_budget: bool):
        where = "" if c.scope == "*" else f" for model {c.scope}"
        shown = (lambda v: "$" + usd_str(v)) if c.name.endswith("_usd") else str
        used = f"used {shown(c.used)}" + (f" + {shown(c.reserved)} reserved" if c.reserved else "")
        headers: dict[str, str] = {}
        metric = LIMIT_FIELDS[c.name][0]
        if need > c.limit:
            if c.limit == 0:  # the admin has shut this door
                msg = f"{c.name}{where} is 0: no request can be admitted under it."
                return QuotaExceeded(msg)
            what = "the prompt plus the smallest completion budget" if default_budget else "prompt plus max_tokens"
            fix = "Shorten the prompt." if default_budget else "Lower max_tokens or shorten the prompt."
            amount = f"{need} tokens" if metric == 1 else f"at least {shown(need)}"
            msg = f"Request too large for {c.name}{where}: it needs {amount} ({what}) but the limit is {shown(c.limit)}. {fix}"
            return QuotaExceeded(msg, code="request_too_large")
        if c.reserved and need <= c.limit - c.used:
            # It fits once requests in flight settle (they reserved the room; an answer without
            # max_tokens may hold all that is left): a matter of seconds, not of the period's end.
            msg = (f"Rate limit reached for {c.name}{where}: {used} by requests in flight, of limit "
                   f"{shown(c.limit)}. Try again when they finish.")
            return RateLimited(msg, headers={"Retry-After": "1", "retry-after-ms": "1000"},
                               type="tokens" if metric == 1 else "requests")
        if window == "concurrent":
            retry = 1.0
        elif window == "minute":
            w = self.minutes[(user_id, c.scope)]
            short = need - (c.limit - c.used)
            retry = max(0.001, w.free_at(metric, short, now) - now)
        else:
            retry = (c.reset_at - now) if c.reset_at else None

        if window in SHORT_TERM:
            headers["Retry-After"] = str(max(1, int(retry + 0.999)))
            headers["retry-after-ms"] = str(int(retry * 1000))
            limit_str = f"{c.limit} concurrent requests" if window == "concurrent" else f"limit {shown(c.limit)}"
            msg = f"Rate limit reached for {c.name}{where}: {used} of {limit_str}. Try again in {retry:.3g}s."
            # OpenAI's error type names what ran out: "requests" or "tokens" per minute.
            return RateLimited(msg, headers=headers, type="tokens" if metric == 1 else "requests")
        if retry is not None:
            headers["Retry-After"] = str(int(retry + 0.999))
            resets = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + retry))
            msg = f"Quota exceeded for {c.name}{where}: {used} of limit {shown(c.limit)}. Resets at {resets}."
        else:
            msg = f"Quota exceeded for {c.name}{where}: {used} of limit {shown(c.limit)}. This limit does not reset."
        return QuotaExceeded(msg, headers=headers)


_RESET_TEXT: dict[float, str] = {}  # period end -> its ISO text; a handful of distinct values a month


def limit_headers(c: Check, remaining: int) -> dict[str, str]:
    """proxyd's headers naming a long-term (day, month, total) limit: which one, its quota and what is
    left in the limit's unit (USD as a decimal string for ``*_usd``), and when its period resets, as an
    absolute UTC time (ISO 8601): periods end at fixed calendar instants, so the value is exact, the
    same on every response of the period and does not go stale in a log or a cache; the relative wait
    is the refusal's Retry-After. A total limit never resets: no reset header."""
    shown = usd_str if c.name.endswith("_usd") else str
    headers = {"x-proxyd-limit": c.name, "x-proxyd-limit-quota": shown(c.limit),
               "x-proxyd-limit-remaining": shown(remaining if remaining > 0 else 0)}
    if c.scope != "*":
        headers["x-proxyd-limit-model"] = c.scope
    if c.reset_at is not None:
        text = _RESET_TEXT.get(c.reset_at)
        if text is None:
            if len(_RESET_TEXT) > 16:
                _RESET_TEXT.clear()
            text = _RESET_TEXT[c.reset_at] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(c.reset_at))
        headers["x-proxyd-limit-reset"] = text
    return headers


def _cost(prompt_tokens: int, completion_tokens: int, price: tuple[int, int]) -> int:
    """nano-USD, rounded half up; prices are nano-USD per million tokens."""
    return (prompt_tokens * price[0] + completion_tokens * price[1] + 500_000) // 1_000_000


cost_nusd = _cost
