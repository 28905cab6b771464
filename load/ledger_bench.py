"""The ledger's write cost per request row: random vs time-ordered request ids, by ledger size and batch.

    python -m load.ledger_bench                                # 100k rows already in the ledger, batches of 8
    python -m load.ledger_bench --prefill 0,300000,2000000 --batch 2,8,32

Why it exists: a request's id is the primary key of ``requests``. With random ids every insert lands on
a random leaf page of the key's B-tree, so each row of a group commit dirties a page of its own, which
SQLite writes to the WAL at COMMIT and again at checkpoint; once the index outgrows the page cache it
must also be read back first. Ids that begin with the time (``proxyd.handlers.base.new_request_id``)
append at the right edge instead. This measures both on the real schema (proxyd's migrations), with the
writer's own statements and chunking (``proxyd.storage.sqlite_writer.Upsert.statements``, one daily aggregate per
commit), in a temp directory, single-threaded: CPU (process time) and wall time per row. No proxy, no
HTTP: the writer thread's work alone.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import tempfile
import time
from pathlib import Path

from sqlite_utils import Database

from proxyd.handlers.base import new_request_id
from proxyd.storage.sqlite import _DAILY, _UPSERT
from proxyd.storage.sqlite_migrations import migrations
from proxyd.storage.sqlite_writer import _summed

ID_KINDS = {
    "random": lambda: "req_" + os.urandom(12).hex(),  # proxyd's ids before time-ordered ones
    "ordered": new_request_id,
}


def row(request_id: str) -> tuple:
    # A settled chat request, as Meter writes it (the values only set the row's size).
    return (request_id, "bench", "key_0123456789ab", "llama3.2:1b", "chat.completions", 0, "settled", "2026-11-26",
            "2026-11-26T11:00:00.000Z", 26, 32, 200, "2026-11-26T11:00:00.010Z", 10, 26, 13, "reported", 20000,
            50000, 1170, None, "default", 1)


def ledger(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")  # proxyd's default (database.synchronous)
    migrations.apply(Database(conn))
    return conn


def measure(directory: Path, kind: str, prefill: int, rows: int, batch: int) -> dict:
    path = directory / f"{kind}-{prefill}-{batch}.db"
    conn = ledger(path)
    make_id = ID_KINDS[kind]
    conn.execute("BEGIN")
    for i in range(0, prefill, 1000):
        conn.executemany(str(_UPSERT), [row(make_id()) for _ in range(min(1000, prefill - i))])
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    max_params = conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
    todo = [row(make_id()) for _ in range(rows)]
    daily = ("bench", "llama3.2:1b", "2026-11-26", "chat.completions", "default", 20000, 50000, 1, 26, 13, 1170)  # as settle
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for i in range(0, rows, batch):
        chunk = todo[i:i + batch]
        conn.execute("BEGIN IMMEDIATE")
        for sql, params in _UPSERT.statements(chunk, max_params):
            conn.execute(sql, params)
        for sql, params in _DAILY.statements(_summed([daily] * len(chunk), _DAILY.key_len), max_params):
            conn.execute(sql, params)
        conn.execute("COMMIT")
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    conn.close()
    for suffix in ("", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    return {"ids": kind, "prefill": prefill, "batch": batch, "rows": rows,
            "cpu_us_per_row": round(cpu / rows * 1e6, 1), "wall_us_per_row": round(wall / rows * 1e6, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m load.ledger_bench", description=__doc__.split("\n")[0])
    p.add_argument("--prefill", default="100000", help="rows already in the ledger, comma list (default 100000)")
    p.add_argument("--batch", default="8", help="rows per group commit, comma list (default 8; the throughput "
                   "bench's proxy reports writes/commit, ~6 at 50 connections)")
    p.add_argument("--rows", type=int, default=20000, help="rows measured per case (default 20000)")
    a = p.parse_args(argv)
    prefills = [int(x) for x in a.prefill.split(",")]
    batches = [int(x) for x in a.batch.split(",")]
    print(f"{'ids':8s} {'prefill':>9s} {'batch':>5s} {'cpu us/row':>10s} {'wall us/row':>11s}", flush=True)
    with tempfile.TemporaryDirectory(prefix="proxyd-ledger-bench-") as d:
        for prefill in prefills:
            for batch in batches:
                for kind in ID_KINDS:
                    r = measure(Path(d), kind, prefill, a.rows, batch)
                    print(f"{kind:8s} {prefill:9d} {batch:5d} {r['cpu_us_per_row']:10.1f} {r['wall_us_per_row']:11.1f}",
                          flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
