"""The PostgreSQL ledger writer alone: settled rows per second into a database (no proxy, no HTTP).

    python -m load.pg_writer_bench --dsn postgresql://postgres@127.0.0.1:5432/test
    python -m load.pg_writer_bench --dsn ... --concurrency 16,64,256 --seconds 5

A database of its own is created on the DSN's server and dropped after. ``concurrency`` coroutines each
record a settled row (``PostgresStorage.record_settled``, the request path's call) and await its commit,
then the next: as many requests waiting for their row as the proxy would have in flight. Reports rows/s,
commits/s, rows per commit and the mean wait for durability, and the process's CPU per row (the event
loop's share: encoding the batch, asyncpg's protocol). PostgreSQL's own CPU is not in that figure.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from urllib.parse import urlsplit

import asyncpg

from proxyd.handlers.base import new_request_id
from proxyd.storage.postgres import PostgresStorage


def row(request_id: str, n: int) -> tuple:
    # A settled chat request as Meter writes it; a few users and models, so aggregates see several keys.
    return (request_id, f"user{n % 8}", "key_0123456789ab", "llama3.2:1b" if n % 3 else "moondream:latest",
            "chat.completions", 0, "settled", "2026-11-30", "2026-11-30T01:00:00.000Z", 26, 32, 200,
            "2026-11-30T01:00:00.010Z", 10, 26, 13, "reported", 20000, 50000, 1170, None, "default", 1)


async def admin(dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def measure(dsn: str, concurrency: int, seconds: float) -> dict:
    store = PostgresStorage(dsn)
    await asyncio.get_running_loop().run_in_executor(None, store.open)
    store.bind_loop(asyncio.get_running_loop())
    done = 0
    waited = 0.0
    stop = time.monotonic() + seconds

    async def client(k: int) -> None:
        nonlocal done, waited
        n = k
        while time.monotonic() < stop:
            t = time.perf_counter()
            await store.record_settled(row(new_request_id(), n))
            waited += time.perf_counter() - t
            done += 1
            n += concurrency

    c0, c1, w0 = time.process_time(), 0.0, time.monotonic()
    commits0 = store.commits
    await asyncio.gather(*(client(k) for k in range(concurrency)))
    wall = time.monotonic() - w0
    c1 = time.process_time()
    commits = store.commits - commits0
    check = await store.check()
    await store.close()
    assert check["ok"], check
    return {"concurrency": concurrency, "rows_per_s": round(done / wall), "commits_per_s": round(commits / wall),
            "rows_per_commit": round(done / max(commits, 1), 1), "mean_wait_ms": round(waited * 1000 / max(done, 1), 2),
            "cpu_us_per_row": round((c1 - c0) * 1e6 / max(done, 1), 1)}


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dsn", default=os.environ.get("PROXYD_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test"))
    p.add_argument("--concurrency", default="64", help="comma list (default 64)")
    p.add_argument("--seconds", type=float, default=5.0)
    a = p.parse_args()
    for conc in [int(x) for x in a.concurrency.split(",")]:
        name = f"proxyd_writer_bench_{os.getpid()}"
        await admin(a.dsn, f"CREATE DATABASE {name}")
        try:
            print(await measure(urlsplit(a.dsn)._replace(path="/" + name).geturl(), conc, a.seconds), flush=True)
        finally:
            await admin(a.dsn, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


if __name__ == "__main__":
    asyncio.run(main())
