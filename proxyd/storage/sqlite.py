"""The Ledger and the AccountStore over one SQLite file: every statement proxyd runs against its schema.

``SQLiteStorage`` is the writer engine (``sqlite_writer.Store``: one writer thread with group commits,
durable before a response's last byte; a reader and a scanner thread) plus the SQL of the ports in
``proxyd/storage/__init__.py``. The module-level query functions take a connection so that tests can run
them on a database they built (tests/test_migrations.py).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from typing import Any, Callable
from urllib.parse import quote

from . import (
    REQUEST_COLUMNS,
    InvoiceLine,
    KeyRow,
    PeriodUsage,
    RecentRequest,
    RequestRow,
    StorageError,
    Sums,
    UsageRow,
    UserRecord,
    from_iso_ms,
    iso_ms,
    iso_s,
)
from .sqlite_writer import Additive, Store, Upsert, _connect

log = logging.getLogger("proxyd.meter")  # failed ledger writes have always been logged under the meter's name

# One statement writes a request's row whatever it held before: the first write (pending, or the final
# row of a request that ended before its pending row was due) inserts, a later one updates.
_UPSERT = Upsert(
    f"INSERT INTO requests ({', '.join(REQUEST_COLUMNS)})",
    "(" + ",".join("?" * len(REQUEST_COLUMNS)) + ")",
    " ON CONFLICT (id) DO UPDATE SET"
    " status=excluded.status, http_status=excluded.http_status, finished_at=excluded.finished_at,"
    " latency_ms=excluded.latency_ms, prompt_tokens=excluded.prompt_tokens,"
    " completion_tokens=excluded.completion_tokens, usage_source=excluded.usage_source,"
    " input_price_nusd_per_mtok=excluded.input_price_nusd_per_mtok,"
    " output_price_nusd_per_mtok=excluded.output_price_nusd_per_mtok, cost_nusd=excluded.cost_nusd,"
    " error=excluded.error, upstream=excluded.upstream, attempts=excluded.attempts"
)

# Params: (user_id, model, day, endpoint, upstream, input price, output price, requests, prompt_tokens,
# completion_tokens, cost_nusd); the writer sums the rows of one commit that share the first seven (keyed by
# price since m004, so that invoices, a line per price in force, read aggregates too; by endpoint and
# upstream since m006, for usage by dialect and by upstream).
_DAILY = Additive(
    "INSERT INTO usage_daily (user_id, model, day, endpoint, upstream, input_price_nusd_per_mtok,"
    " output_price_nusd_per_mtok, requests, prompt_tokens, completion_tokens, cost_nusd)",
    "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    " ON CONFLICT (user_id, model, day, endpoint, upstream, input_price_nusd_per_mtok, output_price_nusd_per_mtok)"
    " DO UPDATE SET"
    " requests = requests + excluded.requests, prompt_tokens = prompt_tokens + excluded.prompt_tokens,"
    " completion_tokens = completion_tokens + excluded.completion_tokens,"
    " cost_nusd = cost_nusd + excluded.cost_nusd",
    key_len=7,
)


class SQLiteStorage(Store):
    """The Ledger and the AccountStore (proxyd/storage/__init__.py) of one SQLite file."""

    unavailable = False  # a local file: a write that fails, fails alone (see Store._commit_batch)

    def __init__(self, path: str, *, synchronous: str = "NORMAL", batch_max: int = 512,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__(path, synchronous=synchronous, batch_max=batch_max)
        self.clock = clock

    # -- lifecycle --------------------------------------------------------------------------------------

    def open(self) -> None:
        try:
            super().open()
        except sqlite3.Error as exc:
            raise StorageError(str(exc)) from exc

    def expire_stale_pending(self) -> int:
        # A pending row means the process died between admitting a request and settling it. The in-memory
        # reservation died with the process; mark the row so it is never billed or retried. On a connection
        # of its own: the writer thread owns the writer's, and nothing else writes yet at start-up.
        try:
            conn = _connect(self.path, self._synchronous)
            try:
                return conn.execute("UPDATE requests SET status='expired', finished_at=? WHERE status='pending'",
                                    (iso_s(self.clock()),)).rowcount
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise StorageError(str(exc)) from exc

    def _startup_read(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        try:
            return self.read_now(fn)
        except sqlite3.Error as exc:
            raise StorageError(str(exc)) from exc

    # -- the request path ---------------------------------------------------------------------------------

    def record_pending(self, row: RequestRow) -> None:
        self.submit([(_UPSERT, row)]).add_done_callback(_log_failure)

    def record_settled(self, row: RequestRow):
        # The daily aggregate's share is read off the row (user, model, day, endpoint, upstream, prices;
        # 1 request, tokens, cost): no second computation of the day, and the two cannot disagree.
        return self.submit([(_UPSERT, row), (_DAILY, (row[1], row[3], row[7], row[4], row[21] or "default", row[17],
                                                      row[18], 1, row[14], row[15], row[19]))])

    def record_voided(self, row: RequestRow) -> None:
        self.submit([(_UPSERT, row)]).add_done_callback(_log_failure)

    # -- start-up seeding ---------------------------------------------------------------------------------

    def period_usage(self, day: str, month: str) -> PeriodUsage:
        return self._startup_read(lambda conn: period_usage(conn, day, month))

    def recent_requests(self, since: float) -> list[RecentRequest]:
        return self._startup_read(lambda conn: recent_requests(conn, since))

    # -- reports (usage and invoices on the reader thread, the check on the scanner: see Store) ----------

    async def usage(self, *, user_id: str | None, start: str, end: str, group_by: str,
                    model: str | None) -> list[UsageRow]:
        return await self.read(lambda c: usage_rows(c, user_id=user_id, start=start, end=end, group_by=group_by,
                                                    model=model))

    async def invoice_lines(self, *, period: str, user_id: str | None) -> list[InvoiceLine]:
        return await self.read(lambda c: invoice_lines(c, period=period, user_id=user_id))

    async def check(self, *, start: str | None = None, end: str | None = None) -> dict[str, Any]:
        return await self.scan(lambda c: consistency(c, start=start, end=end))

    # -- accounts -----------------------------------------------------------------------------------------

    def load(self) -> tuple[list[UserRecord], list[KeyRow]]:
        def q(conn):
            users = conn.execute("SELECT user_id, created_at, disabled, limits_json FROM users").fetchall()
            keys = conn.execute(
                "SELECT key_id, user_id, prefix, created_at, key_hash, revoked_at FROM api_keys"
            ).fetchall()
            return users, keys

        users, keys = self._startup_read(q)
        return ([UserRecord(u, created, bool(disabled), json.loads(limits) if limits else None)
                 for u, created, disabled, limits in users],
                [KeyRow(*k) for k in keys])

    async def insert_user(self, user: UserRecord, key: KeyRow) -> None:
        limits_json = _limits_json(user.limits)

        def op(conn):
            conn.execute(
                "INSERT INTO users (user_id, created_at, disabled, limits_json) VALUES (?, ?, ?, ?)",
                (user.user_id, user.created_at, int(user.disabled), limits_json),
            )
            _insert_key(conn, key)

        await self.submit(op)

    async def insert_key(self, key: KeyRow) -> None:
        await self.submit(lambda conn: _insert_key(conn, key))

    async def revoke_key(self, key_id: str, revoked_at: str) -> None:
        await self.submit_sql("UPDATE api_keys SET revoked_at=? WHERE key_id=?", (revoked_at, key_id))

    async def set_disabled(self, user_id: str, disabled: bool) -> None:
        await self.submit_sql("UPDATE users SET disabled=? WHERE user_id=?", (int(disabled), user_id))

    async def set_limits(self, user_id: str, limits: Any) -> None:
        await self.submit_sql("UPDATE users SET limits_json=? WHERE user_id=?", (_limits_json(limits), user_id))


def check_file(path: str) -> dict[str, Any]:
    """The whole-ledger consistency check of the file at ``path``, opened read-only: a mistyped path must
    not leave an empty database behind (``python app.py --check-ledger``). Raises StorageError."""
    try:
        conn = sqlite3.connect(f"file:{quote(os.path.abspath(path))}?mode=ro", uri=True)
        try:
            return consistency(conn)
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise StorageError(str(exc)) from exc


def _insert_key(conn: sqlite3.Connection, key: KeyRow) -> None:
    conn.execute(
        "INSERT INTO api_keys (key_id, user_id, key_hash, prefix, created_at, revoked_at) VALUES (?, ?, ?, ?, ?, ?)",
        (key.key_id, key.user_id, key.key_hash, key.prefix, key.created_at, key.revoked_at),
    )


def _limits_json(limits: Any) -> str | None:
    return json.dumps(limits) if limits else None


def _log_failure(fut) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error("ledger write failed: %s", fut.exception())


# -- queries (each takes a connection; run on the store's reader, scanner, or at start-up) ------------------


def period_usage(conn: sqlite3.Connection, day: str, month: str) -> PeriodUsage:
    """Settled usage per user and model today, this month and in all, from the daily aggregates."""
    base = "SELECT user_id, model, SUM(requests), SUM(prompt_tokens + completion_tokens), SUM(cost_nusd) FROM usage_daily"
    grp = " GROUP BY user_id, model"

    def sums(sql: str, params: tuple = ()) -> list[Sums]:
        return [Sums(u, m, n or 0, tokens or 0, cost or 0) for u, m, n, tokens, cost in conn.execute(sql, params)]

    return PeriodUsage(sums(base + " WHERE day = ?" + grp, (day,)),
                       sums(base + " WHERE day >= ? AND day < ?" + grp, (month + "-01", month + "-32")),
                       sums(base + grp))


def recent_requests(conn: sqlite3.Connection, since: float) -> list[RecentRequest]:
    """The requests admitted at or after ``since`` that ended settled (with their tokens) or voided (an
    attempt). Rows are read newest first by rowid (insertion order) and the scan stops at the first row
    finished before ``since``: a row's insertion is no later than its finish, so every older rowid was
    inserted, hence admitted, before then."""
    cutoff = iso_ms(since)
    found = []
    cur = conn.execute("SELECT user_id, model, created_at, finished_at, status, prompt_tokens,"
                       " completion_tokens FROM requests ORDER BY rowid DESC")
    for user_id, model, created_at, finished_at, status, prompt, completion in cur:
        if finished_at is not None and finished_at < cutoff:
            break
        if status in ("settled", "voided") and created_at >= cutoff:
            found.append(RecentRequest(from_iso_ms(created_at), user_id, model, (prompt or 0) + (completion or 0),
                                       status == "voided"))
    return found


def usage_rows(conn: sqlite3.Connection, *, user_id: str | None, start: str, end: str, group_by: str,
               model: str | None) -> list[UsageRow]:
    """Sums over [start, end] (UTC days, inclusive), grouped by model, day, user, endpoint or upstream,
    from the aggregates."""
    column = {"model": "model", "day": "day", "user": "user_id", "endpoint": "endpoint", "upstream": "upstream"}[group_by]
    where, params = ["day >= ?", "day <= ?"], [start, end]
    if user_id is not None:
        where.append("user_id = ?")
        params.append(user_id)
    if model is not None:
        where.append("model = ?")
        params.append(model)
    rows = conn.execute(
        f"SELECT {column} AS k, SUM(requests), SUM(prompt_tokens), SUM(completion_tokens), SUM(cost_nusd)"
        f" FROM usage_daily WHERE {' AND '.join(where)} GROUP BY {column} ORDER BY {column}",
        params,
    ).fetchall()
    return [UsageRow(*r) for r in rows]


def invoice_lines(conn: sqlite3.Connection, *, period: str, user_id: str | None) -> list[InvoiceLine]:
    """A calendar month's settled usage per user, model and price in force, from the aggregates."""
    where, params = ["day >= ?", "day < ?"], [period + "-01", period + "-32"]
    if user_id is not None:
        where.append("user_id = ?")
        params.append(user_id)
    rows = conn.execute(
        "SELECT user_id, model, input_price_nusd_per_mtok, output_price_nusd_per_mtok, SUM(requests),"
        " SUM(prompt_tokens), SUM(completion_tokens), SUM(cost_nusd) FROM usage_daily"
        f" WHERE {' AND '.join(where)} GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4",
        params,
    ).fetchall()
    return [InvoiceLine(*r) for r in rows]


def consistency(conn: sqlite3.Connection, *, start: str | None = None, end: str | None = None) -> dict[str, Any]:
    """Checks that the daily aggregates equal the sum of settled request rows; lists what differs.

    Without a range it reads every request row (3.7-7.6 s at 3M rows, by how many users and days). With ``start``/``end`` (UTC days,
    inclusive) it reads only those days' rows, through the ``(user_id, day)`` index: one index range per
    user, which is why the users are listed first (SQLite cannot use that index for ``day`` alone). The
    users are those in ``users`` and those with an aggregate in the range, so a row is missed only if its
    user was never created and it has no aggregate — which no proxyd write produces. Per row the index
    path costs more than a plain scan (measured: ~1.4x), so a range holding most of the ledger's
    requests (by the aggregates' counts) is read with a plain scan instead."""
    if (start is None) != (end is None):
        raise ValueError("start and end go together")
    if start is None:
        rows_where, daily_where, params = "status = 'settled'", "", ()
        status_sql = "SELECT status, COUNT(*) FROM requests GROUP BY status"
    else:
        share, total = conn.execute(
            "SELECT SUM(CASE WHEN day BETWEEN ? AND ? THEN requests ELSE 0 END), SUM(requests) FROM usage_daily",
            (start, end)).fetchone()
        users = "(SELECT user_id FROM users UNION SELECT user_id FROM usage_daily WHERE day BETWEEN :start AND :end)"
        in_range = f"user_id IN {users} AND day BETWEEN :start AND :end"
        if total and (share or 0) * 2 > total:
            in_range = "day BETWEEN :start AND :end"  # most of the ledger: a plain scan is cheaper
        rows_where, daily_where = f"status = 'settled' AND {in_range}", "WHERE day BETWEEN :start AND :end"
        params = {"start": start, "end": end}
        status_sql = f"SELECT status, COUNT(*) FROM requests WHERE {in_range} GROUP BY status"
    key = "user_id, model, day, endpoint, upstream, input_price_nusd_per_mtok, output_price_nusd_per_mtok"
    diffs = conn.execute(
        f"""
        WITH r AS (
            SELECT user_id, model, day, endpoint, COALESCE(upstream, 'default') AS upstream,
                   COALESCE(input_price_nusd_per_mtok, 0) AS input_price_nusd_per_mtok,
                   COALESCE(output_price_nusd_per_mtok, 0) AS output_price_nusd_per_mtok, COUNT(*) AS requests,
                   SUM(prompt_tokens) AS p, SUM(completion_tokens) AS c, SUM(cost_nusd) AS cost
            FROM requests WHERE {rows_where} GROUP BY 1, 2, 3, 4, 5, 6, 7
        ), u AS (
            SELECT * FROM usage_daily {daily_where}
        ), keys AS (
            SELECT {key} FROM r
            UNION
            SELECT {key} FROM u
        )
        SELECT k.user_id, k.model, k.day, k.endpoint, k.upstream, k.input_price_nusd_per_mtok,
               k.output_price_nusd_per_mtok, r.requests, u.requests, r.p, u.prompt_tokens, r.c, u.completion_tokens,
               r.cost, u.cost_nusd
        FROM keys k
        LEFT JOIN r USING ({key})
        LEFT JOIN u USING ({key})
        WHERE COALESCE(r.requests, 0) != COALESCE(u.requests, 0) OR COALESCE(r.p, 0) != COALESCE(u.prompt_tokens, 0)
           OR COALESCE(r.c, 0) != COALESCE(u.completion_tokens, 0) OR COALESCE(r.cost, 0) != COALESCE(u.cost_nusd, 0)
        """,
        params,
    ).fetchall()
    counts = dict(conn.execute(status_sql, params).fetchall())
    return {"ok": not diffs, "start": start, "end": end, "mismatches": [list(d) for d in diffs],
            "requests_by_status": counts}
