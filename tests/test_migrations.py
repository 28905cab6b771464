"""Schema migrations: a blank database gets the current schema, and a ledger written by an older proxyd
is carried forward without losing or changing a billed amount."""

from __future__ import annotations

import sqlite3
import time

import pytest
from sqlite_utils import Database

from proxyd import reports
from proxyd.storage.sqlite import consistency, invoice_lines, usage_rows
from proxyd.storage.sqlite_migrations import migrations


def columns(conn: sqlite3.Connection, table: str) -> list[str]:
    return [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]


def primary_key(conn: sqlite3.Connection, table: str) -> list[str]:
    return [r[1] for r in sorted((r for r in conn.execute(f"PRAGMA table_info({table})") if r[5]), key=lambda r: r[5])]


def test_blank_database_gets_the_current_schema():
    conn = sqlite3.connect(":memory:")
    migrations.apply(Database(conn))
    assert [m.name for m in migrations.applied(Database(conn))] == [
        "m001_users_and_keys", "m002_ledger", "m003_pending_index_only", "m004_daily_aggregates_by_price",
        "m005_model_names_as_ollama_matches_them", "m006_endpoint_and_upstream"]
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"users", "api_keys", "requests", "usage_daily"} <= tables
    assert not {t for t in tables if t.startswith("usage_daily_")}
    assert primary_key(conn, "requests") == ["id"]
    assert primary_key(conn, "usage_daily") == [
        "user_id", "model", "day", "endpoint", "upstream", "input_price_nusd_per_mtok", "output_price_nusd_per_mtok"]
    assert columns(conn, "requests")[-2:] == ["upstream", "attempts"]
    indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL")}
    assert {"idx_requests_user_id_day", "idx_requests_pending", "idx_usage_daily_day"} <= indexes
    assert "idx_requests_status" not in indexes  # m003
    with pytest.raises(sqlite3.IntegrityError):  # a NULL price would never meet ON CONFLICT: one row per settle
        conn.execute("INSERT INTO usage_daily VALUES ('a', 'm', '2026-03-01', 'chat.completions', 'default', NULL, 0,"
                     " 1, 1, 1, 1)")
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute("INSERT INTO usage_daily VALUES ('a', 'm', '2026-03-01', 'chat.completions', NULL, 0, 0, 1, 1, 1, 1)")


ROW = ("INSERT INTO requests (id, user_id, key_id, model, endpoint, stream, status, day, created_at, prompt_tokens,"
       " completion_tokens, input_price_nusd_per_mtok, output_price_nusd_per_mtok, cost_nusd)"
       " VALUES (?, ?, 'k', ?, 'chat.completions', 0, ?, ?, '2026-03-01T00:00:00.000Z', ?, ?, ?, ?, ?)")


def test_m004_rebuilds_daily_aggregates_by_price_from_the_request_rows():
    conn = sqlite3.connect(":memory:", isolation_level=None)
    db = Database(conn)
    migrations.apply(db, stop_before="m004_daily_aggregates_by_price")
    assert "input_price_nusd_per_mtok" not in columns(conn, "usage_daily")
    # A day with a price change for alice (two prices), bob on another day, and rows that bill nothing.
    rows = [
        ("r1", "alice", "m", "settled", "2026-03-01", 10, 5, 1_000_000, 2_000_000, 20_000),
        ("r2", "alice", "m", "settled", "2026-03-01", 20, 5, 1_000_000, 2_000_000, 30_000),
        ("r3", "alice", "m", "settled", "2026-03-01", 10, 10, 3_000_000, 6_000_000, 90_000),
        ("r4", "bob", "m", "settled", "2026-03-02", 7, 0, 1_000_000, 2_000_000, 7_000),
        ("r5", "bob", "m", "voided", "2026-03-02", None, None, None, None, None),
        ("r6", "bob", "m", "expired", "2026-03-02", None, None, None, None, None),
    ]
    conn.executemany(ROW, rows)
    # The aggregates an older proxyd kept: one row per user, model and day.
    conn.executemany("INSERT INTO usage_daily VALUES (?, ?, ?, ?, ?, ?, ?)",
                     [("alice", "m", "2026-03-01", 3, 40, 20, 140_000), ("bob", "m", "2026-03-02", 1, 7, 0, 7_000)])

    migrations.apply(db)

    got = conn.execute("SELECT user_id, day, input_price_nusd_per_mtok, output_price_nusd_per_mtok, requests,"
                       " prompt_tokens, completion_tokens, cost_nusd FROM usage_daily ORDER BY 1, 2, 3").fetchall()
    assert got == [
        ("alice", "2026-03-01", 1_000_000, 2_000_000, 2, 30, 10, 50_000),
        ("alice", "2026-03-01", 3_000_000, 6_000_000, 1, 10, 10, 90_000),
        ("bob", "2026-03-02", 1_000_000, 2_000_000, 1, 7, 0, 7_000),
    ]
    assert consistency(conn)["ok"] is True
    # Totals per user and day did not move; the invoice now has a line per price from the aggregates.
    assert conn.execute("SELECT SUM(requests), SUM(cost_nusd) FROM usage_daily WHERE user_id = 'alice'").fetchone() \
        == (3, 140_000)
    lines = invoice_lines(conn, period="2026-03", user_id="alice")
    (invoice,) = reports.invoices(lines, period="2026-03", user_id="alice", now=time.time())
    assert [(line["requests"], line["cost_usd"]) for line in invoice["lines"]] == [(2, "0.000050000"), (1, "0.000090000")]
    assert invoice["total_usd"] == "0.000140000"


def test_consistency_check_sees_an_aggregate_that_disagrees_on_price():
    conn = sqlite3.connect(":memory:", isolation_level=None)
    migrations.apply(Database(conn))
    conn.execute(ROW, ("r1", "alice", "m", "settled", "2026-03-01", 10, 5, 1_000_000, 2_000_000, 20_000))
    conn.execute("INSERT INTO usage_daily VALUES ('alice', 'm', '2026-03-01', 'chat.completions', 'default', 1000000,"
                 " 2000000, 1, 10, 5, 20000)")
    assert consistency(conn)["ok"] is True
    # Same totals, booked under another price: the invoice line would be wrong, so the check must say so.
    conn.execute("UPDATE usage_daily SET input_price_nusd_per_mtok = 9")
    check = consistency(conn)
    assert check["ok"] is False and len(check["mismatches"]) == 2


def test_m004_reports_old_aggregates_that_disagreed_with_the_rows(caplog):
    conn = sqlite3.connect(":memory:", isolation_level=None)
    db = Database(conn)
    migrations.apply(db, stop_before="m004_daily_aggregates_by_price")
    conn.execute(ROW, ("r1", "alice", "m", "settled", "2026-03-01", 10, 5, 1_000_000, 2_000_000, 20_000))
    conn.executemany("INSERT INTO usage_daily VALUES (?, ?, ?, ?, ?, ?, ?)",
                     [("alice", "m", "2026-03-01", 2, 10, 5, 20_000),  # one request too many
                      ("carol", "m", "2026-03-01", 1, 3, 3, 900)])  # no rows behind it at all
    with caplog.at_level("WARNING", logger="proxyd.migrations"):
        migrations.apply(db)
    warnings = sorted(r.getMessage() for r in caplog.records if r.name == "proxyd.migrations")
    assert len(warnings) == 2, warnings
    assert "user alice" in warnings[0] and "requests 2 -> 1" in warnings[0]
    assert "user carol" in warnings[1] and "cost (nano-USD) 900 -> 0" in warnings[1]
    assert conn.execute("SELECT user_id, requests FROM usage_daily").fetchall() == [("alice", 1)]


def test_consistency_check_over_a_day_range_reads_only_those_days():
    conn = sqlite3.connect(":memory:", isolation_level=None)
    migrations.apply(Database(conn))
    conn.executemany("INSERT INTO users (user_id, created_at, disabled) VALUES (?, '2026-03-01T00:00:00Z', 0)",
                     [("alice",), ("bob",)])
    rows = [("r1", "alice", "m", "settled", "2026-03-01", 10, 5, 1_000_000, 2_000_000, 20_000),
            ("r2", "bob", "m", "settled", "2026-03-02", 7, 1, 1_000_000, 2_000_000, 9_000),
            ("r3", "bob", "m", "voided", "2026-03-02", None, None, None, None, None),
            ("r4", "alice", "m", "settled", "2026-03-03", 4, 4, 1_000_000, 2_000_000, 12_000)]
    conn.executemany(ROW, rows)
    conn.executemany("INSERT INTO usage_daily VALUES (?, 'm', ?, 'chat.completions', 'default', 1000000, 2000000, 1, ?, ?, ?)",
                     [("alice", "2026-03-01", 10, 5, 20_000), ("bob", "2026-03-02", 7, 1, 9_000),
                      ("alice", "2026-03-03", 4, 4, 12_000)])
    whole = consistency(conn)
    assert whole["ok"] is True and (whole["start"], whole["end"]) == (None, None)
    assert whole["requests_by_status"] == {"settled": 3, "voided": 1}
    day2 = consistency(conn, start="2026-03-02", end="2026-03-02")
    assert day2["ok"] is True and day2["requests_by_status"] == {"settled": 1, "voided": 1}

    # A billed row changed on the 2nd: the 2nd's check sees it, a check of the other days does not.
    conn.execute("UPDATE requests SET cost_nusd = 9001 WHERE id = 'r2'")
    assert consistency(conn, start="2026-03-02", end="2026-03-03")["mismatches"] == [
        ["bob", "m", "2026-03-02", "chat.completions", "default", 1_000_000, 2_000_000, 1, 1, 7, 7, 1, 1, 9_001, 9_000]]
    assert consistency(conn, start="2026-03-03", end="2026-03-31")["ok"] is True
    assert consistency(conn)["ok"] is False
    # An aggregate with no rows behind it, of a user the users table does not know, is still seen.
    conn.execute("INSERT INTO usage_daily VALUES ('ghost', 'm', '2026-03-03', 'chat.completions', 'default', 1000000,"
                 " 2000000, 1, 1, 1, 3000)")
    check = consistency(conn, start="2026-03-03", end="2026-03-03")
    assert check["mismatches"] == [["ghost", "m", "2026-03-03", "chat.completions", "default", 1_000_000, 2_000_000,
                                    None, 1, None, 1, None, 1, None, 3_000]]
    # ...and so is a row of such a user once its day has an aggregate.
    conn.execute(ROW, ("r5", "ghost", "m", "settled", "2026-03-03", 1, 1, 1_000_000, 2_000_000, 3_000))
    assert consistency(conn, start="2026-03-03", end="2026-03-03")["ok"] is True


def test_m005_records_earlier_rows_under_the_model_name_ollama_resolves(caplog):
    """Rows written before model names were folded keep the client's spelling; m005 rewrites them and
    merges their aggregates, so a model's usage (limits, invoices) is not split over two names."""
    conn = sqlite3.connect(":memory:", isolation_level=None)
    db = Database(conn)
    migrations.apply(db, stop_before="m005_model_names_as_ollama_matches_them")
    rows = [("r1", "alice", "moondream", "settled", "2026-03-01", 10, 5, 1_000_000, 2_000_000, 20_000),
            ("r2", "alice", "MoonDream:latest", "settled", "2026-03-01", 20, 5, 1_000_000, 2_000_000, 30_000),
            ("r3", "alice", "llama3.2:1b", "settled", "2026-03-01", 7, 1, 1_000_000, 2_000_000, 9_000),
            ("r4", "bob", "library/moondream", "voided", "2026-03-01", None, None, None, None, None)]
    conn.executemany(ROW, rows)
    conn.executemany("INSERT INTO usage_daily VALUES (?, ?, '2026-03-01', 1000000, 2000000, 1, ?, ?, ?)",
                     [("alice", "moondream", 10, 5, 20_000), ("alice", "MoonDream:latest", 20, 5, 30_000),
                      ("alice", "llama3.2:1b", 7, 1, 9_000)])
    with caplog.at_level("INFO", logger="proxyd.migrations"):
        migrations.apply(db)
    assert conn.execute("SELECT id, model FROM requests ORDER BY id").fetchall() == [
        ("r1", "moondream:latest"), ("r2", "moondream:latest"), ("r3", "llama3.2:1b"), ("r4", "moondream:latest")]
    assert conn.execute("SELECT model, requests, prompt_tokens, cost_nusd FROM usage_daily ORDER BY model").fetchall() == [
        ("llama3.2:1b", 1, 7, 9_000), ("moondream:latest", 2, 30, 50_000)]
    assert consistency(conn)["ok"] is True
    assert sum("recorded as 'moondream:latest'" in r.getMessage() for r in caplog.records) == 3


def test_m006_keys_the_daily_aggregate_by_endpoint_and_upstream():
    """Rows written before m006 name no upstream (there was one, now called "default"); the aggregate is
    rebuilt from the rows with an endpoint and an upstream, and usage can be read by either."""
    conn = sqlite3.connect(":memory:", isolation_level=None)
    db = Database(conn)
    migrations.apply(db, stop_before="m006_endpoint_and_upstream")
    rows = [("r1", "alice", "m", "settled", "2026-03-01", 10, 5, 1_000_000, 2_000_000, 20_000),
            ("r2", "alice", "m", "settled", "2026-03-01", 20, 5, 1_000_000, 2_000_000, 30_000),
            ("r3", "alice", "m", "voided", "2026-03-01", None, None, None, None, None)]
    conn.executemany(ROW, rows)
    conn.execute("UPDATE requests SET endpoint = 'embeddings' WHERE id = 'r2'")
    conn.execute("INSERT INTO usage_daily VALUES ('alice', 'm', '2026-03-01', 1000000, 2000000, 2, 30, 10, 50000)")
    migrations.apply(db)
    assert conn.execute("SELECT endpoint, upstream, requests, prompt_tokens, cost_nusd FROM usage_daily"
                        " ORDER BY endpoint").fetchall() == [
        ("chat.completions", "default", 1, 10, 20_000), ("embeddings", "default", 1, 20, 30_000)]
    assert consistency(conn)["ok"] is True
    by_endpoint = usage_rows(conn, user_id="alice", start="2026-03-01", end="2026-03-31", group_by="endpoint", model=None)
    assert [(r.key, r.requests, r.cost_nusd) for r in by_endpoint] == [("chat.completions", 1, 20_000),
                                                                       ("embeddings", 1, 30_000)]
    by_upstream = usage_rows(conn, user_id=None, start="2026-03-01", end="2026-03-31", group_by="upstream", model=None)
    assert [(r.key, r.requests) for r in by_upstream] == [("default", 2)]
    # A row of another upstream that the aggregate does not have is a mismatch.
    conn.execute("UPDATE requests SET upstream = 'gpu2', attempts = 2 WHERE id = 'r1'")
    assert [m[4] for m in consistency(conn)["mismatches"]] == ["default", "gpu2"]
