"""Admission, the port: may this request run, and what does it hold while it does?

    reservation = await admission.reserve(...)   # a reservation handle, or a Refusal value
    await admission.settle(reservation, ...)     # actual usage posted in place of the reservation
    await admission.void(reservation)            # released: nothing billed

Exactly one of settle or void ends a reservation. A refusal is a value (what refused, by how much,
when to come back), not an error: the HTTP layer renders it (proxyd/limits_http.py) as the 429 and
its headers, another front end could render it otherwise. Two implementations: in memory, one process
(``proxyd.limits.MemoryAdmission``, the default), and shared by several processes over Redis
(``proxyd.redis_admission.RedisAdmission``, config ``admission.backend: redis``).

Concurrency has one mechanism, here: the open requests of each API key (``OpenRequests``: the per-key
cap, checked from the request's headers, and the registry through which the admin API and the
shutdown reach a key's running requests) and the ``max_concurrent_requests`` limits, which a
reservation holds. The first is per process by nature (it guards this process's connections); the
second is a limit like any other and lives wherever the admission keeps its state.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Iterable, Protocol

from .limitspec import Metric, Window


@dataclass(slots=True)
class Check:
    """One limit that applies to a request, with what is used and reserved against it."""

    scope: str  # "*" (all models) or a model name
    name: str
    limit: int
    used: int
    reserved: int
    reset_at: float | None  # when the window frees (None: never)
    metric: Metric = Metric.REQUESTS
    window: str = Window.CONCURRENT  # proxyd.limitspec.Window

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.used - self.reserved)


class RefusalKind(str, Enum):
    CLOSED = "closed"  # the limit is 0: nothing is admitted under it
    TOO_LARGE = "too_large"  # the request needs more than the whole limit: it never fits
    IN_FLIGHT = "in_flight"  # it fits once the requests in flight settle
    RATE = "rate"  # a per-minute or concurrency limit: it fits again within seconds
    QUOTA = "quota"  # a day, month or total limit: it fits in the next period (or never)
    CONNECTIONS = "connections"  # the API key's cap on open requests


@dataclass(slots=True)
class Refusal:
    """Why a request was not admitted. ``limit`` is the limit that refused, ``need`` what the request needs of
    it in the limit's unit, ``retry_after`` the seconds until it may fit (None: not by waiting), and
    ``checks`` every limit looked at, as it stood (the x-ratelimit-* headers describe them)."""

    kind: RefusalKind
    limit: Check
    need: int
    retry_after: float | None
    checks: list
    at: float = 0.0  # the admission's clock when it refused
    default_budget: bool = False  # the completion budget was proxyd's default (the client set none)


class Reservation(Protocol):
    """What a reservation handle shows the rest of proxyd; the rest is the admission's own."""

    prompt_tokens: int
    completion_tokens: int  # the budget reserved (may be less than asked: a default budget shrinks to fit)
    cost_nusd: int
    admitted_at: float  # the admission's clock: the period the request is billed to
    checks: list  # the limits checked, as they stood just before this admission


class Admission(Protocol):
    clock: Any  # () -> float, Unix seconds
    open_requests: "OpenRequests"

    async def reserve(self, *, user_id: str, model: str, user_limits: dict, model_limits: dict, prompt_tokens: int,
                      completion_tokens: int, completion_is_default: bool, min_completion_tokens: int,
                      price: tuple[int, int]) -> Reservation | Refusal:
        """All of the request's limits checked and reserved at once, or none."""

    async def settle(self, reservation: Any, prompt_tokens: int, completion_tokens: int, cost_nusd: int) -> None: ...

    async def void(self, reservation: Any) -> None: ...

    pending: int  # this process's reservations not yet ended (/healthz, the shutdown log)

    async def status(self, user_id: str, scope: str, limits: dict, now: float) -> list:
        """The limits of one scope as they stand (``/v1/limits``)."""


class OpenRequests:
    """The requests open on each API key: capped per key, and reachable to be cut off.

    Entered from the request's headers (before its body is read: a key at its cap is refused without
    holding a connection for the body), left when the request ends. Adding and removing is O(1)."""

    __slots__ = ("cap", "by_key")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.by_key: dict[str, set] = {}  # key id -> its open requests (handlers)

    def enter(self, key_id: str, request: Any) -> Refusal | None:
        open_now = self.by_key.get(key_id)
        if open_now is None:
            open_now = self.by_key[key_id] = set()
        elif len(open_now) >= self.cap:
            return Refusal(RefusalKind.CONNECTIONS, Check("key", "max_connections_per_key", self.cap, len(open_now), 0, None),
                           1, 1.0, [])
        open_now.add(request)
        return None

    def leave(self, key_id: str, request: Any) -> None:
        left = self.by_key[key_id]
        left.discard(request)
        if not left:
            del self.by_key[key_id]

    def of(self, key_ids: Iterable[str] | None = None) -> list:
        """The open requests of ``key_ids`` (every key if None), copied: they leave as they end."""
        by_key = self.by_key
        groups = by_key.values() if key_ids is None else (by_key.get(k, ()) for k in key_ids)
        return [r for group in groups for r in group]
