"""The ledger writer's batching: multi-row upserts and summed counters give what one statement per row gives."""

from __future__ import annotations

import sqlite3

import pytest

from proxyd.storage.sqlite_writer import Additive, Upsert, run_groups


def _db() -> sqlite3.Connection:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.execute("CREATE TABLE t (id TEXT PRIMARY KEY, status TEXT, n INTEGER)")
    conn.execute("CREATE TABLE c (k1 TEXT, k2 TEXT, hits INTEGER, total INTEGER, PRIMARY KEY (k1, k2))")
    return conn


T = Upsert("INSERT INTO t (id, status, n)", "(?, ?, ?)",
           " ON CONFLICT (id) DO UPDATE SET status = excluded.status, n = excluded.n")
C = Additive("INSERT INTO c (k1, k2, hits, total)", "(?, ?, ?, ?)",
             " ON CONFLICT (k1, k2) DO UPDATE SET hits = hits + excluded.hits, total = total + excluded.total", key_len=2)


def test_a_later_row_of_the_same_key_wins_within_one_statement():
    conn = _db()
    # a request's pending row and its final row can land in the same commit: the final one must stand
    run_groups(conn, {T: [("a", "pending", 0), ("b", "pending", 0), ("a", "settled", 7)]})
    assert conn.execute("SELECT id, status, n FROM t ORDER BY id").fetchall() == [("a", "settled", 7), ("b", "pending", 0)]


def test_batches_are_split_by_the_parameter_limit_into_few_statement_shapes():
    conn = _db()
    conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 21)  # as if SQLite took only 7 rows of 3 per statement
    for size in range(1, 60):
        run_groups(conn, {T: [(f"r{size}-{i}", "settled", i) for i in range(size)]})
    assert conn.execute("SELECT COUNT(*), SUM(n) FROM t").fetchone() == (
        sum(range(1, 60)), sum(sum(range(size)) for size in range(1, 60)))
    # chunks of 4, 2 and 1 rows only: a bounded number of prepared statements whatever the batch sizes
    assert set(T.multi_sql) <= {1, 2, 4}
    conn2 = _db()
    for size in range(1, 300, 7):
        run_groups(conn2, {T: [(f"s{size}-{i}", "settled", 1) for i in range(size)]})
    assert set(T.multi_sql) <= {1, 2, 4, 8, 16, 32, 64}
    assert conn2.execute("SELECT COUNT(*) FROM t").fetchone() == (sum(range(1, 300, 7)),)


def test_summed_counters_equal_one_statement_per_row():
    rows = [("u1", "m", 1, 10), ("u2", "m", 1, 5), ("u1", "m", 1, 3), ("u1", "x", 1, 1), ("u1", "m", 1, 2)]
    batched, one_by_one = _db(), _db()
    run_groups(batched, {C: rows})
    for row in rows:
        one_by_one.execute(C, row)  # the plain single-row form of the same statement
    query = "SELECT k1, k2, hits, total FROM c ORDER BY 1, 2"
    assert batched.execute(query).fetchall() == one_by_one.execute(query).fetchall() == [
        ("u1", "m", 3, 15), ("u1", "x", 1, 1), ("u2", "m", 1, 5)]


def test_a_ledger_scan_does_not_hold_up_reads(tmp_path):
    # The consistency check scans every request row (seconds on a large ledger); a user's usage read
    # issued meanwhile must not wait for it.
    import asyncio
    import threading

    from proxyd.storage.sqlite import SQLiteStorage

    async def go() -> None:
        store = SQLiteStorage(str(tmp_path / "ledger.db"))
        store.open()
        store.bind_loop(asyncio.get_running_loop())
        release = threading.Event()

        def slow_scan(conn):
            release.wait(10)
            return conn.execute("SELECT COUNT(*) FROM requests").fetchone()[0]

        scan = asyncio.ensure_future(store.scan(slow_scan))
        try:
            got = await asyncio.wait_for(store.read(lambda c: c.execute("SELECT 42").fetchone()[0]), 5)
            assert got == 42 and not scan.done()
        finally:
            release.set()
        assert await scan == 0
        await store.close()

    asyncio.run(go())


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_each_storage_has_every_member_of_both_ports_with_their_parameters(backend):
    # Protocols are not checked at run time: this keeps the implementations and the ports from drifting.
    import inspect

    from proxyd.storage import AccountStore, Ledger, SharedAccountStore
    from proxyd.storage.postgres import PostgresStorage
    from proxyd.storage.sqlite import SQLiteStorage

    cls = SQLiteStorage if backend == "sqlite" else PostgresStorage
    store = cls(":memory:" if backend == "sqlite" else "postgresql://unused/db")  # built, never opened
    ports = (Ledger, AccountStore) if backend == "sqlite" else (Ledger, AccountStore, SharedAccountStore)
    for port in ports:
        for name in port.__annotations__:
            assert hasattr(store, name), f"{port.__name__}.{name}"
        for name, member in vars(port).items():
            if inspect.isfunction(member) and not name.startswith("_"):
                impl = getattr(cls, name, None)
                assert impl is not None, f"{port.__name__}.{name}"
                assert inspect.iscoroutinefunction(impl) == inspect.iscoroutinefunction(member), name
                assert list(inspect.signature(impl).parameters) == list(inspect.signature(member).parameters), name
