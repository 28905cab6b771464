"""The Ledger and the AccountStore over PostgreSQL (``database.backend: postgres``): one ledger, one set of
users and keys, shared by several proxyd instances (issue #16; docs/DESIGN.md "Several instances").

The driver is asyncpg: it speaks PostgreSQL's binary protocol from Cython on the event loop that serves
requests (no thread hand-over per write, unlike the SQLite writer thread), and it is the fastest Python
driver for the one statement shape that matters here, a multi-row insert of arrays.

Writes (the request path). ``record_*`` append the row to a list and wake one writer task per instance;
the writer takes everything queued (up to ``batch_max``) and commits it as one transaction of two
statements whatever the batch size: ``INSERT INTO requests ... SELECT FROM unnest($1::text[], ...) ON
CONFLICT (id) DO UPDATE`` (a request's rows of one batch reduced to its last: a statement may not touch
a row twice) and the same for the daily aggregates, summed per key in Python first (as the SQLite
writer's ``Additive``) and sorted by key, so that two instances updating the same aggregate rows lock
them in one order and cannot deadlock. ``record_settled``'s future resolves after COMMIT: the proxy
awaits it before a response's last byte, as with SQLite.

PostgreSQL unreachable. A batch whose connection is lost is retried on a new connection until
``write_wait_s`` has passed since its first try, then its requests fail with 503 (Retry-After): they
were answered to nobody, and nothing is billed. A retry first looks whether the batch committed after
all (the connection can drop between COMMIT and its acknowledgement): its first settled row is there
only if the whole transaction, aggregates included, is. Meanwhile ``unavailable`` is set, and the meter
refuses new requests with the same 503 instead of running them upstream; the heartbeat probes every
half second and clears it.

Several instances. Each has an id (host, pid, random) and a row in ``proxyd_instances`` with a heartbeat
(every ``instance_stale_s / 6``); pending rows carry the id of the instance that admitted them. Only the
pending rows of instances whose heartbeat is older than ``instance_stale_s`` (or that have none) are
expired: at start-up and at every heartbeat. A change of users or keys commits with a ``NOTIFY`` naming
the user; every other instance's LISTEN connection reloads that user (and a revoked key or disabled user
is cut off there too, ``proxyd/server.py``). When the LISTEN connection is lost, the new one reloads
everything: notifications sent meanwhile were missed.

Start-up reads are synchronous in the ports (they run before the loop serves anyone): they run on a
private event loop in a thread of their own, over a connection of their own.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import secrets
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Awaitable, Callable

import asyncpg

from ..errors import Conflict, ServiceUnavailable
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
from .postgres_migrations import apply as apply_migrations

log = logging.getLogger("proxyd.meter")  # as sqlite.py: failed ledger writes are logged under the meter's name
slog = logging.getLogger("proxyd.store")

CHANNEL = "proxyd_accounts"  # NOTIFY channel of user and key changes
_REQUEST_ID = re.compile(r"req_[0-9A-Za-z_]{1,64}")  # a dashboard cursor's id (proxyd.handlers.base.new_request_id)

_INT4 = {"stream", "http_status", "attempts"}
_TEXT = {"id", "user_id", "key_id", "model", "endpoint", "status", "day", "created_at", "finished_at", "usage_source",
         "error", "upstream"}
_ARRAYS = ", ".join(f"${i + 1}::{'text' if c in _TEXT else 'int4' if c in _INT4 else 'int8'}[]"
                    for i, c in enumerate(REQUEST_COLUMNS))
_UPSERT = (
    f"INSERT INTO requests ({', '.join(REQUEST_COLUMNS)}, instance_id)"
    f" SELECT u.*, ${len(REQUEST_COLUMNS) + 1}::text FROM unnest({_ARRAYS}) AS u"
    " ON CONFLICT (id) DO UPDATE SET"
    " status=excluded.status, http_status=excluded.http_status, finished_at=excluded.finished_at,"
    " latency_ms=excluded.latency_ms, prompt_tokens=excluded.prompt_tokens,"
    " completion_tokens=excluded.completion_tokens, usage_source=excluded.usage_source,"
    " input_price_nusd_per_mtok=excluded.input_price_nusd_per_mtok,"
    " output_price_nusd_per_mtok=excluded.output_price_nusd_per_mtok, cost_nusd=excluded.cost_nusd,"
    " error=excluded.error, upstream=excluded.upstream, attempts=excluded.attempts"
)
_DAILY_KEY = "user_id, model, day, endpoint, upstream, input_price_nusd_per_mtok, output_price_nusd_per_mtok"
_DAILY = (
    f"INSERT INTO usage_daily ({_DAILY_KEY}, requests, prompt_tokens, completion_tokens, cost_nusd)"
    " SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int8[], $7::int8[],"
    " $8::int8[], $9::int8[], $10::int8[], $11::int8[])"
    f" ON CONFLICT ({_DAILY_KEY}) DO UPDATE SET"
    " requests = usage_daily.requests + excluded.requests,"
    " prompt_tokens = usage_daily.prompt_tokens + excluded.prompt_tokens,"
    " completion_tokens = usage_daily.completion_tokens + excluded.completion_tokens,"
    " cost_nusd = usage_daily.cost_nusd + excluded.cost_nusd"
)
# Pending rows whose instance is not alive: no heartbeat row, or one older than the bound ($2 seconds).
_EXPIRE = (
    "UPDATE requests SET status = 'expired', finished_at = $1 WHERE status = 'pending' AND (instance_id IS NULL"
    " OR instance_id NOT IN (SELECT instance_id FROM proxyd_instances"
    " WHERE heartbeat_at > now() - make_interval(secs => $2)))"
)
_HEARTBEAT = ("INSERT INTO proxyd_instances (instance_id, host, pid) VALUES ($1, $2, $3)"
              " ON CONFLICT (instance_id) DO UPDATE SET heartbeat_at = now()")

# What a lost or refused connection raises (as opposed to a bad row): retried on a new connection.
_LOST = (OSError, asyncio.TimeoutError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError,
         asyncpg.exceptions.OperatorInterventionError, asyncpg.exceptions.InsufficientResourcesError,
         asyncpg.exceptions.TransactionRollbackError)


def unavailable_error() -> ServiceUnavailable:
    return ServiceUnavailable("The ledger database is unreachable: the request was not run and is not billed. "
                              "Retry shortly.", headers={"Retry-After": "2"},
                              detail="PostgreSQL unreachable (database.backend postgres)")


def _lost(exc: BaseException, conn: Any) -> bool:
    return isinstance(exc, _LOST) or conn is None or conn.is_closed()


class PostgresStorage:
    """The Ledger and the AccountStore (proxyd/storage/__init__.py) of one PostgreSQL database."""

    def __init__(self, dsn: str, *, batch_max: int = 512, write_wait_s: float = 5.0, instance_stale_s: float = 30.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.dsn = dsn
        self.batch_max = batch_max
        self.write_wait_s = write_wait_s
        self.instance_stale_s = instance_stale_s
        self.clock = clock
        self.instance_id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        self.queue_depth = 0
        self.last_commit_s = 0.0
        self.commits = 0
        self.writes = 0
        self.unavailable = False
        self._queue: list = []  # (row, future or None, settled?)
        self._wake: asyncio.Future | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conn: Any = None  # the writer's
        self._pool: Any = None  # reads and account writes
        self._pool_lock: asyncio.Lock | None = None
        self._tasks: list[asyncio.Task] = []
        self._closing = False
        self._on_change: Callable[[str | None], Awaitable[Any]] | None = None
        self._change_lock: asyncio.Lock | None = None
        self._reloads: set[asyncio.Task] = set()

    # -- lifecycle --------------------------------------------------------------------------------------

    def _named(self, role: str) -> dict[str, str]:
        """application_name of a connection: pg_stat_activity tells which instance holds it, and what for."""
        return {"application_name": f"proxyd {role} {self.instance_id}"[:63]}

    def _sync(self, fn: Callable[[Any], Awaitable[Any]]) -> Any:
        """Runs ``fn(conn)`` to completion on a private loop and connection (start-up: the serving loop may
        be running already and cannot be re-entered). Raises StorageError."""
        async def run() -> Any:
            conn = await asyncpg.connect(self.dsn, timeout=10)
            try:
                return await fn(conn)
            finally:
                await conn.close()

        try:
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-startup") as pool:
                return pool.submit(asyncio.run, run()).result()
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, asyncio.TimeoutError, ValueError) as exc:
            raise StorageError(f"PostgreSQL: {exc}") from exc

    def open(self) -> None:
        async def op(conn) -> None:
            done = await apply_migrations(conn)
            if done:
                slog.info("ledger (postgres): applied migrations %s", ", ".join(done))
            await conn.execute(_HEARTBEAT, self.instance_id, socket.gethostname(), os.getpid())

        self._sync(op)

    def expire_stale_pending(self) -> int:
        async def op(conn) -> int:
            return _count(await conn.execute(_EXPIRE, iso_s(self.clock()), self.instance_stale_s))

        return self._sync(op)

    def bind_loop(self, loop: Any) -> None:
        self._loop = loop
        self._pool_lock = asyncio.Lock()
        self._change_lock = asyncio.Lock()
        self._tasks = [loop.create_task(self._write_loop()), loop.create_task(self._heartbeat_loop()),
                       loop.create_task(self._listen_loop())]

    async def close(self) -> None:
        if self._loop is None:
            return
        self._closing = True
        self._wake_writer()
        writer, *others = self._tasks
        await writer  # drains every queued write
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        try:
            pool = await self._get_pool()
            await pool.execute("DELETE FROM proxyd_instances WHERE instance_id = $1", self.instance_id, timeout=2)
        except Exception:  # gone anyway once its heartbeat is stale
            pass
        for conn in (self._conn,):
            if conn is not None and not conn.is_closed():
                conn.terminate()
        if self._pool is not None:
            self._pool.terminate()
        self._loop = None

    # -- the request path ---------------------------------------------------------------------------------

    def record_pending(self, row: RequestRow) -> None:
        self.queue_depth += 1
        self._queue.append((row, None, False))
        self._wake_writer()

    def record_settled(self, row: RequestRow):
        fut = self._loop.create_future()
        self.queue_depth += 1
        self._queue.append((row, fut, True))
        self._wake_writer()
        return fut

    def record_voided(self, row: RequestRow) -> None:
        self.queue_depth += 1
        self._queue.append((row, None, False))
        self._wake_writer()

    def _wake_writer(self) -> None:
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    async def _write_loop(self) -> None:
        queue = self._queue
        while True:
            if not queue:
                if self._closing:
                    return
                self._wake = self._loop.create_future()
                await self._wake
                continue
            batch = queue[:self.batch_max]
            del queue[:len(batch)]
            try:
                await self._commit(batch)
            except Exception as exc:  # never leave a request waiting for its row
                slog.exception("ledger writer failed")
                self._resolve(batch, exc)

    async def _writer_conn(self) -> Any:
        conn = self._conn
        if conn is None or conn.is_closed():
            conn = self._conn = await asyncpg.connect(self.dsn, timeout=2, server_settings=self._named("writer"),
                                                      command_timeout=max(self.write_wait_s, 2.0))
        return conn

    async def _commit(self, batch: list) -> None:
        started = time.perf_counter()
        rows: dict[str, tuple] = {}
        sums: dict[tuple, list] = {}
        first_settled = None
        for row, _fut, settled in batch:
            rows[row[0]] = row  # a request's later row wins (pending, then final)
            if settled:
                # The daily aggregate's share read off the row, as SQLiteStorage.record_settled.
                key = (row[1], row[3], row[7], row[4], row[21] or "default", row[17], row[18])
                acc = sums.get(key)
                if acc is None:
                    sums[key] = [1, row[14] or 0, row[15] or 0, row[19] or 0]
                else:
                    acc[0] += 1
                    acc[1] += row[14] or 0
                    acc[2] += row[15] or 0
                    acc[3] += row[19] or 0
                if first_settled is None:
                    first_settled = row[0]
        columns = list(zip(*rows.values()))
        daily = list(zip(*[(*k, *v) for k, v in sorted(sums.items())])) if sums else None
        deadline = time.monotonic() + self.write_wait_s
        retry = False
        while True:
            conn = None
            try:
                conn = await self._writer_conn()
                async with conn.transaction():
                    if retry and first_settled is not None and await conn.fetchval(
                            "SELECT 1 FROM requests WHERE id = $1 AND status = 'settled'", first_settled):
                        break  # it committed before the connection dropped: aggregates too (one transaction)
                    await conn.execute(_UPSERT, *columns, self.instance_id)
                    if daily:
                        await conn.execute(_DAILY, *daily)
                break
            except Exception as exc:
                if not _lost(exc, conn):
                    await self._one_by_one(batch, started)  # a bad row: it fails alone
                    return
                if conn is not None and not conn.is_closed():
                    conn.terminate()
                self._conn = None
                if not self.unavailable:
                    slog.error("ledger (postgres) unreachable: %s; retrying for up to %ss", exc, self.write_wait_s)
                self.unavailable = True
                if time.monotonic() >= deadline or self._closing and retry:
                    self._resolve(batch, None)
                    return
                retry = True
                await asyncio.sleep(0.2)
        self.unavailable = False
        self.last_commit_s = time.perf_counter() - started
        self.commits += 1
        self.writes += len(batch)
        self._resolve(batch, True)

    async def _one_by_one(self, batch: list, started: float) -> None:
        """Each write in a transaction of its own, so that one bad row fails alone (as the SQLite writer's
        savepoints)."""
        ok = 0
        for item in batch:
            row, _fut, settled = item
            try:
                conn = await self._writer_conn()
                async with conn.transaction():
                    await conn.execute(_UPSERT, *[(v,) for v in row], self.instance_id)
                    if settled:
                        await conn.execute(_DAILY, *[(v,) for v in (row[1], row[3], row[7], row[4], row[21] or "default",
                                                                   row[17], row[18], 1, row[14] or 0, row[15] or 0,
                                                                   row[19] or 0)])
                ok += 1
                self._resolve([item], True)
            except Exception as exc:
                self._resolve([item], None if _lost(exc, self._conn) else exc)
        self.last_commit_s = time.perf_counter() - started
        if ok:
            self.commits += 1
            self.writes += ok

    def _resolve(self, batch: list, outcome: Any) -> None:
        """True: committed. None: the database was unreachable (503). Else the exception to raise."""
        failed = 0
        for _row, fut, _settled in batch:
            self.queue_depth -= 1
            if outcome is not True:
                failed += 1
            if fut is None or fut.done():
                continue
            if outcome is True:
                fut.set_result(None)
            else:
                fut.set_exception(unavailable_error() if outcome is None else outcome)
        if failed and outcome is not True:
            log.error("ledger write failed for %d rows: %s", failed,
                      "PostgreSQL unreachable" if outcome is None else outcome)

    # -- heartbeat, expiry of dead instances' rows, LISTEN ----------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        every = max(self.instance_stale_s / 6, 0.1)
        last = time.monotonic()
        while True:
            # Short naps, not one sleep of ``every``: once the writer finds the database gone, new requests
            # are refused and this probe is all that can find it back, so it must start within 0.5 s, not
            # when a regular interval begun before the outage runs out (up to 5 s of needless 503s).
            await asyncio.sleep(min(every, 0.5))
            if not self.unavailable and time.monotonic() - last < every:
                continue
            last = time.monotonic()
            try:
                try:
                    expired = await self._beat()
                except _LOST:  # a pooled connection that died idle (the pool replaces it): once more, anew
                    expired = await self._beat()
                if expired:
                    slog.warning("expired %d pending rows of instances silent for over %ss", expired,
                                 self.instance_stale_s)
                if self.unavailable:
                    slog.info("ledger (postgres) reachable again")
                    self.unavailable = False
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not self.unavailable:
                    slog.error("ledger (postgres) heartbeat failed: %s", exc)
                self.unavailable = True

    async def _beat(self) -> int:
        """The heartbeat; expires the pending rows of dead instances (how many) and forgets those instances."""
        pool = await self._get_pool()
        async with pool.acquire(timeout=2) as conn:
            await conn.execute(_HEARTBEAT, self.instance_id, socket.gethostname(), os.getpid(), timeout=2)
            expired = _count(await conn.execute(_EXPIRE, iso_s(self.clock()), self.instance_stale_s, timeout=5))
            await conn.execute("DELETE FROM proxyd_instances WHERE heartbeat_at < now() - make_interval(secs => $1)",
                               self.instance_stale_s, timeout=2)
        return expired

    def watch(self, on_change: Callable[[str | None], Awaitable[Any]]) -> None:
        """``on_change(user_id)`` runs (one at a time, in order) when another instance changed that user or its
        keys; ``on_change(None)`` when everything must be reloaded (LISTEN (re)connected)."""
        self._on_change = on_change

    async def _changed(self, user_id: str | None) -> None:
        if self._on_change is None:
            return
        async with self._change_lock:  # FIFO: a later read is applied after an earlier one
            try:
                await self._on_change(user_id)
            except Exception:
                slog.exception("reloading %s after a change by another instance failed",
                               "every user" if user_id is None else f"user {user_id}")

    def _notified(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        try:
            msg = json.loads(payload)
        except ValueError:
            return
        if msg.get("i") != self.instance_id:
            task = self._loop.create_task(self._changed(msg.get("u")))
            self._reloads.add(task)  # the loop keeps only weak references to tasks
            task.add_done_callback(self._reloads.discard)

    async def _listen_loop(self) -> None:
        while True:
            conn = None
            try:
                conn = await asyncpg.connect(self.dsn, timeout=2, server_settings=self._named("listen"))
                lost = self._loop.create_future()
                conn.add_termination_listener(lambda _c: lost.done() or lost.set_result(None))
                await conn.add_listener(CHANNEL, self._notified)
                await self._changed(None)  # whatever changed before LISTEN began (start-up, or while it was lost)
                while not lost.done():
                    try:
                        await asyncio.wait_for(asyncio.shield(lost), 5)
                    except asyncio.TimeoutError:
                        await conn.execute("SELECT 1", timeout=2)  # a silently dead connection raises here
                slog.warning("LISTEN connection to PostgreSQL lost; reconnecting")
            except asyncio.CancelledError:
                if conn is not None:
                    conn.terminate()
                raise
            except Exception as exc:
                slog.warning("LISTEN connection to PostgreSQL failed: %s; retrying", exc)
            if conn is not None and not conn.is_closed():
                conn.terminate()
            await asyncio.sleep(0.5)

    # -- reads ------------------------------------------------------------------------------------------------

    async def _get_pool(self) -> Any:
        if self._pool is None:
            async with self._pool_lock:
                if self._pool is None:
                    self._pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=4, timeout=2,
                                                           server_settings=self._named("pool"),
                                                           command_timeout=60)
        return self._pool

    async def _read(self, fn: Callable[[Any], Awaitable[Any]]) -> Any:
        try:
            pool = await self._get_pool()
            async with pool.acquire(timeout=5) as conn:
                return await fn(conn)
        except Exception as exc:
            if isinstance(exc, _LOST):
                raise unavailable_error() from exc
            raise

    async def fetch(self, sql: str, *params: Any) -> list[tuple]:
        """Rows of any query, as tuples (tests and tools; nothing on the request path)."""
        return await self._read(lambda c: _tuples(c.fetch(sql, *params)))

    async def execute(self, sql: str, *params: Any) -> str:
        return await self._read(lambda c: c.execute(sql, *params))

    # -- start-up seeding --------------------------------------------------------------------------------------

    def period_usage(self, day: str, month: str) -> PeriodUsage:
        return self._sync(lambda conn: period_usage(conn, day, month))

    def recent_requests(self, since: float) -> list[RecentRequest]:
        return self._sync(lambda conn: recent_requests(conn, since))

    # -- reports -----------------------------------------------------------------------------------------------

    async def usage(self, *, user_id: str | None, start: str, end: str, group_by: str,
                    model: str | None) -> list[UsageRow]:
        return await self._read(lambda c: usage_rows(c, user_id=user_id, start=start, end=end, group_by=group_by,
                                                     model=model))

    async def invoice_lines(self, *, period: str, user_id: str | None) -> list[InvoiceLine]:
        return await self._read(lambda c: invoice_lines(c, period=period, user_id=user_id))

    async def check(self, *, start: str | None = None, end: str | None = None) -> dict[str, Any]:
        return await self._read(lambda c: consistency(c, start=start, end=end))

    # -- the dashboard's reads (issue #17; the port gained them on main with the dashboard) ------------------

    async def usage_by_day_and_model(self, *, user_id: str | None, start: str, end: str) -> list:
        from . import DayModelRow  # a name of the port as merged with the dashboard

        where, params = "day >= $1 AND day <= $2", [start, end]
        if user_id is not None:
            where += " AND user_id = $3"
            params.append(user_id)
        rows = await self.fetch(
            "SELECT day, model, SUM(requests)::bigint, SUM(prompt_tokens)::bigint, SUM(completion_tokens)::bigint,"
            f" SUM(cost_nusd)::bigint FROM usage_daily WHERE {where} GROUP BY day, model ORDER BY day, model", *params)
        return [DayModelRow(*r) for r in rows]

    async def last_request_at(self, user_ids: list[str]) -> dict[str, str]:
        # One index probe per user (requests (user_id, day, id)), all in one round trip.
        rows = await self.fetch(
            "SELECT u, r.created_at FROM unnest($1::text[]) AS u CROSS JOIN LATERAL (SELECT created_at FROM requests"
            " WHERE user_id = u ORDER BY day DESC, id DESC LIMIT 1) AS r", list(user_ids))
        return dict(rows)

    async def user_requests(self, *, user_id: str, limit: int, cursor: str | None) -> tuple[list, str | None]:
        """Keyset pages by (day, id): request ids begin with their time, so within a day id order is time
        order (across instances too); the cursor is "day,id"."""
        from . import RequestListing  # a name of the port as merged with the dashboard

        sql = ("SELECT day, id, created_at, model, endpoint, status, http_status, prompt_tokens, completion_tokens,"
               " cost_nusd, latency_ms FROM requests WHERE user_id = $1")
        params: list[Any] = [user_id]
        if cursor is not None:
            day, _, after = cursor.partition(",")
            if len(day) != 10 or not _REQUEST_ID.fullmatch(after):
                raise ValueError("not a cursor of this ledger")
            sql += " AND (day, id) < ($2, $3)"
            params += [day, after]
        rows = await self.fetch(sql + f" ORDER BY day DESC, id DESC LIMIT ${len(params) + 1}", *params, limit + 1)
        more = len(rows) > limit
        rows = rows[:limit]
        return [RequestListing(*r[1:]) for r in rows], (f"{rows[-1][0]},{rows[-1][1]}" if more else None)

    # -- accounts ----------------------------------------------------------------------------------------------

    def load(self) -> tuple[list[UserRecord], list[KeyRow]]:
        return self._sync(lambda conn: accounts(conn, None))

    async def fetch_accounts(self, user_id: str | None) -> tuple[list[UserRecord], list[KeyRow]]:
        """One user and its keys (None: everyone), as ``load`` reads them: for reloading after a change."""
        return await self._read(lambda c: accounts(c, user_id))

    async def _account_write(self, user_id: str, statements: list[tuple]) -> None:
        """The statements and a NOTIFY naming the user, in one transaction: other instances reload the user
        once the change is committed, never before."""
        payload = json.dumps({"i": self.instance_id, "u": user_id})

        async def op(conn) -> None:
            async with conn.transaction():
                for sql, *params in statements:
                    await conn.execute(sql, *params)
                await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, payload)

        try:
            await self._read(op)
        except asyncpg.UniqueViolationError as exc:
            raise Conflict(f"User '{user_id}' already exists.", code="user_exists") from exc

    async def insert_user(self, user: UserRecord, key: KeyRow) -> None:
        await self._account_write(user.user_id, [
            ("INSERT INTO users (user_id, created_at, disabled, limits_json) VALUES ($1, $2, $3, $4)",
             user.user_id, user.created_at, bool(user.disabled), _limits_json(user.limits)),
            _insert_key(key)])

    async def insert_key(self, key: KeyRow) -> None:
        await self._account_write(key.user_id, [_insert_key(key)])

    async def revoke_key(self, key_id: str, revoked_at: str) -> None:
        # The user's id for the notification comes from the row itself (RETURNING would need a fetch).
        await self._account_write(await self._read(lambda c: c.fetchval(
            "SELECT user_id FROM api_keys WHERE key_id = $1", key_id)) or "",
            [("UPDATE api_keys SET revoked_at = $1 WHERE key_id = $2 AND revoked_at IS NULL", revoked_at,
              key_id)])

    async def set_disabled(self, user_id: str, disabled: bool) -> None:
        await self._account_write(user_id, [("UPDATE users SET disabled = $1 WHERE user_id = $2", disabled, user_id)])

    async def set_limits(self, user_id: str, limits: Any) -> None:
        await self._account_write(user_id, [("UPDATE users SET limits_json = $1 WHERE user_id = $2",
                                             _limits_json(limits), user_id)])


def check_dsn(dsn: str) -> dict[str, Any]:
    """The whole-ledger consistency check of the database at ``dsn`` (``python app.py --check-ledger``)."""
    return PostgresStorage(dsn)._sync(consistency)


def _insert_key(key: KeyRow) -> tuple:
    return ("INSERT INTO api_keys (key_id, user_id, key_hash, prefix, created_at, revoked_at)"
            " VALUES ($1, $2, $3, $4, $5, $6)", key.key_id, key.user_id, key.key_hash, key.prefix, key.created_at,
            key.revoked_at)


def _limits_json(limits: Any) -> str | None:
    return json.dumps(limits) if limits else None


def _count(status: str) -> int:
    """The row count of a command status ("UPDATE 3")."""
    return int(status.rsplit(" ", 1)[-1])


async def _tuples(rows: Awaitable[list]) -> list[tuple]:
    return [tuple(r) for r in await rows]


# -- queries (each takes an asyncpg connection) ------------------------------------------------------------------


async def accounts(conn: Any, user_id: str | None) -> tuple[list[UserRecord], list[KeyRow]]:
    where, params = ("WHERE user_id = $1", (user_id,)) if user_id is not None else ("", ())
    users = await conn.fetch(f"SELECT user_id, created_at, disabled, limits_json FROM users {where}", *params)
    keys = await conn.fetch(f"SELECT key_id, user_id, prefix, created_at, key_hash, revoked_at FROM api_keys {where}",
                            *params)
    return ([UserRecord(u, created, bool(disabled), json.loads(limits) if limits else None)
             for u, created, disabled, limits in users],
            [KeyRow(*k) for k in keys])


async def period_usage(conn: Any, day: str, month: str) -> PeriodUsage:
    base = ("SELECT user_id, model, SUM(requests)::bigint, SUM(prompt_tokens + completion_tokens)::bigint,"
            " SUM(cost_nusd)::bigint FROM usage_daily")
    grp = " GROUP BY user_id, model"

    async def sums(sql: str, *params: Any) -> list[Sums]:
        return [Sums(u, m, n or 0, tokens or 0, cost or 0) for u, m, n, tokens, cost in await conn.fetch(sql, *params)]

    return PeriodUsage(await sums(base + " WHERE day = $1" + grp, day),
                       await sums(base + " WHERE day >= $1 AND day < $2" + grp, month + "-01", month + "-32"),
                       await sums(base + grp))


async def recent_requests(conn: Any, since: float) -> list[RecentRequest]:
    rows = await conn.fetch("SELECT user_id, model, created_at, status, prompt_tokens, completion_tokens FROM requests"
                            " WHERE created_at >= $1 AND status IN ('settled', 'voided')", iso_ms(since))
    return [RecentRequest(from_iso_ms(created_at), user_id, model, (prompt or 0) + (completion or 0), status == "voided")
            for user_id, model, created_at, status, prompt, completion in rows]


async def usage_rows(conn: Any, *, user_id: str | None, start: str, end: str, group_by: str,
                     model: str | None) -> list[UsageRow]:
    column = {"model": "model", "day": "day", "user": "user_id", "endpoint": "endpoint", "upstream": "upstream"}[group_by]
    where, params = ["day >= $1", "day <= $2"], [start, end]
    if user_id is not None:
        params.append(user_id)
        where.append(f"user_id = ${len(params)}")
    if model is not None:
        params.append(model)
        where.append(f"model = ${len(params)}")
    rows = await conn.fetch(
        f"SELECT {column} AS k, SUM(requests)::bigint, SUM(prompt_tokens)::bigint, SUM(completion_tokens)::bigint,"
        f" SUM(cost_nusd)::bigint FROM usage_daily WHERE {' AND '.join(where)} GROUP BY {column} ORDER BY {column}",
        *params)
    return [UsageRow(*r) for r in rows]


async def invoice_lines(conn: Any, *, period: str, user_id: str | None) -> list[InvoiceLine]:
    where, params = ["day >= $1", "day < $2"], [period + "-01", period + "-32"]
    if user_id is not None:
        params.append(user_id)
        where.append("user_id = $3")
    rows = await conn.fetch(
        "SELECT user_id, model, input_price_nusd_per_mtok, output_price_nusd_per_mtok, SUM(requests)::bigint,"
        " SUM(prompt_tokens)::bigint, SUM(completion_tokens)::bigint, SUM(cost_nusd)::bigint FROM usage_daily"
        f" WHERE {' AND '.join(where)} GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4",
        *params)
    return [InvoiceLine(*r) for r in rows]


async def consistency(conn: Any, *, start: str | None = None, end: str | None = None) -> dict[str, Any]:
    """Do the daily aggregates equal the sums of the settled rows? As sqlite.consistency; the ranged form
    reads the range's rows through the (day) index."""
    if (start is None) != (end is None):
        raise ValueError("start and end go together")
    if start is None:
        rows_where, daily_where, params = "status = 'settled'", "", ()
        status_sql = "SELECT status, COUNT(*) FROM requests GROUP BY status"
    else:
        rows_where = "status = 'settled' AND day BETWEEN $1 AND $2"
        daily_where, params = "WHERE day BETWEEN $1 AND $2", (start, end)
        status_sql = "SELECT status, COUNT(*) FROM requests WHERE day BETWEEN $1 AND $2 GROUP BY status"
    key = _DAILY_KEY
    diffs = await conn.fetch(
        f"""
        WITH r AS (
            SELECT user_id, model, day, endpoint, COALESCE(upstream, 'default') AS upstream,
                   COALESCE(input_price_nusd_per_mtok, 0) AS input_price_nusd_per_mtok,
                   COALESCE(output_price_nusd_per_mtok, 0) AS output_price_nusd_per_mtok, COUNT(*) AS requests,
                   SUM(prompt_tokens)::bigint AS p, SUM(completion_tokens)::bigint AS c, SUM(cost_nusd)::bigint AS cost
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
        *params)
    counts = {status: n for status, n in await conn.fetch(status_sql, *params)}
    return {"ok": not diffs, "start": start, "end": end, "mismatches": [list(d) for d in diffs],
            "requests_by_status": counts}
