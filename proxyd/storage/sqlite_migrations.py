"""Numbered, append-only schema migrations (sqlite-utils' Migrations records each one applied).

Never edit, rename or reorder a migration that has shipped: add a new one. A database records each applied
migration by its function's name (under the set "proxyd"), so the names stay as they are wherever the module
lives; so does the logger's name, "proxyd.migrations". ``tests/test_migrations.py`` asserts the resulting
schema of a blank database.
"""

from __future__ import annotations

import logging

from sqlite_utils import Database, Migrations

log = logging.getLogger("proxyd.migrations")
migrations = Migrations("proxyd")


@migrations()
def m001_users_and_keys(db: Database) -> None:
    db["users"].create(
        {"user_id": str, "created_at": str, "disabled": int, "limits_json": str},
        pk="user_id",
        not_null={"created_at", "disabled"},
        defaults={"disabled": 0},
    )
    # Only a SHA-256 of each key is stored; `prefix` (the first characters) helps people tell keys apart.
    db["api_keys"].create(
        {"key_id": str, "user_id": str, "key_hash": str, "prefix": str, "created_at": str, "revoked_at": str},
        pk="key_id",
        foreign_keys=[("user_id", "users", "user_id")],
        not_null={"user_id", "key_hash", "created_at"},
    )
    db["api_keys"].create_index(["key_hash"], unique=True)
    db["api_keys"].create_index(["user_id"])


@migrations()
def m002_ledger(db: Database) -> None:
    # One row per admitted request. status: pending -> settled | voided, or expired on restart after a crash.
    # Money is integer nano-USD (1e-9 USD): exact for prices with up to three decimals per million tokens.
    db["requests"].create(
        {
            "id": str,
            "user_id": str,
            "key_id": str,
            "model": str,
            "endpoint": str,
            "stream": int,
            "status": str,
            "http_status": int,
            "day": str,  # UTC day the request was admitted: the period it is billed to
            "created_at": str,
            "finished_at": str,
            "latency_ms": int,
            "reserved_prompt": int,
            "reserved_completion": int,
            "prompt_tokens": int,
            "completion_tokens": int,
            "usage_source": str,  # reported | counted | none
            "input_price_nusd_per_mtok": int,  # the price in force at settle time, per million tokens
            "output_price_nusd_per_mtok": int,
            "cost_nusd": int,
            "error": str,
        },
        pk="id",
        not_null={"user_id", "model", "endpoint", "status", "day", "created_at"},
    )
    db["requests"].create_index(["user_id", "day"])
    db["requests"].create_index(["status"])
    # Per user/model/day sums of settled requests, kept in the same transaction as each settle, so usage
    # and invoice queries read a few rows instead of millions.
    db["usage_daily"].create(
        {
            "user_id": str,
            "model": str,
            "day": str,
            "requests": int,
            "prompt_tokens": int,
            "completion_tokens": int,
            "cost_nusd": int,
        },
        pk=("user_id", "model", "day"),
    )
    db["usage_daily"].create_index(["day"])


@migrations()
def m003_pending_index_only(db: Database) -> None:
    # The index on status existed to find the rows a crash left 'pending' at start-up. Nearly every row
    # is written once, already settled, so a full index made each ledger insert update one more B-tree
    # for nothing; a partial index holds only the (few, short-lived) pending rows.
    db.execute("DROP INDEX IF EXISTS idx_requests_status")
    db.execute("CREATE INDEX idx_requests_pending ON requests (id) WHERE status = 'pending'")


@migrations()
def m004_daily_aggregates_by_price(db: Database) -> None:
    # Invoices have a line per model and price in force, so they used to sum the month's request rows:
    # 3 s for a month of 3M rows, on the one reader thread. Keyed by price as well, the daily aggregate
    # answers invoices and usage alike from a few rows per user, model and day. Rebuilt from the request
    # rows, the ledger's source of truth (which also splits days that saw a price change).
    db.execute("ALTER TABLE usage_daily RENAME TO usage_daily_m002")
    db.execute("DROP INDEX IF EXISTS idx_usage_daily_day")
    db["usage_daily"].create(
        {
            "user_id": str,
            "model": str,
            "day": str,
            "input_price_nusd_per_mtok": int,
            "output_price_nusd_per_mtok": int,
            "requests": int,
            "prompt_tokens": int,
            "completion_tokens": int,
            "cost_nusd": int,
        },
        pk=("user_id", "model", "day", "input_price_nusd_per_mtok", "output_price_nusd_per_mtok"),
        # NULL in a key column would never match ON CONFLICT: every settle would add a row instead.
        not_null={"user_id", "model", "day", "input_price_nusd_per_mtok", "output_price_nusd_per_mtok"},
    )
    db["usage_daily"].create_index(["day"])
    db.execute(
        "INSERT INTO usage_daily SELECT user_id, model, day, COALESCE(input_price_nusd_per_mtok, 0),"
        " COALESCE(output_price_nusd_per_mtok, 0), COUNT(*), SUM(COALESCE(prompt_tokens, 0)),"
        " SUM(COALESCE(completion_tokens, 0)), SUM(COALESCE(cost_nusd, 0))"
        " FROM requests WHERE status = 'settled' GROUP BY 1, 2, 3, 4, 5"
    )
    # Old aggregates that disagreed with the rows (which /admin/ledger/check would have reported) change
    # here: usage figures and the limits' day/month/total follow the rows from now on. Say so, with the
    # figures, so that a changed usage report or quota can be explained.
    changed = db.execute(
        "WITH n AS (SELECT user_id, model, day, SUM(requests) AS r, SUM(prompt_tokens) AS p,"
        " SUM(completion_tokens) AS c, SUM(cost_nusd) AS cost FROM usage_daily GROUP BY 1, 2, 3),"
        " k AS (SELECT user_id, model, day FROM n UNION SELECT user_id, model, day FROM usage_daily_m002)"
        " SELECT k.user_id, k.model, k.day, COALESCE(o.requests, 0), COALESCE(n.r, 0), COALESCE(o.prompt_tokens, 0),"
        " COALESCE(n.p, 0), COALESCE(o.completion_tokens, 0), COALESCE(n.c, 0), COALESCE(o.cost_nusd, 0),"
        " COALESCE(n.cost, 0) FROM k LEFT JOIN n USING (user_id, model, day)"
        " LEFT JOIN usage_daily_m002 o USING (user_id, model, day)"
        " WHERE COALESCE(o.requests, 0) != COALESCE(n.r, 0) OR COALESCE(o.prompt_tokens, 0) != COALESCE(n.p, 0)"
        " OR COALESCE(o.completion_tokens, 0) != COALESCE(n.c, 0) OR COALESCE(o.cost_nusd, 0) != COALESCE(n.cost, 0)"
    ).fetchall()
    for row in changed:
        log.warning("m004: daily aggregate of user %s, model %s, day %s rebuilt from the request rows: requests %s -> %s,"
                    " prompt tokens %s -> %s, completion tokens %s -> %s, cost (nano-USD) %s -> %s", *row)
    db.execute("DROP TABLE usage_daily_m002")


def _m005_canonical(name: str) -> str:
    # proxyd/modelname.py's canonical() as of m005, copied: a migration must not change when that does.
    if name is None:
        return name
    folded = name.strip().lower()
    for prefix in ("registry.ollama.ai/", "library/"):
        if folded.startswith(prefix):
            folded = folded[len(prefix):]
    if not folded or folded.startswith(":"):
        return name  # not a model name Ollama would serve: left as it was
    return folded if ":" in folded.rsplit("/", 1)[-1] else folded + ":latest"


@migrations()
def m005_model_names_as_ollama_matches_them(db: Database) -> None:
    # Requests are now recorded under one name per Ollama model (proxyd/modelname.py): "moondream" and
    # "MoonDream" became "moondream:latest". Rows written before keep the client's spelling unless
    # rewritten, and then a model's usage splits over two names: a per-model day/month/total limit
    # would not see the earlier part, and the month's invoice would show the model twice.
    db.conn.create_function("proxyd_m005_canonical", 1, _m005_canonical, deterministic=True)
    changed = db.execute(
        "SELECT model, proxyd_m005_canonical(model), COUNT(*) FROM requests"
        " WHERE model != proxyd_m005_canonical(model) GROUP BY 1"
    ).fetchall()
    for old, new, n in changed:
        log.info("m005: %d request rows of model %r recorded as %r", n, old, new)
    if not changed:
        return
    db.execute("UPDATE requests SET model = proxyd_m005_canonical(model) WHERE model != proxyd_m005_canonical(model)")
    # Aggregates of two spellings of one model on one day and price merge into one row.
    db.execute(
        "CREATE TEMP TABLE usage_daily_m005 AS SELECT user_id, proxyd_m005_canonical(model) AS model, day,"
        " input_price_nusd_per_mtok, output_price_nusd_per_mtok, SUM(requests) AS requests,"
        " SUM(prompt_tokens) AS prompt_tokens, SUM(completion_tokens) AS completion_tokens,"
        " SUM(cost_nusd) AS cost_nusd FROM usage_daily GROUP BY 1, 2, 3, 4, 5"
    )
    db.execute("DELETE FROM usage_daily")
    db.execute("INSERT INTO usage_daily SELECT * FROM usage_daily_m005")
    db.execute("DROP TABLE usage_daily_m005")


@migrations()
def m006_endpoint_and_upstream(db: Database) -> None:
    # Several dialects (issue #14) and several upstreams (issue #15) are reported on: usage by endpoint,
    # usage by upstream, and which upstream served a request in how many attempts. The request rows get
    # the upstream and the attempts; the daily aggregate is keyed by endpoint and upstream as well, so those
    # reports read aggregates too. Rows written before name no upstream: they were all served by the one
    # upstream, which is now called "default" (``COALESCE`` below and in the consistency check, rather than
    # rewriting every old row). The aggregate is rebuilt from the rows (it had no endpoint column).
    db.execute("ALTER TABLE requests ADD COLUMN upstream TEXT")
    db.execute("ALTER TABLE requests ADD COLUMN attempts INTEGER")
    db.execute("ALTER TABLE usage_daily RENAME TO usage_daily_m004")
    db.execute("DROP INDEX IF EXISTS idx_usage_daily_day")
    db["usage_daily"].create(
        {
            "user_id": str,
            "model": str,
            "day": str,
            "endpoint": str,
            "upstream": str,
            "input_price_nusd_per_mtok": int,
            "output_price_nusd_per_mtok": int,
            "requests": int,
            "prompt_tokens": int,
            "completion_tokens": int,
            "cost_nusd": int,
        },
        pk=("user_id", "model", "day", "endpoint", "upstream", "input_price_nusd_per_mtok", "output_price_nusd_per_mtok"),
        not_null={"user_id", "model", "day", "endpoint", "upstream", "input_price_nusd_per_mtok",
                  "output_price_nusd_per_mtok"},
    )
    db["usage_daily"].create_index(["day"])
    db.execute(
        "INSERT INTO usage_daily SELECT user_id, model, day, endpoint, COALESCE(upstream, 'default'),"
        " COALESCE(input_price_nusd_per_mtok, 0), COALESCE(output_price_nusd_per_mtok, 0), COUNT(*),"
        " SUM(COALESCE(prompt_tokens, 0)), SUM(COALESCE(completion_tokens, 0)), SUM(COALESCE(cost_nusd, 0))"
        " FROM requests WHERE status = 'settled' GROUP BY 1, 2, 3, 4, 5, 6, 7"
    )
    # As m004: an old aggregate that disagreed with the rows changes here; say so, with the figures.
    changed = db.execute(
        "WITH n AS (SELECT user_id, model, day, input_price_nusd_per_mtok AS i, output_price_nusd_per_mtok AS o,"
        " SUM(requests) AS r, SUM(prompt_tokens) AS p, SUM(completion_tokens) AS c, SUM(cost_nusd) AS cost"
        " FROM usage_daily GROUP BY 1, 2, 3, 4, 5),"
        " k AS (SELECT user_id, model, day, i, o FROM n UNION SELECT user_id, model, day, input_price_nusd_per_mtok,"
        " output_price_nusd_per_mtok FROM usage_daily_m004)"
        " SELECT k.user_id, k.model, k.day, COALESCE(old.requests, 0), COALESCE(n.r, 0), COALESCE(old.cost_nusd, 0),"
        " COALESCE(n.cost, 0) FROM k LEFT JOIN n USING (user_id, model, day, i, o)"
        " LEFT JOIN usage_daily_m004 old ON old.user_id = k.user_id AND old.model = k.model AND old.day = k.day"
        " AND old.input_price_nusd_per_mtok = k.i AND old.output_price_nusd_per_mtok = k.o"
        " WHERE COALESCE(old.requests, 0) != COALESCE(n.r, 0) OR COALESCE(old.prompt_tokens, 0) != COALESCE(n.p, 0)"
        " OR COALESCE(old.completion_tokens, 0) != COALESCE(n.c, 0) OR COALESCE(old.cost_nusd, 0) != COALESCE(n.cost, 0)"
    ).fetchall()
    for row in changed:
        log.warning("m006: daily aggregate of user %s, model %s, day %s rebuilt from the request rows: requests %s -> %s,"
                    " cost (nano-USD) %s -> %s", *row)
    db.execute("DROP TABLE usage_daily_m004")
