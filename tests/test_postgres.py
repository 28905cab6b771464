"""The PostgreSQL ledger (database.backend: postgres, issue #16): schema by migrations under an advisory lock,
one batching writer, the SQLite ledger's reads, several instances on one database (their pending rows, their
users and keys), and PostgreSQL's connections killed mid-run. Each test has a database of its own
(tests/services.py: skipped without a server locally, a failure under CI)."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import asyncpg
import httpx
import pytest

from proxyd.storage import REQUEST_COLUMNS, iso_ms
from proxyd.storage.postgres import PostgresStorage
from proxyd.storage.postgres_migrations import MIGRATIONS
from tests.harness import Harness

MSG = [{"role": "user", "content": "Hi"}]


def fetch(dsn: str, sql: str, *params) -> list[tuple]:
    """A query on a connection of its own, in a thread of its own (callable from a running loop too)."""
    async def run():
        conn = await asyncpg.connect(dsn)
        try:
            return [tuple(r) for r in await conn.fetch(sql, *params)]
        finally:
            await conn.close()

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, run()).result()


def row(request_id: str, status: str, *, user: str = "alice", prompt: int = 10, completion: int = 5,
        cost: int = 100, day: str = "2031-02-15") -> tuple:
    settled = status == "settled"
    values = dict(id=request_id, user_id=user, key_id="key_1", model="llama3.2:1b", endpoint="chat.completions",
                  stream=0, status=status, day=day, created_at=f"{day}T12:00:00.000Z", reserved_prompt=prompt,
                  reserved_completion=50, http_status=200 if settled else None,
                  finished_at=f"{day}T12:00:01.000Z" if status != "pending" else None,
                  latency_ms=10, prompt_tokens=prompt if settled else None,
                  completion_tokens=completion if settled else None, usage_source="reported" if settled else None,
                  input_price_nusd_per_mtok=1000 if settled else None, output_price_nusd_per_mtok=2000 if settled else None,
                  cost_nusd=cost if settled else None, error=None, upstream="default" if settled else None,
                  attempts=1 if settled else None)
    return tuple(values[c] for c in REQUEST_COLUMNS)


# -- schema ----------------------------------------------------------------------------------------------------


def test_instances_starting_at_once_apply_each_migration_once(pg_dsn):
    stores = [PostgresStorage(pg_dsn) for _ in range(4)]
    errors: list[BaseException] = []

    def start(store):
        try:
            store.open()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert fetch(pg_dsn, "SELECT name FROM proxyd_migrations ORDER BY name") == [(m.__name__,) for m in MIGRATIONS]
    columns = [r[0] for r in fetch(pg_dsn, "SELECT column_name FROM information_schema.columns"
                                           " WHERE table_name = 'requests' ORDER BY ordinal_position")]
    assert columns == [*REQUEST_COLUMNS, "instance_id"]
    pk = [r[0] for r in fetch(pg_dsn, "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid"
                                      " AND a.attnum = ANY(i.indkey) WHERE i.indrelid = 'usage_daily'::regclass"
                                      " AND i.indisprimary ORDER BY array_position(i.indkey, a.attnum)")]
    assert pk == ["user_id", "model", "day", "endpoint", "upstream", "input_price_nusd_per_mtok",
                  "output_price_nusd_per_mtok"]
    assert len(fetch(pg_dsn, "SELECT * FROM proxyd_instances")) == 4
    PostgresStorage(pg_dsn).open()  # and again: nothing left to apply
    assert len(fetch(pg_dsn, "SELECT name FROM proxyd_migrations")) == len(MIGRATIONS)


# -- the writer --------------------------------------------------------------------------------------------------


def test_one_batch_commits_many_requests_with_their_summed_aggregates(pg_dsn):
    async def go():
        store = PostgresStorage(pg_dsn)
        store.open()
        store.bind_loop(asyncio.get_running_loop())
        # A request's pending row and its final row in the same batch: the final one stands.
        store.record_pending(row("r0", "pending"))
        futures = [store.record_settled(row(f"r{i}", "settled", user="alice" if i % 3 else "bob", prompt=i,
                                            completion=2 * i, cost=10 * i)) for i in range(200)]
        store.record_voided(row("v1", "voided"))
        assert store.queue_depth == 202
        await asyncio.gather(*futures)
        while store.queue_depth:
            await asyncio.sleep(0.01)
        assert store.writes == 202 and store.commits < 10  # batched, not one transaction per request
        usage = await store.usage(user_id=None, start="2031-02-01", end="2031-02-28", group_by="user", model=None)
        alice = [i for i in range(200) if i % 3]
        bob = [i for i in range(200) if not i % 3]
        assert [tuple(u) for u in usage] == [
            ("alice", len(alice), sum(alice), 2 * sum(alice), 10 * sum(alice)),
            ("bob", len(bob), sum(bob), 2 * sum(bob), 10 * sum(bob))]
        lines = await store.invoice_lines(period="2031-02", user_id="bob")
        assert [(ln.user_id, ln.requests, ln.cost_nusd) for ln in lines] == [("bob", len(bob), 10 * sum(bob))]
        check = await store.check()
        assert check["ok"] and check["requests_by_status"] == {"settled": 200, "voided": 1}
        assert (await store.check(start="2031-02-15", end="2031-02-15"))["ok"]
        period = store.period_usage("2031-02-15", "2031-02")
        assert sorted((s.user_id, s.requests, s.tokens, s.cost_nusd) for s in period.day) == [
            ("alice", len(alice), 3 * sum(alice), 10 * sum(alice)), ("bob", len(bob), 3 * sum(bob), 10 * sum(bob))]
        assert sorted(period.day) == sorted(period.month) == sorted(period.total)
        await store.close()

    asyncio.run(go())


def test_recent_requests_are_the_ended_ones_admitted_since(pg_dsn):
    async def go():
        store = PostgresStorage(pg_dsn)
        store.open()
        store.bind_loop(asyncio.get_running_loop())
        now = time.time()
        old, new = list(row("old", "settled")), list(row("new", "settled"))
        voided, pending = list(row("void", "voided")), list(row("pend", "pending"))
        old[8] = iso_ms(now - 120)
        new[8] = voided[8] = pending[8] = iso_ms(now - 10)
        store.record_pending(tuple(pending))
        store.record_voided(tuple(voided))
        await store.record_settled(tuple(old))
        await store.record_settled(tuple(new))
        recent = sorted(store.recent_requests(now - 60), key=lambda r: r.voided)
        assert [(r.user_id, r.tokens, r.voided) for r in recent] == [("alice", 15, False), ("alice", 0, True)]
        await store.close()

    asyncio.run(go())


def test_pending_rows_of_a_live_instance_are_never_expired_those_of_a_dead_one_are(pg_dsn):
    async def go():
        a = PostgresStorage(pg_dsn, instance_stale_s=30)
        a.open()
        a.bind_loop(asyncio.get_running_loop())
        a.record_pending(row("a1", "pending"))
        await a.record_settled(row("a0", "settled"))  # after the pending row: same writer, same order
        # Another instance starting now: a is alive (heartbeat fresh), so its running request stays pending.
        b = PostgresStorage(pg_dsn, instance_stale_s=30)
        b.open()
        assert b.expire_stale_pending() == 0
        assert fetch(pg_dsn, "SELECT status, instance_id FROM requests WHERE id = 'a1'") == [("pending", a.instance_id)]
        # a goes silent (its heartbeat as if 31 s old): its pending rows are a crash's leftovers now.
        await a.close()  # a clean stop removes its heartbeat row as well
        c = PostgresStorage(pg_dsn, instance_stale_s=30)
        c.open()
        assert c.expire_stale_pending() == 1
        assert fetch(pg_dsn, "SELECT status FROM requests ORDER BY id") == [("settled",), ("expired",)]

    asyncio.run(go())


def test_a_dead_instance_is_found_by_the_heartbeat_of_a_live_one(pg_dsn):
    async def go():
        live = PostgresStorage(pg_dsn, instance_stale_s=0.6)  # heartbeat every 0.1 s
        live.open()
        live.bind_loop(asyncio.get_running_loop())
        dead = PostgresStorage(pg_dsn, instance_stale_s=0.6)
        dead.open()
        dead.bind_loop(asyncio.get_running_loop())
        dead.record_pending(row("d1", "pending"))
        live.record_pending(row("l1", "pending"))
        while len(fetch(pg_dsn, "SELECT id FROM requests")) < 2:
            await asyncio.sleep(0.05)
        for task in dead._tasks[1:]:  # dead stops beating (as a killed process would), its writer idle
            task.cancel()
        deadline = time.monotonic() + 10
        while fetch(pg_dsn, "SELECT status FROM requests WHERE id = 'd1'") != [("expired",)]:
            assert time.monotonic() < deadline, "the dead instance's pending row was not expired"
            await asyncio.sleep(0.1)
        assert fetch(pg_dsn, "SELECT status FROM requests WHERE id = 'l1'") == [("pending",)]
        await live.close()

    asyncio.run(go())


# -- proxies on one database ------------------------------------------------------------------------------------


@pytest.fixture
def two(pg_dsn, tmp_path):
    config = {"database.backend": "postgres", "database.dsn": pg_dsn}
    a = Harness(str(tmp_path / "a.db"), config=config).start()
    b = Harness(str(tmp_path / "b.db"), config=config, upstream_url=a.upstream_url).start()
    yield a, b
    b.close()
    a.close()


def wait_until(predicate, timeout: float = 1.0) -> float:
    """Seconds until predicate() held; fails after ``timeout``."""
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout, f"not within {timeout}s"
        time.sleep(0.01)
    return time.monotonic() - started


def test_a_key_revoked_through_one_instance_is_refused_by_the_other_within_a_second(two):
    a, b = two
    key = a.new_user("alice")
    # b learns of the new user and key from the notification, without a restart
    wait_until(lambda: b.get("/v1/usage", key).status_code == 200)
    key_id = a.admin("GET", "/admin/users/alice").json()["keys"][0]["key_id"]
    assert a.admin("DELETE", f"/admin/keys/{key_id}").status_code == 204
    wait_until(lambda: b.get("/v1/usage", key).status_code == 401)
    with pytest.raises(Exception) as refused:
        b.client(key).chat.completions.create(model="llama3.2:1b", messages=MSG)
    assert getattr(refused.value, "status_code", None) == 401


def test_limits_and_disabling_set_through_one_instance_apply_on_the_other(two):
    a, b = two
    key = a.new_user("bob")
    wait_until(lambda: "bob" in b.ctx.accounts.users)
    r = a.admin("PUT", "/admin/users/bob/limits", {"requests_per_day": 1})
    assert r.status_code == 200, r.text
    wait_until(lambda: b.admin("GET", "/admin/users/bob/limits").json()["overrides"].get("requests_per_day") == 1)
    assert a.admin("PATCH", "/admin/users/bob", {"disabled": True}).status_code == 200
    wait_until(lambda: b.get("/v1/usage", key).status_code == 403)


def test_a_stream_running_on_the_other_instance_is_cut_off_when_its_key_is_revoked(pg_dsn, tmp_path):
    config = {"database.backend": "postgres", "database.dsn": pg_dsn}
    a = Harness(str(tmp_path / "a.db"), config=config, emulator={"token_delay_s": 0.05}).start()
    b = Harness(str(tmp_path / "b.db"), config=config, upstream_url=a.upstream_url).start()
    try:
        key = a.new_user("carol")
        wait_until(lambda: "carol" in b.ctx.accounts.users)
        key_id = a.admin("GET", "/admin/users/carol").json()["keys"][0]["key_id"]
        chunks: list[str] = []
        ended: list[BaseException] = []

        def consume():
            try:
                for chunk in b.client(key).chat.completions.create(
                        model="llama3.2:1b", stream=True, max_tokens=400,
                        messages=[{"role": "user", "content": "[[emu:reply_tokens=400]] story"}]):
                    chunks.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
            except BaseException as exc:  # noqa: BLE001 - the cut-off ends the stream with an error event
                ended.append(exc)

        t = threading.Thread(target=consume)
        t.start()
        wait_until(lambda: len(chunks) > 3, timeout=10)
        revoked_at = time.monotonic()
        assert a.admin("DELETE", f"/admin/keys/{key_id}").status_code == 204
        t.join(10)
        assert time.monotonic() - revoked_at < 1.5
        assert len(chunks) < 400 and ended, "the stream ran to its end"
        b.settle_all()
        [(status, http_status)] = b.rows("SELECT status, http_status FROM requests")
        assert status == "settled" and http_status == 401  # billed for what it relayed
    finally:
        b.close()
        a.close()


def test_usage_and_invoices_read_the_same_from_every_instance(two):
    a, b = two
    key = a.new_user("dave")
    wait_until(lambda: "dave" in b.ctx.accounts.users)
    for world in (a, b, a):
        world.client(key).chat.completions.create(model="llama3.2:1b", messages=MSG)
    for path in ("/v1/usage", "/v1/usage?group_by=day", f"/v1/billing/invoices?period={time.strftime('%Y-%m')}"):
        ra, rb = a.get(path, key), b.get(path, key)
        assert ra.status_code == rb.status_code == 200
        assert ra.json() == rb.json()
    assert a.get("/v1/usage", key).json()["totals"]["requests"] == 3
    ca, cb = a.admin("GET", "/admin/ledger/check").json(), b.admin("GET", "/admin/ledger/check").json()
    assert ca["ok"] and cb["ok"] and ca["requests_by_status"] == cb["requests_by_status"] == {"settled": 3}


# -- PostgreSQL's connections killed mid-run ----------------------------------------------------------------------


def terminate_backends(dsn: str) -> int:
    name = dsn.rsplit("/", 1)[1]
    return len(fetch(dsn, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                          " WHERE datname = $1 AND pid != pg_backend_pid()", name))


def test_killed_connections_fail_requests_cleanly_and_lose_nothing_answered(pg_dsn, tmp_path):
    world = Harness(str(tmp_path / "x.db"), config={"database.backend": "postgres", "database.dsn": pg_dsn}).start()
    try:
        key = world.new_user("erin")
        answered: list[str] = []
        refused: list[httpx.Response] = []
        stop = threading.Event()

        def client(n: int) -> None:
            with httpx.Client(timeout=30) as http:
                while not stop.is_set():
                    r = http.post(world.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                                  json={"model": "llama3.2:1b", "messages": MSG, "max_tokens": 5})
                    if r.status_code == 200:
                        answered.append("req_" + r.json()["id"].split("-", 1)[1])
                    else:
                        refused.append(r)

        threads = [threading.Thread(target=client, args=(n,)) for n in range(6)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        killed = 0
        for _ in range(3):  # each time every connection proxyd holds (writer, pool, LISTEN) is cut
            killed += terminate_backends(pg_dsn)
            time.sleep(0.8)
        assert killed >= 3
        time.sleep(1.5)  # reconnected by itself: requests succeed again
        before = len(answered)
        time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join(30)
        assert len(answered) > before, "requests did not recover after the connections came back"
        for r in refused:  # failed cleanly: 503 in OpenAI's envelope, with a Retry-After
            assert r.status_code == 503 and r.headers.get("Retry-After"), (r.status_code, r.text)
            assert r.json()["error"]["type"] == "api_error"
        world.settle_all()
        settled = {rid for (rid,) in world.rows("SELECT id FROM requests WHERE status = 'settled'")}
        assert set(answered) <= settled  # nothing that was answered is missing
        assert world.admin("GET", "/admin/ledger/check").json()["ok"]
    finally:
        world.close()


class Relay:
    """A TCP relay between proxyd and PostgreSQL that the test can take down (every connection cut, new ones
    refused) and bring back: PostgreSQL going away and coming back, as far as proxyd can tell."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.writers: set = set()
        self.up = True
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._client, "127.0.0.1", 0), self.loop).result(5)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _client(self, reader, writer) -> None:
        if not self.up:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self.writers |= {writer, up_writer}

        async def pipe(src, dst) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def down(self) -> None:
        def cut() -> None:
            self.up = False
            for w in self.writers:
                w.transport.abort()
            self.writers.clear()

        self.loop.call_soon_threadsafe(cut)

    def restore(self) -> None:
        self.loop.call_soon_threadsafe(setattr, self, "up", True)

    def close(self) -> None:
        self.down()
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def test_postgres_gone_for_seconds_fails_requests_cleanly_then_serves_again(pg_dsn, tmp_path):
    from urllib.parse import urlsplit

    parts = urlsplit(pg_dsn)
    relay = Relay(parts.port or 5432)
    dsn = parts._replace(netloc=f"{parts.username}@127.0.0.1:{relay.port}").geturl()
    world = Harness(str(tmp_path / "x.db"), config={"database.backend": "postgres", "database.dsn": dsn,
                                                     "database.write_wait_s": 1.0}).start()
    try:
        key = world.new_user("frank")
        answered: list[str] = []
        refused: list[httpx.Response] = []
        stop = threading.Event()

        def client() -> None:
            with httpx.Client(timeout=30) as http:
                while not stop.is_set():
                    r = http.post(world.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                                  json={"model": "llama3.2:1b", "messages": MSG, "max_tokens": 5})
                    if r.status_code == 200:
                        answered.append("req_" + r.json()["id"].split("-", 1)[1])
                    else:
                        refused.append(r)

        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        wait_until(lambda: len(answered) > 20, timeout=10)
        relay.down()  # gone for 3 s: longer than write_wait_s, so settles in flight fail too
        time.sleep(3.0)
        during = len(answered)
        assert world.ctx.ledger.unavailable
        relay.restore()
        wait_until(lambda: len(answered) > during + 20, timeout=10)  # back by itself
        stop.set()
        for t in threads:
            t.join(30)
        assert refused, "nothing was refused while PostgreSQL was away"
        for r in refused:  # 503 in OpenAI's envelope with a Retry-After: the SDKs retry
            assert r.status_code == 503 and r.headers.get("Retry-After") == "2", (r.status_code, r.text)
            assert r.json()["error"]["code"] == "service_unavailable"
        world.settle_all()
        settled = {rid for (rid,) in world.rows("SELECT id FROM requests WHERE status = 'settled'")}
        assert set(answered) <= settled  # every answered request is in the ledger
        assert world.admin("GET", "/admin/ledger/check").json()["ok"]
        assert world.get("/v1/usage", key).json()["totals"]["requests"] == len(settled)
    finally:
        world.close()
        relay.close()
