"""The in-memory admission engine: every limit of one proxy process, checked and reserved on the loop.

Every limit is checked against ``used + reserved + this request`` at admission, synchronously on the
event loop (no await between check and increment), so two concurrent requests can never both pass a
check that only one fits: the event loop is the lock. A reservation is a ``Hold`` (pending) that ends
exactly once, posted with the actual usage (``settle``) or released (``void``), like TigerBeetle's
two-phase transfers. A request that does not fit gets a ``Refusal`` value (proxyd/admission.py), which
the HTTP layer renders (proxyd/limits_http.py): nothing here speaks HTTP.

Windows (proxyd/limitspec.py names them):
- per minute: a sliding log (each admitted request is an entry with its timestamp and tokens), exact:
  no boundary burst as with fixed windows; an entry's tokens are corrected to the actual at settle;
- per day / month: UTC calendar periods (proxyd/periods.py); billed to the period of admission;
- total: never resets;
- concurrency: requests in flight.

Money is integer nano-USD (1e-9 USD). Amounts are lists indexed by ``Metric`` (requests, tokens, cost).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from .admission import Check, OpenRequests, Refusal, RefusalKind
from .limitspec import LIMIT_FIELDS, Limits, Metric, Window
from .periods import DAY_END, DAY_KEY, MONTH_END, MONTH_KEY, calendar_of, day_key, month_key
from .pricing import cost_nusd

REQUESTS, TOKENS, COST = Metric.REQUESTS, Metric.TOKENS, Metric.COST
MINUTE, CONCURRENT, DAY, MONTH = Window.MINUTE, Window.CONCURRENT, Window.DAY, Window.MONTH


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
        return self.requests if metric == REQUESTS else self.tokens

    def reset_in(self, now: float) -> float:
        return (self.times[-1] + self.SPAN - now) if self.times else 0.0

    def free_at(self, metric: int, need: int, now: float) -> float:
        """Earliest time at which ``need`` units of the metric will have left the window."""
        freed = 0
        for t, r, k in zip(self.times, self.reqs, self.toks):
            freed += r if metric == REQUESTS else k
            if freed >= need:
                return t + self.SPAN
        return now + self.SPAN


@dataclass(slots=True)
class Bucket:
    """Used and reserved amounts of one user/scope in one calendar period (or total), indexed by Metric."""

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
    checks: list  # Check, as they stood just before this admission
    state: str = "pending"

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


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
            b.used[REQUESTS] += requests
            b.used[TOKENS] += tokens
            b.used[COST] += cost

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

    def checks(self, user_id: str, scope: str, limits: Limits, now: float, cal: tuple | None = None) -> list[Check]:
        """Every configured (non-null) limit of one scope, with what is used and reserved against it.
        ``cal``: ``calendar_of(now)``, when the caller has it already (one lookup per admission)."""
        out = []
        if cal is None:
            cal = calendar_of(now)
        periods = {DAY: "d" + cal[DAY_KEY], MONTH: "m" + cal[MONTH_KEY], "total": "total"}
        for name, value in limits.items():
            if value is None or name == "models":
                continue
            metric, window = LIMIT_FIELDS[name]
            if window == MINUTE:
                w = self._minute(user_id, scope, now)
                c = Check(scope, name, value, w.used(metric), 0, now + w.reset_in(now), metric, window)
            elif window == CONCURRENT:
                c = Check(scope, name, value, self.concurrent.get((user_id, scope), 0), 0, None, metric, window)
            else:
                b = self.buckets.get((user_id, scope, periods[window]))
                used, reserved = (b.used[metric], b.reserved[metric]) if b else (0, 0)
                reset_at = cal[DAY_END] if window == DAY else cal[MONTH_END] if window == MONTH else None
                c = Check(scope, name, value, used, reserved, reset_at, metric, window)
            out.append(c)
        return out

    def reserve(self, **request) -> Hold:
        """``try_reserve`` for direct callers (tests, tools): a refusal is raised as the error a client
        would get (RateLimited or QuotaExceeded)."""
        hold = self.try_reserve(**request)
        if isinstance(hold, Refusal):
            from .limits_http import refusal_error  # the HTTP rendering, only on this path

            raise refusal_error(hold, self.clock())
        return hold

    def try_reserve(
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
    ) -> Hold | Refusal:
        """Admits a request (a Hold) or refuses it (a Refusal). No await inside: atomic on the loop.

        When the completion budget is proxyd's default (the client set no max_tokens) and does not fit a
        token or cost limit, it is shrunk to what fits (not below ``min_completion_tokens``): the client
        asked for no particular length, so answering shorter beats refusing. An explicit max_tokens is
        the client's contract and is refused instead of silently cut.
        """
        now = self.clock()
        cal = calendar_of(now)
        if cal[DAY_KEY] != self._today:
            self._drop_old_periods(now)
        all_checks = self.checks(user_id, "*", user_limits, now, cal) + self.checks(user_id, model, model_limits, now, cal)
        in_price, out_price = price

        # 1. How many completion tokens fit every token and cost limit?
        fit = completion_tokens
        binding: Check | None = None
        for c in all_checks:
            if c.metric == REQUESTS:
                continue
            room = c.limit - c.used - c.reserved
            if c.metric == TOKENS:
                can = room - prompt_tokens
            else:
                room_after_prompt = room * 10**6 - prompt_tokens * in_price
                can = room_after_prompt // out_price if out_price else (completion_tokens if room_after_prompt >= 0 else -1)
            if can < fit:
                fit, binding = can, c
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
                    if metric == TOKENS:
                        return prompt_tokens + least
                    return -(-(prompt_tokens * in_price + least * out_price) // 10**6)  # rounded up: exact

                c = binding
                worst = 1.0
                for check in all_checks:
                    if check.metric != REQUESTS:
                        over = need_of(check.metric) / check.limit if check.limit else float("inf")
                        if over > worst:
                            c, worst = check, over
                return self._refusal(c, now, need_of(c.metric), user_id, all_checks, default_budget=completion_is_default)

        # 2. Requests and concurrency.
        for c in all_checks:
            if c.metric == REQUESTS and c.used + c.reserved + 1 > c.limit:
                return self._refusal(c, now, 1, user_id, all_checks)

        # 3. Reserve against every window of both scopes (also those without a limit, so usage reads stay
        #    cheap and a limit set later sees what is already in flight).
        tokens = prompt_tokens + completion_tokens
        cost = cost_nusd(prompt_tokens, completion_tokens, price)
        periods = ("d" + cal[DAY_KEY], "m" + cal[MONTH_KEY], "total")
        buckets, entries, conc = [], [], []
        for scope in ("*", model):
            for period in periods:
                b = self._bucket(user_id, scope, period)
                b.reserved[REQUESTS] += 1
                b.reserved[TOKENS] += tokens
                b.reserved[COST] += cost
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
            b.used[REQUESTS] += 1
            b.used[TOKENS] += tokens
            b.used[COST] += cost_nusd
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
            b.reserved[REQUESTS] -= 1
            b.reserved[TOKENS] -= hold.tokens
            b.reserved[COST] -= hold.cost_nusd
        for key in hold.concurrency_keys:
            self.concurrent[key] -= 1
        self.pending -= 1

    # -- refusals ------------------------------------------------------------------------------

    def _refusal(self, c: Check, now: float, need: int, user_id: str, checks: list[Check], *,
                 default_budget: bool = False) -> Refusal:
        """The refusal for limit ``c`` (``refusal``), the minute window's free time read off this
        process's sliding log."""
        def minute_free_at() -> float:
            return self.minutes[(user_id, c.scope)].free_at(c.metric, need - (c.limit - c.used), now)

        return refusal(c, now, need, checks, default_budget, minute_free_at)


def refusal(c: Check, now: float, need: int, checks: list[Check], default_budget: bool,
            minute_free_at: Callable[[], float]) -> Refusal:
    """The refusal for limit ``c``, whichever admission counted it. ``need`` is what the request needs of
    it, in the limit's unit (requests, tokens or nano-USD): more than the whole limit means it can never
    fit (not retryable, and the client is told what to change); otherwise it fits once usage frees up.
    ``minute_free_at`` says when a per-minute window has room for it (asked only for such a limit). It
    carries every check made (``checks``), for the x-ratelimit-* headers of the 429."""
    retry: float | None = None
    if need > c.limit:
        kind = RefusalKind.CLOSED if c.limit == 0 else RefusalKind.TOO_LARGE
    elif c.reserved and need <= c.limit - c.used:
        # It fits once requests in flight settle (they reserved the room; an answer without
        # max_tokens may hold all that is left): a matter of seconds, not of the period's end.
        kind, retry = RefusalKind.IN_FLIGHT, 1.0
    elif c.window == CONCURRENT:
        kind, retry = RefusalKind.RATE, 1.0
    elif c.window == MINUTE:
        kind, retry = RefusalKind.RATE, max(0.001, minute_free_at() - now)
    else:
        kind, retry = RefusalKind.QUOTA, (c.reset_at - now) if c.reset_at else None
    return Refusal(kind, c, need, retry, checks, now, default_budget)


class MemoryAdmission:
    """The Admission port (proxyd/admission.py) over one process's ``Limiter``. The methods are
    coroutines for the port's sake (a shared admission waits on the network); these never suspend."""

    def __init__(self, limiter: Limiter, *, connections_per_key: int) -> None:
        self.limiter = limiter
        self.clock = limiter.clock
        self.open_requests = OpenRequests(connections_per_key)

    async def reserve(self, **request) -> Hold | Refusal:
        return self.limiter.try_reserve(**request)

    async def settle(self, hold: Hold, prompt_tokens: int, completion_tokens: int, cost_nusd: int) -> None:
        self.limiter.settle(hold, prompt_tokens, completion_tokens, cost_nusd)

    async def void(self, hold: Hold) -> None:
        self.limiter.void(hold)

    async def status(self, user_id: str, scope: str, limits: Limits, now: float) -> list[Check]:
        return self.limiter.checks(user_id, scope, limits, now)

    @property
    def pending(self) -> int:
        return self.limiter.pending
