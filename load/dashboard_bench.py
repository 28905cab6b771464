"""How long each dashboard API answer takes on a large ledger (issue #17: < 300 ms at 3M request rows).

    python -m load.dashboard_bench [--db /tmp/proxyd-dashboard-3m.db] [--rows 3000000] [--users 50] [--days 90]

Fills (once; reused while the file exists) a ledger of ``--rows`` settled request rows spread over
``--users`` users and the ``--days`` UTC days up to today, with their daily aggregates as the writer keeps
them, starts ``app.py`` on it (no upstream needed: nothing is proxied), creates the users' keys through the
admin API and times every API call the two dashboard views make, over HTTP, as the page makes them. Prints
the median and the slowest of ``--repeat`` calls per route.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from sqlite_utils import Database

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxyd.storage.sqlite_migrations import migrations  # noqa: E402

TOKEN = "bench-admin-token"
MODELS = ("llama3.2:1b", "moondream:latest", "nomic-embed-text:latest")
ENDPOINTS = ("chat.completions", "completions", "embeddings")


def fill(path: str, rows: int, users: int, days: int) -> None:
    """Rows generated inside SQLite (a recursive CTE: no Python per row), oldest first as a proxy appends
    them, one in 100 voided; then the daily aggregates from the settled rows (the writer's sums)."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    migrations.apply(Database(conn))
    today = time.strftime("%Y-%m-%d", time.gmtime())
    conn.execute("BEGIN")
    conn.execute(
        """
        WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i + 1 < :rows),
        r AS (SELECT i, 'u' || printf('%02d', i % :users) AS user_id,
                     date(:today, '-' || (:days - 1 - (i * :days) / :rows) || ' days') AS day,
                     (i / 7) % 3 AS m, i % 100 = 99 AS voided,
                     printf('%02d:%02d:%02d.%03d', (i * 86400 * :days / :rows) % 86400 / 3600,
                            (i * 86400 * :days / :rows) % 3600 / 60, (i * 86400 * :days / :rows) % 60, i % 1000) AS t
              FROM n)
        INSERT INTO requests (id, user_id, key_id, model, endpoint, stream, status, http_status, day, created_at,
            finished_at, latency_ms, reserved_prompt, reserved_completion, prompt_tokens, completion_tokens,
            usage_source, input_price_nusd_per_mtok, output_price_nusd_per_mtok, cost_nusd, upstream, attempts)
        SELECT printf('req_%012x%016x', 1700000000000 + i, i), user_id, 'key_bench',
               CASE m WHEN 0 THEN 'llama3.2:1b' WHEN 1 THEN 'moondream:latest' ELSE 'nomic-embed-text:latest' END,
               CASE m WHEN 0 THEN 'chat.completions' WHEN 1 THEN 'completions' ELSE 'embeddings' END,
               0, CASE WHEN voided THEN 'voided' ELSE 'settled' END, CASE WHEN voided THEN 502 ELSE 200 END,
               day, day || 'T' || t || 'Z', day || 'T' || t || 'Z', 40 + i % 900, 26, 64,
               CASE WHEN voided THEN NULL ELSE 20 + i % 40 END, CASE WHEN voided THEN NULL ELSE i % 64 END,
               'reported', 20000, 50000,
               CASE WHEN voided THEN NULL ELSE (20 + i % 40) * 20 + (i % 64) * 50 END, 'default', 1
        FROM r
        """, {"rows": rows, "users": users, "today": today, "days": days})
    conn.execute(
        "INSERT INTO usage_daily SELECT user_id, model, day, endpoint, upstream, input_price_nusd_per_mtok,"
        " output_price_nusd_per_mtok, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), SUM(cost_nusd)"
        " FROM requests WHERE status = 'settled' GROUP BY 1, 2, 3, 4, 5, 6, 7")
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def call(url: str, token: str, method: str = "GET", body=None) -> tuple[int, object, float]:
    req = urllib.request.Request(url, method=method, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Authorization": "Bearer " + token, "Content-Type": "application/json"})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            raw, status = r.read(), r.status
    except urllib.error.HTTPError as e:
        raw, status = e.read(), e.code
    return status, json.loads(raw) if raw else None, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--db", default="/tmp/proxyd-dashboard-3m.db")
    p.add_argument("--rows", type=int, default=3_000_000)
    p.add_argument("--users", type=int, default=50)
    p.add_argument("--days", type=int, default=90)
    p.add_argument("--repeat", type=int, default=7)
    a = p.parse_args(argv)
    if not os.path.exists(a.db):
        t0 = time.time()
        fill(a.db, a.rows, a.users, a.days)
        print(f"filled {a.db}: {a.rows:,} rows, {a.users} users, {a.days} days in {time.time() - t0:.0f} s")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config.yaml"
        config.write_text(json.dumps({"database": {"path": a.db}, "server": {"port": port},
                                      "admin": {"token": TOKEN}, "logging": {"access_log": False},
                                      "upstream": {"url": "http://127.0.0.1:9"}}))
        proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--config", str(config)], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=open(Path(tmp) / "proxyd.log", "wb"))  # noqa: SIM115
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + 120
            while True:
                try:
                    urllib.request.urlopen(base + "/openapi.yaml", timeout=5).close()
                    break
                except OSError:
                    pass
                if proc.poll() is not None or time.time() > deadline:
                    raise SystemExit("proxyd did not start: " + (Path(tmp) / "proxyd.log").read_text()[-2000:])
                time.sleep(0.2)
            keys = {}
            for u in ("u00", "u01"):
                status, body, _ = call(base + "/admin/users", TOKEN, "POST", {"user_id": u})
                if status == 409:
                    status, body, _ = call(base + f"/admin/users/{u}/keys", TOKEN, "POST")
                keys[u] = body["api_key"]
            for n in range(2, a.users):
                call(base + "/admin/users", TOKEN, "POST", {"user_id": f"u{n:02d}"})
            run(base, keys["u00"], a.repeat)
        finally:
            proc.terminate()
            proc.wait(30)


def run(base: str, key: str, repeat: int) -> None:
    g = time.gmtime()
    period = f"{g.tm_year}-{g.tm_mon:02d}"
    start, end = period + "-01", time.strftime("%Y-%m-%d", g)
    # A cursor deep in the user's rows: 50 pages of 100 in.
    cursor = None
    for _ in range(50):
        cursor = call(base + "/v1/requests?limit=100" + (f"&cursor={cursor}" if cursor else ""), key)[1]["next_cursor"]
    routes = [
        ("user", f"/v1/usage/daily?start={start}&end={end}", key),
        ("user", "/v1/limits", key),
        ("user", f"/v1/billing/invoices?period={period}", key),
        ("user", "/v1/requests?limit=20", key),
        ("user", f"/v1/requests?limit=20&cursor={cursor}", key),
        ("admin", "/admin/overview", TOKEN),
        ("admin", f"/admin/usage/daily?start={start}&end={end}", TOKEN),
        ("admin", f"/admin/usage?group_by=model&start={start}&end={end}", TOKEN),
        ("admin", "/admin/live", TOKEN),
        ("admin", "/admin/users/u01/limits", TOKEN),
    ]
    print(f"{'view':6} {'route':58} {'median ms':>9} {'max ms':>7}")
    worst = 0.0
    for view, path, token in routes:
        times = []
        for _ in range(repeat):
            status, _, dt = call(base + path, token)
            assert status == 200, (path, status)
            times.append(dt * 1000)
        worst = max(worst, max(times))
        shown = path if len(path) <= 58 else path[:40] + "..." + path[-15:]
        print(f"{view:6} {shown:58} {statistics.median(times):9.1f} {max(times):7.1f}")
    print(f"slowest answer: {worst:.1f} ms ({'under' if worst < 300 else 'OVER'} 300 ms)")


if __name__ == "__main__":
    main()
