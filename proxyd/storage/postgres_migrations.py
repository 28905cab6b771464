"""Numbered, append-only schema migrations of the PostgreSQL backend (``database.backend: postgres``).

The same rules as ``sqlite_migrations.py``: never edit, rename or reorder a migration that has shipped; add a
new one. Each applied one is recorded by name in ``proxyd_migrations``. The numbering is this backend's own:
a PostgreSQL ledger starts at the schema SQLite reached with its m006 (requests with upstream and attempts,
daily aggregates keyed by user, model, day, endpoint, upstream and prices), so its m001-m002 create that
directly, and m003 adds what only several instances need (which instance wrote a pending row, and each
instance's heartbeat).

Several instances may start at once against one database: ``apply`` holds a transaction-level advisory lock
(one fixed key) while it reads what was applied and applies the rest, each migration in the transaction
with its record, so a second instance waits and then finds nothing left to do.

Types: times stay the ISO 8601 text the SQLite ledger stores (``iso_ms``), so rows cross the port
unchanged and sort as text the same way; money and tokens are bigint (sums are cast back to bigint, since
PostgreSQL's SUM of bigint is numeric).
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("proxyd.migrations")

# pg_advisory_xact_lock key: "proxyd" in ASCII, so no other application's lock is likely to collide with it.
LOCK_KEY = 0x70726F787964


def m001_users_and_keys() -> str:
    return """
    CREATE TABLE users (
        user_id text PRIMARY KEY,
        created_at text NOT NULL,
        disabled boolean NOT NULL DEFAULT false,
        limits_json text
    );
    CREATE TABLE api_keys (
        key_id text PRIMARY KEY,
        user_id text NOT NULL REFERENCES users (user_id),
        key_hash text NOT NULL UNIQUE,
        prefix text,
        created_at text NOT NULL,
        revoked_at text
    );
    CREATE INDEX idx_api_keys_user_id ON api_keys (user_id);
    """


def m002_ledger() -> str:
    # requests: REQUEST_COLUMNS in order. The (day) index serves the ranged consistency check; the partial
    # index finds the few pending rows; a BRIN index on created_at (a few pages for millions of rows, next
    # to nothing per insert) serves the start-up read of the last minute, since rows arrive in time order.
    return """
    CREATE TABLE requests (
        id text PRIMARY KEY,
        user_id text NOT NULL,
        key_id text,
        model text NOT NULL,
        endpoint text NOT NULL,
        stream integer,
        status text NOT NULL,
        day text NOT NULL,
        created_at text NOT NULL,
        reserved_prompt bigint,
        reserved_completion bigint,
        http_status integer,
        finished_at text,
        latency_ms bigint,
        prompt_tokens bigint,
        completion_tokens bigint,
        usage_source text,
        input_price_nusd_per_mtok bigint,
        output_price_nusd_per_mtok bigint,
        cost_nusd bigint,
        error text,
        upstream text,
        attempts integer
    );
    CREATE INDEX idx_requests_day ON requests (day);
    CREATE INDEX idx_requests_pending ON requests (id) WHERE status = 'pending';
    CREATE INDEX idx_requests_created_at ON requests USING brin (created_at);
    CREATE TABLE usage_daily (
        user_id text NOT NULL,
        model text NOT NULL,
        day text NOT NULL,
        endpoint text NOT NULL,
        upstream text NOT NULL,
        input_price_nusd_per_mtok bigint NOT NULL,
        output_price_nusd_per_mtok bigint NOT NULL,
        requests bigint NOT NULL,
        prompt_tokens bigint NOT NULL,
        completion_tokens bigint NOT NULL,
        cost_nusd bigint NOT NULL,
        PRIMARY KEY (user_id, model, day, endpoint, upstream, input_price_nusd_per_mtok, output_price_nusd_per_mtok)
    );
    CREATE INDEX idx_usage_daily_day ON usage_daily (day);
    """


def m003_instances() -> str:
    # A pending row names the instance that admitted it; an instance whose heartbeat is older than
    # database.instance_stale_s is dead, and only its pending rows are expired (never a live one's).
    return """
    ALTER TABLE requests ADD COLUMN instance_id text;
    CREATE TABLE proxyd_instances (
        instance_id text PRIMARY KEY,
        started_at timestamptz NOT NULL DEFAULT now(),
        heartbeat_at timestamptz NOT NULL DEFAULT now(),
        host text,
        pid integer
    );
    """


MIGRATIONS = (m001_users_and_keys, m002_ledger, m003_instances)


async def apply(conn: Any) -> list[str]:
    """Applies the migrations not yet recorded, under the advisory lock; returns their names."""
    done: list[str] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", LOCK_KEY)
        await conn.execute("CREATE TABLE IF NOT EXISTS proxyd_migrations (name text PRIMARY KEY,"
                           " applied_at timestamptz NOT NULL DEFAULT now())")
        applied = {r[0] for r in await conn.fetch("SELECT name FROM proxyd_migrations")}
        for migration in MIGRATIONS:
            if migration.__name__ in applied:
                continue
            log.info("ledger (postgres): applying migration %s", migration.__name__)
            await conn.execute(migration())
            await conn.execute("INSERT INTO proxyd_migrations (name) VALUES ($1)", migration.__name__)
            done.append(migration.__name__)
    return done


async def applied(conn: Any) -> list[str]:
    return [r[0] for r in await conn.fetch("SELECT name FROM proxyd_migrations ORDER BY name")]
