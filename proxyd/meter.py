"""Metering: admit (reserve) a request, then settle it with its actual usage or void it. Exactly once.

    ticket = await meter.reserve(...)  # limits checked and reserved (the Admission), or a Refusal
    ...forward, relay...
    await meter.settle(ticket, usage)  # admission posted; row + daily aggregate committed (awaited)
    or await meter.void(ticket, ...)   # admission released; row written as voided

The admission (proxyd/admission.py; in memory: proxyd/limits.py) decides; the meter adds what a
request is on the ledger. Which of settle or void ends a request is decided in one place, by the
pipeline (proxyd/pipeline.py).

The rows go to the Ledger (proxyd/storage/): the meter builds each one, a plain tuple in the ledger's column
order, and the ledger stores it; times on it come from the injected clock, as the limiter's do.

A request still running after ``pending_row_after_s`` gets a 'pending' row (queued, not awaited). If
the process dies, that row is found at the next start and marked 'expired' (its in-memory reservation
died with the process). Requests that end sooner — nearly all of them — are written once, when they
end: measured, the extra write per request cost about 12% of the proxy's CPU per request. The settle
*is* awaited, so usage is durable before the response's last byte.

Requests waiting for their pending row sit in one dict in admission order, swept by a single timer
that is due when the oldest is: cheaper than a timer per request (measured ~1.5% of the event loop's
samples for call_later + cancel), and the delay stays ``pending_row_after_s`` up to a loop turn.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from .accounts import Caller, User
from .admission import Admission, Refusal
from .errors import ServiceUnavailable
from .limits import Hold, Limits, SlidingMinute
from .limitspec import merge
from .periods import day_key, month_key
from .pricing import PriceTable, cost_nusd, usd_str
from .storage import Ledger, iso_ms


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    source: str  # "reported" by the upstream, "counted" by proxyd from what it relayed, or "none"
    cost_nusd: int | None = None  # the upstream's own price of the request (OpenRouter's usage.cost)


@dataclass
class Ticket:
    """One admitted request: its reservation plus what the ledger row needs."""

    request_id: str
    caller: Caller
    model: str
    endpoint: str
    stream: bool
    hold: Hold  # the admission's reservation handle
    started: float  # perf_counter, for latency
    upstream: str | None = None  # the configured upstream that served it (the last one tried)
    attempts: int = 0  # upstreams tried (more than one after a failover)

    @property
    def prompt_tokens(self) -> int:
        return self.hold.prompt_tokens

    @property
    def completion_tokens(self) -> int:
        return self.hold.completion_tokens


class Meter:
    def __init__(
        self,
        *,
        admission: Admission,
        ledger: Ledger,
        prices: PriceTable,
        config_limits: dict[str, Any],
        min_completion_tokens: int,
        pending_row_after_s: float = 1.0,
        metrics: Any = None,
    ) -> None:
        self.admission = admission
        # The in-memory engine behind it, if it is that one: seeded from the ledger at start, read by tests.
        # A shared admission (proxyd/redis_admission.py) seeds itself from the ledger when it finds no counters.
        self.limiter = getattr(admission, "limiter", None)
        self.ledger = ledger
        self.prices = prices
        self.defaults: Limits = config_limits.get("default", {})
        self.model_defaults: dict[str, Limits] = config_limits.get("models", {})
        self.user_config: dict[str, Limits] = config_limits.get("users", {})
        self.min_completion_tokens = min_completion_tokens
        self.pending_row_after_s = pending_row_after_s
        self.metrics = metrics
        self._awaiting_row: dict[str, Ticket] = {}  # request id -> ticket, oldest first (see _sweep)
        self._sweep_handle: asyncio.TimerHandle | None = None
        # (user, model) -> (the overrides object it was computed from, user limits, model limits)
        self._split_cache: dict[tuple[str, str], tuple[Limits, Limits, Limits]] = {}

    # -- limits in force -------------------------------------------------------------------------

    def effective(self, user: User) -> Limits:
        """config default <- config per-model defaults <- config user <- admin overrides."""
        return merge(
            self.defaults,
            {"models": self.model_defaults},
            self.user_config.get(user.user_id, {}),
            user.overrides,
        )

    def _split(self, user: User, model: str) -> tuple[Limits, Limits]:
        """The user's all-models limits and its limits for this model; cached until the admin API
        replaces the user's overrides (a new dict, so identity tells)."""
        key = (user.user_id, model)
        hit = self._split_cache.get(key)
        if hit is not None and hit[0] is user.overrides:
            return hit[1], hit[2]
        eff = self.effective(user)
        model_limits = eff.pop("models", {}).get(model, {})  # keys and model alike canonical (modelname.py)
        if len(self._split_cache) >= 50_000:  # model names come from clients: keep the cache bounded
            self._split_cache.clear()
        self._split_cache[key] = (user.overrides, eff, model_limits)
        return eff, model_limits

    # -- the request path ------------------------------------------------------------------------

    async def reserve(
        self,
        *,
        caller: Caller,
        model: str,
        endpoint: str,
        stream: bool,
        prompt_tokens: int,
        completion_tokens: int,
        completion_is_default: bool,
        request_id: str,
    ) -> Ticket | Refusal:
        """Reserves every limit of the request at once, or returns the admission's Refusal."""
        if self.ledger.unavailable:  # a shared ledger down: refuse now rather than fail the settle later
            raise ServiceUnavailable("The ledger database is unreachable: the request was not run and is not "
                                     "billed. Retry shortly.", headers={"Retry-After": "2"})
        user_limits, model_limits = self._split(caller.user, model)
        hold = await self.admission.reserve(
            user_id=caller.user.user_id,
            model=model,
            user_limits=user_limits,
            model_limits=model_limits,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            completion_is_default=completion_is_default,
            min_completion_tokens=self.min_completion_tokens,
            price=self.prices.reserve_price(model),
        )
        if type(hold) is Refusal:
            return hold
        ticket = Ticket(request_id, caller, model, endpoint, stream, hold, time.perf_counter())
        if self.pending_row_after_s > 0:
            self._awaiting_row[request_id] = ticket
            if self._sweep_handle is None:
                self._sweep_handle = asyncio.get_running_loop().call_later(self.pending_row_after_s, self._sweep)
        else:
            self._write_pending(ticket)
        return ticket

    def _sweep(self) -> None:
        """Writes the pending rows that are due, then sleeps until the next one is."""
        self._sweep_handle = None
        waiting = self._awaiting_row
        due = time.perf_counter() - self.pending_row_after_s
        while waiting:
            request_id = next(iter(waiting))  # the oldest admission still waiting
            ticket = waiting[request_id]
            if ticket.started > due:
                self._sweep_handle = asyncio.get_running_loop().call_later(ticket.started - due, self._sweep)
                return
            del waiting[request_id]
            self._write_pending(ticket)

    def _write_pending(self, ticket: Ticket) -> None:
        """The 'pending' row of a request still running: what a crash leaves behind to be expired."""
        self.ledger.record_pending(_row(ticket, "pending", None))

    def _stop_waiting_for_row(self, ticket: Ticket) -> None:
        # Finished before its pending row was due (nearly every request): one write only.
        self._awaiting_row.pop(ticket.request_id, None)

    async def settle(self, ticket: Ticket, usage: Usage, *, http_status: int = 200) -> None:
        """Posts actual usage; returns once the ledger row and the daily aggregate are committed."""
        self._stop_waiting_for_row(ticket)
        in_price, out_price = self.prices.settle_price(ticket.model, ticket.upstream)
        cost = usage.cost_nusd
        if cost is None:  # no cost reported: the price table's (the seed passes a reported one through as-is)
            cost = cost_nusd(usage.prompt_tokens, usage.completion_tokens, (in_price, out_price))
        await self.admission.settle(ticket.hold, usage.prompt_tokens, usage.completion_tokens, cost)
        if self.metrics:
            self.metrics.settled(ticket, usage)
        row = _row(ticket, "settled", self.ledger.clock(), http_status=http_status, usage=usage,
                   price=(in_price, out_price), cost=cost)
        await self.ledger.record_settled(row)  # the row and its share of the daily aggregate, one commit

    async def void(self, ticket: Ticket, *, http_status: int, error: str) -> None:
        """Releases the reservation; the row records why (not awaited). Nothing is billed."""
        self._stop_waiting_for_row(ticket)
        await self.admission.void(ticket.hold)
        if self.metrics:
            self.metrics.voided(ticket)
        self.ledger.record_voided(_row(ticket, "voided", self.ledger.clock(), http_status=http_status, error=error[:500]))

    # -- load and report -------------------------------------------------------------------------

    def load_usage(self) -> None:
        """Seeds the limiter with settled usage of today, this month and all time (from aggregates)."""
        if self.limiter is None:
            return
        now = self.limiter.clock()
        today, month = day_key(now), month_key(now)
        for rows, period in zip(self.ledger.period_usage(today, month), ("d" + today, "m" + month, "total")):
            for user_id, model, requests, tokens, cost in rows:
                self.limiter.load_used(user_id, model, period, requests, tokens, cost)
        self._load_last_minute(now)

    def _load_last_minute(self, now: float) -> None:
        """Seeds the per-minute windows with the requests admitted in the last minute, so a restart does
        not hand every user a fresh minute: settled ones with their tokens, voided ones as attempts
        (they count against requests per minute, see ``Limiter.void``)."""
        horizon = now - SlidingMinute.SPAN
        for t, user_id, model, tokens, voided in sorted(self.ledger.recent_requests(horizon)):
            if t > horizon:
                self.limiter.load_minute(user_id, model, t, tokens, attempt_only=voided)

    async def limit_status(self, user: User) -> list[dict[str, Any]]:
        """Every limit that applies to the user now: limit, used, reserved, remaining, resets_at."""
        now = self.admission.clock()
        eff = self.effective(user)
        models = eff.pop("models", {})
        out = []
        scopes = [("*", eff)] + [(m, lim) for m, lim in sorted(models.items())]
        for scope, limits in scopes:
            for c in await self.admission.status(user.user_id, scope, limits, now):
                usd = c.name.endswith("_usd")
                fmt = usd_str if usd else (lambda v: v)
                out.append(
                    {
                        "name": c.name,
                        "model": None if scope == "*" else scope,
                        "limit": fmt(c.limit),
                        "used": fmt(c.used),
                        "reserved": fmt(c.reserved),
                        "remaining": fmt(c.remaining),
                        "resets_at": iso_ms(c.reset_at) if c.reset_at else None,
                    }
                )
        return out


def _row(ticket: Ticket, status: str, finished_at: float | None, *, http_status: int | None = None,
         usage: Usage | None = None, price: tuple[int, int] | None = None, cost: int | None = None,
         error: str | None = None) -> tuple:
    """The request's ledger row (columns as proxyd.storage.REQUEST_COLUMNS). ``finished_at`` is the injected
    clock's time at the end (None while pending); the latency is measured on the monotonic clock."""
    hold = ticket.hold
    ended = status != "pending"
    return (
        ticket.request_id, ticket.caller.user.user_id, ticket.caller.key_id, ticket.model, ticket.endpoint,
        int(ticket.stream), status, day_key(hold.admitted_at), iso_ms(hold.admitted_at),
        hold.prompt_tokens, hold.completion_tokens, http_status,
        iso_ms(finished_at) if ended else None,
        int((time.perf_counter() - ticket.started) * 1000) if ended else None,
        usage.prompt_tokens if usage else None, usage.completion_tokens if usage else None,
        usage.source if usage else None, price[0] if price else None, price[1] if price else None, cost, error,
        ticket.upstream, ticket.attempts or None,
    )
