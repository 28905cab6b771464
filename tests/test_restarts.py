"""Issue #16's done-when with real process restarts: Redis killed (-9) and started again empty mid-run,
PostgreSQL crash-stopped (``pg_ctl stop -m immediate``) and started again mid-run, under concurrent load.

The shared servers of tests/services.py are never restarted: each test here restarts a server of its own
(tests/private_servers.py). test_redis_admission.py and test_postgres.py simulate the same failures (the
keys deleted, a relay cut); here the processes really go: the connections drop as the kernel drops them,
Redis forgets its scripts and its run id changes, PostgreSQL runs crash recovery.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest
import redis

from tests.harness import Harness
from tests.private_servers import private_postgres, private_redis  # noqa: F401 - fixtures
from tests.test_postgres import wait_until
from tests.test_redis_admission import _three, make_world  # noqa: F401 - make_world: a fixture

LIMIT = 3000  # about 55 requests of 54 tokens (the reply runs into max_tokens: each bills what it reserved)


@pytest.fixture
def redis_url(private_redis):  # noqa: F811 - make_world (test_redis_admission) puts its worlds on this Redis
    return private_redis.url


def _is_clean_503(status: int, headers: httpx.Headers, body: bytes) -> bool:
    """A 503 in OpenAI's error envelope with a Retry-After: what the SDKs retry."""
    if status != 503 or int(headers.get("retry-after", "0")) < 1:
        return False
    err = json.loads(body).get("error") or {}
    return err.get("code") == "service_unavailable" and err.get("type") == "api_error" and bool(err.get("message"))


def _until_the_limit_refuses(worlds: list[Harness], key: str, concurrency: int, deadline_s: float = 40) -> list:
    """``concurrency`` clients spread over the instances, each sending requests (streams and not, in turn)
    until the limit refuses it; a 503 is retried after 0.1 s (not the 2 s it says: the test must stay short).
    Returns (started, ended, status, headers, body) of every response."""
    out: list = []
    auth = {"Authorization": f"Bearer {key}"}
    deadline = time.monotonic() + deadline_s

    async def client(i: int) -> None:
        base = worlds[i % len(worlds)].url
        async with httpx.AsyncClient(timeout=30) as http:
            n = 0
            while time.monotonic() < deadline:
                stream = (i + n) % 2 == 0
                n += 1
                body = {"model": "llama3.2:1b", "max_tokens": 20, "stream": stream,
                        "messages": [{"role": "user", "content": "[[emu:reply_tokens=50]] Hi"}]}
                started = time.monotonic()
                async with http.stream("POST", base + "/v1/chat/completions", json=body, headers=auth) as r:
                    data = await r.aread()
                out.append((started, time.monotonic(), r.status_code, r.headers, data))
                if r.status_code == 429:
                    return
                if r.status_code == 503:
                    await asyncio.sleep(0.1)
        raise AssertionError("the limit never refused")

    async def run() -> None:
        await asyncio.gather(*[client(i) for i in range(concurrency)])

    asyncio.run(run())
    return out


@pytest.mark.parametrize("limit", ["total_tokens", "tokens_per_minute"])
def test_redis_killed_and_restarted_empty_mid_run_keeps_the_limit(pg_dsn, make_world, private_redis,  # noqa: F811
                                                                  limit):
    """Three instances (Redis admission on a private Redis, the ledger on PostgreSQL) under 12-way concurrent
    load against a token limit that admits 55 requests; once 10 are settled the redis-server is killed -9,
    stays away 1 s and comes back empty on the same port. Requests meanwhile get a clean 503; the counters
    are rebuilt from the ledger; the ledger bills no more than the limit, the limit admits as many as fit,
    and afterwards every instance's /v1/limits and /v1/usage equal the ledger."""
    worlds, key = _three(make_world, pg_dsn, {limit: LIMIT}, emulator={"token_delay_s": 0.01})
    for w in worlds:
        w.ctx.meter.admission.settle_grace_s = 1.0  # the real grace: ledger commits in progress land first
    prefix = worlds[0].ctx.meter.admission.prefix
    marks: dict[str, float] = {}

    def crash_when_busy() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if worlds[0].rows("SELECT COUNT(*) FROM requests WHERE status='settled'")[0][0] >= 10:
                marks["rebuilds"] = sum(w.ctx.meter.admission.rebuilds for w in worlds)
                marks["killed"] = time.monotonic()
                private_redis.kill()
                time.sleep(1.0)
                private_redis.start()  # empty: no snapshot, no AOF
                marks["restarted"] = time.monotonic()
                return
            time.sleep(0.01)

    t = threading.Thread(target=crash_when_busy)
    t.start()
    try:
        responses = _until_the_limit_refuses(worlds, key, 12)
    finally:
        t.join()
        if private_redis.proc.poll() is not None:
            private_redis.start()  # the fixtures' teardown talks to it
    assert "restarted" in marks, "the load ended before Redis was killed"
    for w in worlds:
        w.settle_all()
    [(count, billed, least, most)] = worlds[0].rows(
        "SELECT COUNT(*), SUM(prompt_tokens + completion_tokens), MIN(prompt_tokens + completion_tokens),"
        " MAX(prompt_tokens + completion_tokens) FROM requests WHERE status='settled'")
    statuses = [s for _, _, s, _, _ in responses]
    ok = statuses.count(200)

    # The limit held across the restart, and admitted as many as fit: all requests bill the same.
    assert least == most, (least, most)
    assert billed <= LIMIT, (billed, count)
    assert count == ok and billed + most > LIMIT, (count, ok, billed)
    # Every refusal is the limit's 429 or, while Redis was away, a clean 503; no 503 before Redis was killed.
    assert set(statuses) <= {200, 429, 503}, sorted(set(statuses))
    # Requests running when Redis went finish and are billed (their settles wait for Redis to take them).
    assert [1 for s, e, st, _, _ in responses if s < marks["killed"] < e and st == 200], "none in flight at the kill"
    unavailable = [(s, e, h, b) for s, e, st, h, b in responses if st == 503]
    assert unavailable, "no request met the outage"
    for started, ended, headers, body in unavailable:
        assert _is_clean_503(503, headers, body), (headers, body)
        assert ended >= marks["killed"], "a 503 before Redis went away"
    for _, _, st, _, body in responses:
        if st == 429:
            assert limit.encode() in body, body
        if st == 200 and body.startswith(b"data:"):  # a stream: whole, not cut when Redis went
            assert body.rstrip().endswith(b"data: [DONE]"), body[-300:]
    # Rebuilt after the restart (by one instance; one more if a loaded machine let a lease lapse), on the
    # new Redis: the marker carries the new server's run id.
    assert sum(w.ctx.meter.admission.rebuilds for w in worlds) > marks["rebuilds"]
    r = redis.Redis.from_url(private_redis.url)
    try:
        assert r.hget(prefix + "ready", "run_id").decode() == r.info("server")["run_id"]
    finally:
        r.close()
    # Afterwards every instance reads what the ledger holds.
    for w in worlds:
        status = {x["name"]: x for x in w.get("/v1/limits", key).json()["limits"]}
        assert (status[limit]["used"], status[limit]["reserved"]) == (billed, 0), status
        totals = w.get("/v1/usage", key).json()["totals"]
        assert (totals["requests"], totals["prompt_tokens"] + totals["completion_tokens"]) == (count, billed)
    assert worlds[0].admin("GET", "/admin/ledger/check").json()["ok"]
    print(f"{limit}: {ok} answered ({billed} tokens of {LIMIT}), {len(unavailable)} 503s, "
          f"{statuses.count(429)} 429s, rebuilds {marks['rebuilds']} -> "
          f"{sum(w.ctx.meter.admission.rebuilds for w in worlds)}")


@pytest.mark.parametrize("write_wait_s", [1.0, 5.0], ids=["settles-fail", "settles-wait"])
def test_postgres_crashed_and_restarted_mid_run_loses_nothing_answered(private_postgres, tmp_path,  # noqa: F811
                                                                       write_wait_s):
    """Two instances with their ledger on a private PostgreSQL, 6 clients over both; PostgreSQL is stopped
    with ``-m immediate`` (a crash: no checkpoint, recovery at the next start), stays away 2 s and is
    started again. A request sent meanwhile is refused at once with a clean 503 (Retry-After, OpenAI's
    envelope); with ``write_wait_s`` 5 s the requests in flight at the crash wait for it and succeed, with
    1 s they fail as clean 503s too. Every
    request answered 200 is settled in the ledger after recovery, which checks out; both instances serve
    again by themselves and hear each other's changes again."""
    config = {"database.backend": "postgres", "database.dsn": private_postgres.dsn, "database.write_wait_s": write_wait_s}
    a = Harness(str(tmp_path / "a.db"), config=config, emulator={"token_delay_s": 0.01}).start()
    b = None
    try:
        b = Harness(str(tmp_path / "b.db"), config=config, upstream_url=a.upstream_url).start()
        worlds = (a, b)
        key = a.new_user("frank")
        wait_until(lambda: b.get("/v1/usage", key).status_code == 200, timeout=5)
        answered: list[tuple[float, float, str]] = []
        refused: list[tuple[float, float, int, httpx.Headers, bytes]] = []
        probes: list[tuple[float, int, httpx.Headers, bytes]] = []
        stop = threading.Event()

        def client(i: int) -> None:
            base = worlds[i % 2].url
            with httpx.Client(timeout=30) as http:
                while not stop.is_set():
                    started = time.monotonic()
                    r = http.post(base + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                                  json={"model": "llama3.2:1b", "max_tokens": 5,
                                        "messages": [{"role": "user", "content": "[[emu:reply_tokens=5]] Hi"}]})
                    if r.status_code == 200:
                        answered.append((started, time.monotonic(), r.headers["x-request-id"]))
                    else:
                        refused.append((started, time.monotonic(), r.status_code, r.headers, r.content))
                        time.sleep(0.05)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        try:
            wait_until(lambda: len(answered) > 30, timeout=10)
            crashed = time.monotonic()
            private_postgres.crash()
            gone = time.monotonic()  # pg_ctl has seen the server stop (~0.1 s later)
            seen_down = wait_until(lambda: all(w.admin("GET", "/healthz").json()["ledger_unavailable"]
                                               for w in worlds), timeout=2)
            for w in worlds:  # a new request meanwhile is refused at once, not run upstream to fail its settle
                sent = time.monotonic()
                r = httpx.post(w.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                               json={"model": "llama3.2:1b", "messages": [{"role": "user", "content": "Hi"}]})
                probes.append((time.monotonic() - sent, r.status_code, r.headers, r.content))
            time.sleep(max(0.0, 2.0 - (time.monotonic() - crashed)))
            during = len(answered)
            starting = time.monotonic()
            private_postgres.start()  # crash recovery, then the same port
            restarted = time.monotonic()  # pg_ctl saw it ready (the writer's retries may have got in first)
            wait_until(lambda: len(answered) > during + 30, timeout=15)  # serving again by itself
            back_after = time.monotonic() - restarted
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        assert seen_down < 2
        for took, status, headers, body in probes:
            assert _is_clean_503(status, headers, body) and took < 0.5, (took, status, body)
        for started, ended, status, headers, body in refused:
            assert _is_clean_503(status, headers, body), (status, headers, body)
            assert ended >= crashed, "refused before the crash"
        straddled = [rid for started, ended, rid in answered if started < gone and ended > starting]
        if write_wait_s > 2.5:  # longer than the outage: the requests in flight at the crash waited
            assert straddled, "no request in flight at the crash waited for PostgreSQL"
        else:  # shorter: they failed (clean 503s, above) instead; a batch queued behind one given up may
            # still wait into the restart, so only the refusals are certain
            assert [r for r in refused if r[0] < gone], "no request in flight at the crash was refused"
        for w in worlds:
            w.settle_all()
        settled = {rid for (rid,) in a.rows("SELECT id FROM requests WHERE status = 'settled'")}
        missing = [rid for _, _, rid in answered if rid not in settled]
        assert not missing, f"{len(missing)} of {len(answered)} answered requests are not settled: {missing[:5]}"
        for w in worlds:
            check = w.admin("GET", "/admin/ledger/check").json()
            assert check["ok"], check
            assert w.get("/v1/usage", key).json()["totals"]["requests"] == len(settled)
        # LISTEN came back on both: a user created through one is known to the other.
        key2 = b.new_user("grace")
        wait_until(lambda: a.get("/v1/usage", key2).status_code == 200, timeout=5)
        print(f"answered {len(answered)}, refused {len(refused)}, straddled {len(straddled)}, "
              f"down seen after {seen_down:.2f}s, serving again {back_after:.2f}s after the restart")
    finally:
        if b is not None:
            b.close()
        a.close()


def test_an_idle_instance_serves_again_soon_after_postgres_comes_back(private_postgres, tmp_path):  # noqa: F811
    """While the ledger is unavailable every new request is refused, so nothing but the heartbeat's probe can
    find PostgreSQL back: it must probe every 0.5 s from the moment the outage is seen, not only once its
    regular interval (instance_stale_s / 6, 5 s by default) has run out. PostgreSQL crashes just after a
    heartbeat, so that interval has all of its 5 s still to run, and is back 1 s later: requests succeed
    again within 1.5 s (a probe within 0.5 s, plus slack for a loaded machine)."""
    world = Harness(str(tmp_path / "a.db"), config={"database.backend": "postgres", "database.dsn": private_postgres.dsn,
                                                     "database.write_wait_s": 0.5}).start()
    try:
        key = world.new_user("hana")
        auth = {"Authorization": f"Bearer {key}"}
        body = {"model": "llama3.2:1b", "messages": [{"role": "user", "content": "Hi"}]}
        assert httpx.post(world.url + "/v1/chat/completions", json=body, headers=auth, timeout=10).status_code == 200
        me = world.ctx.ledger.instance_id
        beat = world.rows("SELECT heartbeat_at FROM proxyd_instances WHERE instance_id = ?", (me,))
        wait_until(lambda: world.rows("SELECT heartbeat_at FROM proxyd_instances WHERE instance_id = ?", (me,)) != beat,
                   timeout=10)
        private_postgres.crash()  # just after a heartbeat
        r = httpx.post(world.url + "/v1/chat/completions", json=body, headers=auth, timeout=10)
        assert r.status_code == 503  # the settle failed after write_wait_s: the ledger is unavailable now
        assert world.admin("GET", "/healthz").json()["ledger_unavailable"] is True
        time.sleep(1.0)
        private_postgres.start()
        restarted = time.monotonic()
        while httpx.post(world.url + "/v1/chat/completions", json=body, headers=auth, timeout=10).status_code != 200:
            assert time.monotonic() - restarted < 1.5, "still refusing 1.5 s after PostgreSQL came back"
            time.sleep(0.05)
    finally:
        world.close()
