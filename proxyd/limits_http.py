"""Limits on the wire: the headers that describe them and the 429 that renders a refusal.

The admission (proxyd/admission.py) decides and returns values; only this module knows that a
refusal is an HTTP 429 with OpenAI's error type, Retry-After, OpenAI's x-ratelimit-* headers and
proxyd's own x-proxyd-limit-* ones.
"""

from __future__ import annotations

import time

from .admission import Check, Refusal, RefusalKind
from .errors import ProxyError, QuotaExceeded, RateLimited
from .limitspec import SHORT_TERM, Metric, Window
from .pricing import usd_str

REQUESTS, TOKENS = Metric.REQUESTS, Metric.TOKENS
MINUTE, CONCURRENT = Window.MINUTE, Window.CONCURRENT
_NOTHING = (0, 0, 0)  # what a refusal added: requests, tokens, nano-USD


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


def rate_headers(checks: list[Check], amounts: tuple[int, int, int], now: float, *, entered: bool,
                 long_term: bool = True) -> dict[str, str]:
    """The limit headers of a response, after this admission (``amounts``: the requests, tokens and
    nano-USD it added, indexed by Metric; all 0 for a refusal). Computed from the checks the admission
    itself made (no second pass over the windows), in one loop.

    - OpenAI's x-ratelimit-* describe the tightest *per-minute* request and token limits only: that is
      what they mean at OpenAI, and clients pace themselves by them (the openai SDK's users, LiteLLM,
      rate-limit middlewares). A user with no per-minute limit gets none, as OpenAI has no such user.
    - proxyd's x-proxyd-limit-* name the long-term (day, month, total) limit closest to running out,
      as the fraction of its quota left (requests, tokens and cost are not comparable otherwise);
      ``long_term=False`` when a refusal already named the long-term limit that refused.
    """
    headers: dict[str, str] = {}
    minute: list = [None, None]  # per Metric (requests, tokens): (left, check)
    tight = None  # (fraction left, left, check)
    for c in checks:
        metric = c.metric
        left = c.limit - c.used - c.reserved - amounts[metric]  # inline, not c.remaining: per request, per limit
        if c.window == MINUTE:
            best = minute[metric]
            if best is None or left < best[0]:
                minute[metric] = (left, c)
        elif long_term and c.window != CONCURRENT:
            fraction = left / c.limit if c.limit else 0.0
            if tight is None or fraction < tight[0]:
                tight = (fraction, left, c)
    for metric, suffix in ((REQUESTS, "requests"), (TOKENS, "tokens")):
        best = minute[metric]
        if best is not None:
            left, c = best
            headers[f"x-ratelimit-limit-{suffix}"] = str(c.limit)
            headers[f"x-ratelimit-remaining-{suffix}"] = str(left if left > 0 else 0)
            # Reset = time until the window is fully replenished: 60 s when this very request just
            # entered the sliding minute, else when its newest entry leaves.
            reset = 60.0 if entered else c.reset_at - now
            headers[f"x-ratelimit-reset-{suffix}"] = go_duration(max(0.0, reset))
    if tight is not None:
        headers.update(limit_headers(tight[2], tight[1]))
    return headers


def anthropic_rate_headers(checks: list[Check], amounts: tuple[int, int, int], now: float, *, entered: bool,
                           long_term: bool = True) -> dict[str, str]:
    """``rate_headers`` in Anthropic's words: anthropic-ratelimit-{requests,tokens}-{limit,remaining,reset}
    for the tightest per-minute limits, the reset as an RFC 3339 time. Anthropic also limits input and
    output tokens apart; proxyd's token limits count both together, so one such limit bounds each, and
    anthropic-ratelimit-input-tokens-* and -output-tokens-* repeat it (what a client pacing itself by
    either must not exceed). Long-term limits are named in proxyd's x-proxyd-limit-* as for OpenAI."""
    headers: dict[str, str] = {}
    minute: list = [None, None]
    tight = None
    for c in checks:
        metric = c.metric
        left = c.limit - c.used - c.reserved - amounts[metric]
        if c.window == MINUTE:
            if metric <= TOKENS and (minute[metric] is None or left < minute[metric][0]):
                minute[metric] = (left, c)
        elif long_term and c.window != CONCURRENT:
            fraction = left / c.limit if c.limit else 0.0
            if tight is None or fraction < tight[0]:
                tight = (fraction, left, c)
    for metric, names in ((REQUESTS, ("requests",)), (TOKENS, ("tokens", "input-tokens", "output-tokens"))):
        best = minute[metric]
        if best is not None:
            left, c = best
            reset = now + 60.0 if entered or c.reset_at is None else max(now, c.reset_at)
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(reset + 0.999))  # rounded up: not early
            for name in names:
                headers[f"anthropic-ratelimit-{name}-limit"] = str(c.limit)
                headers[f"anthropic-ratelimit-{name}-remaining"] = str(left if left > 0 else 0)
                headers[f"anthropic-ratelimit-{name}-reset"] = stamp
    if tight is not None:
        headers.update(limit_headers(tight[2], tight[1]))
    return headers


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


def refusal_error(refusal: Refusal, now: float, describe=rate_headers) -> ProxyError:
    """The 429 a refusal is: RateLimited when waiting seconds helps (the SDK retries it), else
    QuotaExceeded (x-should-retry: false), with its message, Retry-After and the limit headers.

    A day, month or total limit is named in proxyd's own x-proxyd-limit-* headers, never in
    x-ratelimit-*: OpenAI's headers describe per-minute windows, and pacing tools read them so (a
    daily quota shown there reads as "100 tokens a minute, wait 2h34m"). OpenAI sends its x-ratelimit-*
    headers on a 429 too: the state that refused, nothing added. ``describe``: the dialect's headers for
    the per-minute limits (``rate_headers``, ``anthropic_rate_headers``)."""
    c = refusal.limit
    if refusal.kind is RefusalKind.CONNECTIONS:
        return RateLimited(f"Too many open requests on this API key ({c.used}, the cap is {c.limit}).",
                           headers={"Retry-After": "1", "retry-after-ms": "1000"})
    err = _refusal_error(refusal)
    named = c.window not in SHORT_TERM
    if named:
        err.headers.update(limit_headers(c, c.remaining))
    for name, value in describe(refusal.checks, _NOTHING, now, entered=False, long_term=not named).items():
        err.headers.setdefault(name, value)
    return err


def _refusal_error(refusal: Refusal) -> ProxyError:
    c, need, kind = refusal.limit, refusal.need, refusal.kind
    where = "" if c.scope == "*" else f" for model {c.scope}"
    shown = (lambda v: "$" + usd_str(v)) if c.name.endswith("_usd") else str
    used = f"used {shown(c.used)}" + (f" + {shown(c.reserved)} reserved" if c.reserved else "")
    error_type = "tokens" if c.metric == TOKENS else "requests"  # OpenAI's type names what ran out
    if kind is RefusalKind.CLOSED:  # the admin has shut this door
        return QuotaExceeded(f"{c.name}{where} is 0: no request can be admitted under it.")
    if kind is RefusalKind.TOO_LARGE:
        what = "the prompt plus the smallest completion budget" if refusal.default_budget else "prompt plus max_tokens"
        fix = "Shorten the prompt." if refusal.default_budget else "Lower max_tokens or shorten the prompt."
        amount = f"{need} tokens" if c.metric == TOKENS else f"at least {shown(need)}"
        msg = f"Request too large for {c.name}{where}: it needs {amount} ({what}) but the limit is {shown(c.limit)}. {fix}"
        return QuotaExceeded(msg, code="request_too_large")
    if kind is RefusalKind.IN_FLIGHT:
        msg = (f"Rate limit reached for {c.name}{where}: {used} by requests in flight, of limit "
               f"{shown(c.limit)}. Try again when they finish.")
        return RateLimited(msg, headers={"Retry-After": "1", "retry-after-ms": "1000"}, type=error_type)
    retry = refusal.retry_after
    headers: dict[str, str] = {}
    if kind is RefusalKind.RATE:
        headers["Retry-After"] = str(max(1, int(retry + 0.999)))
        headers["retry-after-ms"] = str(int(retry * 1000))
        limit_str = f"{c.limit} concurrent requests" if c.window == CONCURRENT else f"limit {shown(c.limit)}"
        msg = f"Rate limit reached for {c.name}{where}: {used} of {limit_str}. Try again in {retry:.3g}s."
        return RateLimited(msg, headers=headers, type=error_type)
    if retry is not None:
        headers["Retry-After"] = str(int(retry + 0.999))
        resets = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(refusal.at + retry))
        msg = f"Quota exceeded for {c.name}{where}: {used} of limit {shown(c.limit)}. Resets at {resets}."
    else:
        msg = f"Quota exceeded for {c.name}{where}: {used} of limit {shown(c.limit)}. This limit does not reset."
    return QuotaExceeded(msg, headers=headers)
