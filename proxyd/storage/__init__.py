"""The storage ports: the Ledger (what was admitted, settled, voided; usage and invoices) and the
AccountStore (users, API keys, limit overrides). Nothing outside this package writes or reads SQL.

Two implementations, each both ports: SQLite over one writer thread (``proxyd.storage.sqlite.SQLiteStorage``,
the embedded default) and PostgreSQL over one writer task per instance (``proxyd.storage.postgres``, shared by
several instances: docs/DESIGN.md "Several instances"). The metering, the handlers and the reports are the
same over either:

- Rows cross the port as plain tuples in a fixed column order (``REQUEST_COLUMNS``), built once per
  request by the meter and handed over as they are: no object per row, no conversion per request (the
  ledger write is on every request's path, where each Python call counts).
- Writes return at once; ``record_settled`` returns an awaitable that resolves once the row and its
  daily aggregate are durable, which the proxy awaits before a response's last byte.
- Start-up reads (``open``, ``expire_stale_pending``, ``period_usage``, ``recent_requests``, ``load``)
  are synchronous: they run before the event loop serves anyone.
- Read-side queries are async and return sums as rows; formatting them for the API is
  ``proxyd/reports.py``'s job, the same whatever the storage.
- Every time a storage stamps (a request's end, an expiry, a key's creation) comes from the injected
  ``clock``, as the limiter's do.
"""

from __future__ import annotations

import calendar
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, NamedTuple, Protocol

# A request's ledger row, in this order (the meter builds it, the ledger stores it as it is). Money is integer
# nano-USD; times are UTC ISO 8601 to the millisecond (``iso_ms``); ``day`` is the UTC day of admission, the
# period the request is billed to. status: pending -> settled | voided, or expired (a crash's leftover).
# ``upstream`` names the configured upstream that served it (the last one tried), ``attempts`` how many were
# tried (failover); both are None while pending and for a request refused before any was tried.
REQUEST_COLUMNS = (
    "id", "user_id", "key_id", "model", "endpoint", "stream", "status", "day", "created_at",
    "reserved_prompt", "reserved_completion", "http_status", "finished_at", "latency_ms", "prompt_tokens",
    "completion_tokens", "usage_source", "input_price_nusd_per_mtok", "output_price_nusd_per_mtok", "cost_nusd", "error",
    "upstream", "attempts",
)
RequestRow = tuple  # of len(REQUEST_COLUMNS) values


class Sums(NamedTuple):
    """Settled usage of one user and model over a period (start-up seeding of the limits)."""

    user_id: str
    model: str
    requests: int
    tokens: int  # prompt + completion
    cost_nusd: int


class PeriodUsage(NamedTuple):
    """Settled usage per user and model: today, this month, all time (the periods limits count over)."""

    day: list[Sums]
    month: list[Sums]
    total: list[Sums]


class RecentRequest(NamedTuple):
    """A request admitted within the last minute that has ended (start-up seeding of per-minute windows)."""

    admitted_at: float  # epoch seconds
    user_id: str
    model: str
    tokens: int  # prompt + completion (0 for a voided one)
    voided: bool  # counts as an attempt only


class UsageRow(NamedTuple):
    """One group of a usage report (``key`` is the model, the day, the user, the endpoint or the upstream,
    by ``group_by``)."""

    key: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_nusd: int


class InvoiceLine(NamedTuple):
    """A month's usage of one user and model at one price in force."""

    user_id: str
    model: str
    input_price_nusd_per_mtok: int
    output_price_nusd_per_mtok: int
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_nusd: int


@dataclass
class UserRecord:
    user_id: str
    created_at: str
    disabled: bool
    limits: Any  # the admin's overrides as the API took them (JSON), None when there are none


@dataclass
class KeyRow:
    """An API key as stored: only the SHA-256 of the key; ``prefix`` helps people tell keys apart."""

    key_id: str
    user_id: str
    prefix: str
    created_at: str
    key_hash: str
    revoked_at: str | None = None


class StorageError(Exception):
    """The storage cannot be opened or read (a missing directory, a read-only file, a corrupt database)."""


class Ledger(Protocol):
    """One row per admitted request plus per-day aggregates of the settled ones, which usage, invoices
    and the limits' day/month/total read instead of the rows."""

    clock: Callable[[], float]  # the injected clock: every time the ledger stamps
    # The writer's state, for /healthz and /metrics: writes accepted but not yet durable, the last group
    # commit's duration, commits and writes so far.
    queue_depth: int
    last_commit_s: float
    commits: int
    writes: int
    # True while the database cannot be written (a shared server down): the meter refuses new requests with
    # a 503 instead of running them upstream and failing their settle. Always False for the embedded file.
    unavailable: bool

    # -- lifecycle -------------------------------------------------------------------------------------
    def open(self) -> None:
        """Brings the schema up to date and starts the writer. Raises StorageError if it cannot."""

    def expire_stale_pending(self) -> int:
        """Marks 'expired' the pending rows whose process died before settling them (their reservation
        died with it): never billed, never retried. Start-up only; returns how many."""

    def bind_loop(self, loop: Any) -> None:
        """The event loop that awaits the writes (the one serving requests)."""

    async def close(self) -> None:
        """Makes every accepted write durable, then stops."""

    # -- the request path (each called once per request: keep them cheap) ------------------------------
    def record_pending(self, row: RequestRow) -> None:
        """A request still running: what a crash leaves behind, to be expired. Not awaited."""

    def record_settled(self, row: RequestRow) -> Awaitable[Any]:
        """The final row of a billed request and its share of the daily aggregate, in one commit. The
        awaitable resolves once both are durable."""

    def record_voided(self, row: RequestRow) -> None:
        """The final row of a request billed nothing (it records why). Not awaited; failures are logged."""

    # -- start-up seeding of the limits ----------------------------------------------------------------
    def period_usage(self, day: str, month: str) -> PeriodUsage:
        """Settled usage per user and model on ``day`` (YYYY-MM-DD), in ``month`` (YYYY-MM) and in all."""

    def recent_requests(self, since: float) -> list[RecentRequest]:
        """The settled and voided requests admitted at or after ``since`` (epoch seconds)."""

    # -- reports ---------------------------------------------------------------------------------------
    async def usage(self, *, user_id: str | None, start: str, end: str, group_by: str,
                    model: str | None) -> list[UsageRow]:
        """Settled sums over the UTC days [start, end], grouped by "model", "day", "user", "endpoint" or
        "upstream", in key order."""

    async def invoice_lines(self, *, period: str, user_id: str | None) -> list[InvoiceLine]:
        """A month's (YYYY-MM) settled usage per user, model and price, in that order."""

    async def check(self, *, start: str | None = None, end: str | None = None) -> dict[str, Any]:
        """Do the daily aggregates equal the sums of the settled rows (over [start, end], or everything)?
        {"ok", "start", "end", "mismatches": [[user, model, day, prices, rows' and aggregate's figures]],
        "requests_by_status"}."""


class AccountStore(Protocol):
    """Users, their API keys and their limit overrides. ``proxyd.accounts.Accounts`` keeps them all in
    memory (authentication is a dict lookup) and writes through this port before it changes memory."""

    def load(self) -> tuple[list[UserRecord], list[KeyRow]]:
        """Every user and key. Start-up only."""

    async def insert_user(self, user: UserRecord, key: KeyRow) -> None:
        """A new user with its first key, in one commit (raises if the user exists)."""

    async def insert_key(self, key: KeyRow) -> None: ...

    async def revoke_key(self, key_id: str, revoked_at: str) -> None: ...

    async def set_disabled(self, user_id: str, disabled: bool) -> None: ...

    async def set_limits(self, user_id: str, limits: Any) -> None:
        """Replaces the user's overrides (JSON as the API took it; None clears them)."""


class SharedAccountStore(AccountStore, Protocol):
    """An AccountStore that other instances write too (PostgreSQL): each instance is told of their changes
    and reloads what changed, so that a key revoked through one instance is refused by all."""

    def watch(self, on_change: Callable[[str | None], Awaitable[Any]]) -> None:
        """``on_change(user_id)`` after another instance changed that user or its keys; ``on_change(None)``
        when everything must be reloaded (changes may have been missed)."""

    async def fetch_accounts(self, user_id: str | None) -> tuple[list[UserRecord], list[KeyRow]]:
        """As ``load``, for one user (None: everyone), once the loop serves."""


_ISO_SECOND: tuple[int, str] = (-1, "")  # (whole second, its "YYYY-MM-DDTHH:MM:SS"), swapped atomically


def iso_ms(t: float) -> str:
    """UTC ISO 8601 to the millisecond, as ledger rows record times. strftime+gmtime cost ~5 us and every
    ledger row needs two, so the second's text is computed once per second (as limits._calendar does)."""
    global _ISO_SECOND
    s = int(t // 1)
    cached = _ISO_SECOND
    if cached[0] != s:
        cached = _ISO_SECOND = (s, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(s)))
    return f"{cached[1]}.{int((t - s) * 1000):03d}Z"


def from_iso_ms(s: str) -> float:
    """The inverse of ``iso_ms`` (to the millisecond)."""
    return calendar.timegm(time.strptime(s[:19], "%Y-%m-%dT%H:%M:%S")) + int(s[20:23]) / 1000


def iso_s(t: float) -> str:
    """UTC ISO 8601 to the second: users' and keys' times, and an expired row's end."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
