"""The Redis admission (issue #16): the in-memory admission's semantics, shared by several instances.

Needs Redis (tests/services.py: skipped locally without it, a failure under CI). Every test has its own
key prefix. The in-memory admission is the reference: a state machine drives both with the same calls
and compares every answer; the existing HTTP-level admission tests are imported and run here again
over Redis (this module's ``world``/``make_world`` build Redis-backed proxies).
"""

from __future__ import annotations

import asyncio
import struct
import threading
import time
import uuid
from typing import Any

import openai
import pytest
import redis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, initialize, invariant, rule

from proxyd.admission import Refusal, RefusalKind
from proxyd.limits import Limiter, MemoryAdmission
from proxyd.limitspec import LIMIT_FIELDS, Window
from proxyd.redis_admission import RedisAdmission
from proxyd.storage import PeriodUsage
from tests.harness import Harness
from tests.services import need_redis

# The in-memory admission's HTTP-level tests, collected here again over Redis (they use no fake clock).
from tests.test_limit_headers import (  # noqa: F401
    test_a_daily_quota_is_not_reported_as_a_per_minute_window,
    test_a_per_minute_refusal_keeps_x_ratelimit,
    test_the_refusing_long_term_limit_is_named_with_its_model_and_unit,
    test_with_a_per_minute_limit_too_x_ratelimit_describes_only_the_minute,
)
from tests.test_metering import (  # noqa: F401
    test_concurrent_requests_never_bill_past_a_total_limit,
    test_cost_limits_and_total,
    test_per_model_and_config_limits_and_overrides_survive_restart,
    test_room_held_by_a_request_in_flight_is_a_short_wait_not_a_spent_quota,
    test_tokens_per_minute_and_concurrency,
    test_upstream_failure_is_voided,
    test_user_isolation,
)
from tests.test_process import emulator  # noqa: F401 - a fixture
from tests.test_properties import scope_limits

MSG = [{"role": "user", "content": "Hi"}]  # 26 prompt tokens


def _prefix() -> str:
    return f"proxyd-test:{uuid.uuid4().hex[:12]}:"


def _drop(url: str, prefix: str) -> None:
    r = redis.Redis.from_url(url)
    keys = list(r.scan_iter(prefix + "*", count=1000))
    if keys:
        r.delete(*keys)
    r.close()


@pytest.fixture
def redis_url() -> str:
    return need_redis()


@pytest.fixture
def make_world(tmp_path, redis_url):
    """As conftest's, with ``admission.backend: redis`` on a key prefix of the test's own (``prefix=`` to share one)."""
    worlds, prefixes = [], []

    def make(config: dict | None = None, prefix: str | None = None, db_path: str | None = None, **kw) -> Harness:
        prefix = prefix or _prefix()
        prefixes.append(prefix)
        cfg = {"admission.backend": "redis", "admission.url": redis_url, "admission.key_prefix": prefix,
               "admission.lease_s": 1.5, **(config or {})}
        h = Harness(db_path or str(tmp_path / f"proxyd{len(worlds)}.db"), config=cfg, **kw).start()
        h.ctx.meter.admission.settle_grace_s = 0.05  # nothing is being committed while a test world starts
        worlds.append(h)
        return h

    yield make
    for h in worlds:
        h.close()
    for p in set(prefixes):
        _drop(redis_url, p)


@pytest.fixture
def world(make_world):
    return make_world()


class _NoLedger:
    def period_usage(self, day, month):
        return PeriodUsage([], [], [])

    def recent_requests(self, since):
        return []


class Driver:
    """One admission (memory or Redis) driven synchronously, on a loop of its own."""

    def __init__(self, kind: str, url: str | None = None, prefix: str | None = None, *, lease_s: float = 30.0,
                 ledger: Any = None) -> None:
        self.kind = kind
        self.loop = asyncio.new_event_loop()
        if kind == "memory":
            self.adm = MemoryAdmission(Limiter(), connections_per_key=100)
        else:
            self.adm = RedisAdmission(url, ledger=ledger or _NoLedger(), connections_per_key=100, key_prefix=prefix,
                                      lease_s=lease_s, settle_grace_s=0.0)

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def mark_ready(self) -> None:
        """An empty, ready Redis (what a rebuild from an empty ledger leaves, without its recovery wait)."""
        if self.kind == "redis":
            self.run(self.adm.redis.hset(self.adm.prefix + "ready", mapping={"epoch": "e0", "at": 0, "layout": 2}))

    def reserve(self, **kw):
        return self.run(self.adm.reserve(**kw))

    def settle(self, hold, prompt, completion, cost):
        self.run(self.adm.settle(hold, prompt, completion, cost))

    def void(self, hold):
        self.run(self.adm.void(hold))

    def status(self, user, scope, limits):
        return self.run(self.adm.status(user, scope, limits, time.time()))

    def close(self) -> None:
        if self.kind == "redis":
            self.run(self.adm.close())
        self.loop.close()


def _state(checks) -> list:
    return [(c.scope, c.name, c.limit, c.used, c.reserved, int(c.metric), c.window) for c in checks]


def _same(a, b) -> None:
    """The memory (a) and Redis (b) answers to the same call agree in everything but the clocks' readings."""
    assert isinstance(a, Refusal) == isinstance(b, Refusal), (a, b)
    assert _state(a.checks) == _state(b.checks), (a, b)
    for ca, cb in zip(a.checks, b.checks):
        assert (ca.reset_at is None) == (cb.reset_at is None)
        if ca.reset_at is not None:
            assert abs(ca.reset_at - cb.reset_at) < 5, (ca, cb)
    if isinstance(a, Refusal):
        assert (a.kind, a.limit.scope, a.limit.name, a.need, a.default_budget) == (
            b.kind, b.limit.scope, b.limit.name, b.need, b.default_budget), (a, b)
        assert (a.retry_after is None) == (b.retry_after is None)
        if a.retry_after is not None:
            assert abs(a.retry_after - b.retry_after) < 5, (a, b)
    else:
        assert (a.prompt_tokens, a.completion_tokens, a.cost_nusd) == (b.prompt_tokens, b.completion_tokens,
                                                                       b.cost_nusd)


# =================================================================================================
# The same answers as the in-memory admission, call for call
# =================================================================================================

MODELS = ("m1", "m2:latest")
USERS = ("u1", "u:2")


class SameAsMemory(RuleBasedStateMachine):
    holds = Bundle("holds")

    @initialize(user_limits=scope_limits(), model_limits=st.tuples(scope_limits(), scope_limits()),
                price=st.tuples(st.integers(0, 2 * 10**9), st.integers(0, 4 * 10**9)),
                min_completion=st.integers(1, 32))
    def setup(self, user_limits, model_limits, price, min_completion):
        self.url = need_redis()
        self.prefix = _prefix()
        self.mem = Driver("memory")
        self.red = Driver("redis", self.url, self.prefix)
        self.red.mark_ready()
        self.user_limits = user_limits
        self.model_limits = dict(zip(MODELS, model_limits))
        self.price = price
        self.min_completion = min_completion

    @rule(target=holds, user=st.sampled_from(USERS), model=st.sampled_from(MODELS), prompt=st.integers(0, 250),
          completion=st.integers(1, 400), is_default=st.booleans())
    def reserve(self, user, model, prompt, completion, is_default):
        kw = dict(user_id=user, model=model, user_limits=self.user_limits, model_limits=self.model_limits[model],
                  prompt_tokens=prompt, completion_tokens=completion, completion_is_default=is_default,
                  min_completion_tokens=self.min_completion, price=self.price)
        a, b = self.mem.reserve(**kw), self.red.reserve(**kw)
        _same(a, b)
        return None if isinstance(a, Refusal) else (a, b)

    @rule(pair=consumes(holds), fraction=st.floats(0, 1.5), prompt_delta=st.integers(-5, 5))
    def settle(self, pair, fraction, prompt_delta):
        if pair is None:
            return
        a, b = pair
        prompt = max(0, a.prompt_tokens + prompt_delta)
        completion = int(a.completion_tokens * fraction)  # more than reserved too: actual usage may exceed it
        cost = (prompt * self.price[0] + completion * self.price[1] + 500_000) // 1_000_000
        self.mem.settle(a, prompt, completion, cost)
        self.red.settle(b, prompt, completion, cost)

    @rule(pair=consumes(holds))
    def void(self, pair):
        if pair is not None:
            self.mem.void(pair[0])
            self.red.void(pair[1])

    @invariant()
    def status_agrees(self):
        if not hasattr(self, "mem"):
            return
        for user in USERS:
            for scope, limits in (("*", self.user_limits), *self.model_limits.items()):
                assert _state(self.mem.status(user, scope, limits)) == _state(self.red.status(user, scope, limits))

    def teardown(self):
        if hasattr(self, "mem"):
            self.mem.close()
            self.red.close()
            _drop(self.url, self.prefix)


SameAsMemory.TestCase.settings = settings(max_examples=30, stateful_step_count=25, deadline=None,
                                          suppress_health_check=[HealthCheck.too_slow])
test_redis_answers_as_the_memory_admission = SameAsMemory.TestCase


# =================================================================================================
# Every limit kind refuses exactly at its bound, on both backends
# =================================================================================================

PRICE = (1_000_000_000, 1_000_000_000)  # $1 per million tokens: 30 tokens cost 30,000 nano-USD


@pytest.fixture(params=["memory", "redis"])
def driver(request):
    if request.param == "memory":
        d = Driver("memory")
    else:
        url = need_redis()
        prefix = _prefix()
        d = Driver("redis", url, prefix)
        d.mark_ready()
        request.addfinalizer(lambda: _drop(url, prefix))
    yield d
    d.close()


@pytest.mark.parametrize("scope", ["*", "m1"])
@pytest.mark.parametrize("name", sorted(LIMIT_FIELDS))
def test_every_limit_refuses_exactly_at_its_bound(driver, name, scope):
    metric, window = LIMIT_FIELDS[name]
    bound = {0: 3, 1: 3 * 30, 2: 3 * 30_000}[int(metric)]  # three requests of 10 + 20 tokens fit, exactly
    limits = {name: bound}
    kw = dict(user_id="u1", model="m1", user_limits=limits if scope == "*" else {},
              model_limits=limits if scope == "m1" else {}, prompt_tokens=10, completion_tokens=20,
              completion_is_default=False, min_completion_tokens=16, price=PRICE)
    holds = []
    for _ in range(3):
        hold = driver.reserve(**kw)
        assert not isinstance(hold, Refusal), hold
        holds.append(hold)
        if window != Window.CONCURRENT:
            driver.settle(hold, 10, 20, 30_000)
    refusal = driver.reserve(**kw)
    assert isinstance(refusal, Refusal), refusal
    assert (refusal.limit.name, refusal.limit.scope) == (name, scope)
    expected = {Window.MINUTE: RefusalKind.RATE, Window.CONCURRENT: RefusalKind.RATE}.get(window, RefusalKind.QUOTA)
    assert refusal.kind is expected, refusal
    [status] = driver.status("u1", scope, limits)
    assert status.used + status.reserved == bound
    if window == Window.CONCURRENT:
        driver.void(holds[0])  # one fewer in flight: one more fits
        assert not isinstance(driver.reserve(**kw), Refusal)


# =================================================================================================
# Settle and void: idempotent, keyed by the hold's id
# =================================================================================================

def test_a_retried_settle_or_void_applies_once(redis_url):
    d = Driver("redis", redis_url, _prefix())
    d.mark_ready()
    limits = {"total_tokens": 1000, "max_concurrent_requests": 5}
    kw = dict(user_id="u1", model="m1", user_limits=limits, model_limits={}, prompt_tokens=10, completion_tokens=20,
              completion_is_default=False, min_completion_tokens=16, price=PRICE)
    try:
        a, b = d.reserve(**kw), d.reserve(**kw)
        d.settle(a, 10, 15, 25_000)
        # The same settle again (a retry after a lost reply): the script is keyed by the hold's id.
        what = ("settle", a.epoch, 25, 25_000, a.user_id, a.model, a.day, a.month)
        for _ in range(3):
            assert d.run(d.adm.script(args=d.adm._post_args(a.rid, what, orphan=False))) == 0
        assert d.run(d.adm.script(args=d.adm._post_args(a.rid, ("void", a.epoch), orphan=False))) == 0
        d.void(b)
        assert d.run(d.adm.script(args=d.adm._post_args(b.rid, ("void", b.epoch), orphan=False))) == 0
        tokens, conc = d.status("u1", "*", limits)
        assert (tokens.used, tokens.reserved, conc.used) == (25, 0, 0)
        with pytest.raises(RuntimeError):  # and the handle itself ends once
            d.settle(a, 10, 15, 25_000)
    finally:
        d.close()
        _drop(redis_url, d.adm.prefix)


# =================================================================================================
# Leases: a dead instance's holds lapse
# =================================================================================================

def test_a_dead_instances_holds_lapse_within_the_lease(redis_url):
    prefix = _prefix()
    lease = 1.5
    a = Driver("redis", redis_url, prefix, lease_s=lease)
    b = Driver("redis", redis_url, prefix, lease_s=lease)
    a.mark_ready()
    limits = {"max_concurrent_requests": 1, "tokens_per_day": 100}
    kw = dict(user_id="u1", model="m1", user_limits=limits, model_limits={}, prompt_tokens=10, completion_tokens=20,
              completion_is_default=False, min_completion_tokens=16, price=PRICE)
    try:
        held = a.reserve(**kw)
        assert not isinstance(held, Refusal)
        # Instance a dies: its renewal stops, nothing is settled or voided.
        a.adm._task.cancel()
        assert isinstance(b.reserve(**kw), Refusal)  # held: b must not admit a second one
        died = time.monotonic()
        lapsed = None
        while time.monotonic() - died < lease * 4 / 3 + 2:  # the bound (DESIGN), plus scheduling slack
            b.run(b.adm.renew())  # b's renewal (every lease/3 in a running proxy) lapses what a held
            admitted = b.reserve(**kw)
            if not isinstance(admitted, Refusal):
                lapsed = time.monotonic() - died
                break
            time.sleep(0.1)
        assert lapsed is not None, "the dead instance's hold never lapsed"
        conc, tokens = b.status("u1", "*", limits)
        assert (conc.used, tokens.reserved) == (1, 30)  # only b's hold now
        # a was only stalled after all: its late settle still bills what was used, once.
        a.settle(held, 10, 5, 15_000)
        conc, tokens = b.status("u1", "*", limits)
        assert (tokens.used, tokens.reserved) == (15, 30)
    finally:
        a.close()
        b.close()
        _drop(redis_url, prefix)


# =================================================================================================
# Redis lost its counters: rebuilt from the ledger before anyone is admitted again
# =================================================================================================

def test_counters_are_rebuilt_from_the_ledger_after_redis_loses_them(world, redis_url):
    adm = world.ctx.meter.admission
    key = world.new_user("alice", limits={"total_tokens": 200, "requests_per_minute": 5,
                                          "models": {"llama3.2:1b": {"tokens_per_day": 1000}}})
    c = world.client(key)
    for _ in range(3):
        c.chat.completions.create(model="llama3.2:1b", messages=MSG, max_tokens=20)
    world.settle_all()
    [(billed, one)] = world.rows("SELECT SUM(prompt_tokens + completion_tokens), MAX(prompt_tokens + completion_tokens)"
                                 " FROM requests WHERE status='settled'")
    assert 3 * one == billed and 3 * one + 46 <= 200 < 4 * one + 46  # reserved: 26 prompt + 20
    def shown():
        return [(x["name"], x["used"], x["reserved"]) for x in world.get("/v1/limits", key).json()["limits"]]

    before = shown()
    assert [used for _, used, _ in before] == [billed, 3, billed]
    rebuilds = adm.rebuilds

    _drop(redis_url, adm.prefix)  # what an empty restart leaves: nothing under our prefix
    assert shown() == before  # rebuilt from the ledger on first read
    assert adm.rebuilds == rebuilds + 1
    c.chat.completions.create(model="llama3.2:1b", messages=MSG, max_tokens=20)  # the fourth fits, the fifth not
    with pytest.raises(openai.RateLimitError) as e:
        c.chat.completions.create(model="llama3.2:1b", messages=MSG, max_tokens=20)
    assert "total_tokens" in e.value.message

    # Redis restarted from a snapshot (its run id changed): the renewal notices and rebuilds.
    r = redis.Redis.from_url(redis_url)
    r.hset(adm.prefix + "ready", "run_id", "an-earlier-redis")
    r.set(f"{adm.prefix}b:total:5:alice:*", struct.pack("<6d", 0, 0, 0, 0, 0, 0))  # the snapshot's stale counter
    r.close()
    world.call(adm.renew())
    world.settle_all()
    status = {x["name"]: x for x in world.get("/v1/limits", key).json()["limits"]}
    assert status["total_tokens"]["used"] == 4 * one
    assert adm.rebuilds == rebuilds + 2


def test_counters_left_in_an_older_layout_are_rebuilt_in_this_one(world, redis_url):
    """An upgraded proxyd finds counters written by an older one (the marker has no layout, a bucket is a
    hash): it does not read them as its own (WRONGTYPE, or wrong numbers) but rebuilds from the ledger."""
    adm = world.ctx.meter.admission
    key = world.new_user("olga", limits={"total_tokens": 10**6})
    c = world.client(key)
    c.chat.completions.create(model="llama3.2:1b", messages=MSG, max_tokens=20)
    world.settle_all()
    [(billed,)] = world.rows("SELECT SUM(prompt_tokens + completion_tokens) FROM requests WHERE status='settled'")
    r = redis.Redis.from_url(redis_url)
    r.hdel(adm.prefix + "ready", "layout")  # the older proxyd's marker
    bucket = f"{adm.prefix}b:total:4:olga:*"
    assert r.exists(bucket)
    r.delete(bucket)
    r.hset(bucket, mapping={"r0": 1, "r1": billed, "r2": 0})  # the older layout: a hash
    r.close()
    rebuilds = adm.rebuilds
    assert world.admin("GET", "/healthz").status_code == 503  # not ready until rebuilt
    c.chat.completions.create(model="llama3.2:1b", messages=MSG, max_tokens=20)
    assert adm.rebuilds == rebuilds + 1
    world.settle_all()
    [(billed,)] = world.rows("SELECT SUM(prompt_tokens + completion_tokens) FROM requests WHERE status='settled'")
    status = {x["name"]: x for x in world.get("/v1/limits", key).json()["limits"]}
    assert status["total_tokens"]["used"] == billed and status["total_tokens"]["reserved"] == 0


def test_only_one_instance_rebuilds(make_world, redis_url):
    prefix = _prefix()
    worlds = [make_world(prefix=prefix) for _ in range(3)]
    _drop(redis_url, prefix)
    keys = [w.new_user("bob") for w in worlds]

    async def all_at_once():
        clients = [w.async_client(k) for w, k in zip(worlds, keys)]
        await asyncio.gather(*[cl.chat.completions.create(model="llama3.2:1b", messages=MSG, max_tokens=5)
                               for cl in clients for _ in range(4)])
        for cl in clients:
            await cl.close()

    asyncio.run(all_at_once())
    assert sum(w.ctx.meter.admission.rebuilds for w in worlds) == 1


# =================================================================================================
# Redis unreachable: fail closed (503, Retry-After, the API's envelope), then recover by itself
# =================================================================================================

class Gate:
    """A TCP relay to Redis that a test can close (every connection cut, none accepted) and reopen."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.server = None
        self.port = 0
        self.conns: set = set()
        self.muted = False
        self.open()

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    async def _pipe(self, reader, writer, replies: bool = False):
        try:
            while data := await reader.read(65536):
                if replies and self.muted:  # Redis ran the command; its answer is lost on the way
                    continue
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _serve(self, reader, writer):
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.conns.update((writer, up_w))
        await asyncio.gather(self._pipe(reader, up_w), self._pipe(up_r, writer, replies=True))

    def open(self) -> None:
        async def start():
            self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, reuse_address=True)
            self.port = self.server.sockets[0].getsockname()[1]
        self._call(start())

    def close(self) -> None:
        async def stop():
            self.server.close()
            for w in self.conns:
                w.transport.abort()
            self.conns.clear()
            await self.server.wait_closed()
        self._call(stop())

    def stop(self) -> None:
        async def end():
            if self.server.is_serving():
                self.server.close()
            for w in self.conns:
                w.transport.abort()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        self._call(end())
        self.loop.call_soon_threadsafe(self.loop.stop)


def test_redis_unreachable_is_a_503_with_retry_after_and_recovers(make_world, redis_url):
    from urllib.parse import urlsplit

    gate = Gate(urlsplit(redis_url).port or 6379)
    try:
        world = make_world(config={"admission.url": f"redis://127.0.0.1:{gate.port}/0"})
        key = world.new_user("carol", limits={"total_tokens": 10_000})
        c = world.client(key)
        c.chat.completions.create(model="llama3.2:1b", messages=MSG, max_tokens=5)
        gate.close()
        with pytest.raises(openai.InternalServerError) as e:
            c.chat.completions.create(model="llama3.2:1b", messages=MSG, max_tokens=5)
        assert e.value.status_code == 503, e.value
        assert e.value.body["code"] == "service_unavailable" and "limits service" in e.value.message, e.value.body
        assert int(e.value.response.headers["retry-after"]) >= 1
        r = world.get("/v1/limits", key)
        assert r.status_code == 503 and r.json()["error"]["code"] == "service_unavailable", r.text
        assert world.rows("SELECT COUNT(*) FROM requests")[0][0] == 1  # the refused one never reached the ledger
        gate.open()  # back on the same port: the client reconnects by itself
        deadline = time.monotonic() + 10
        while True:
            try:
                c.chat.completions.create(model="llama3.2:1b", messages=MSG, max_tokens=5)
                break
            except openai.InternalServerError:
                assert time.monotonic() < deadline, "no recovery after Redis came back"
                time.sleep(0.2)
        world.settle_all()
        status = {x["name"]: x for x in world.get("/v1/limits", key).json()["limits"]}
        [(billed,)] = world.rows("SELECT SUM(prompt_tokens + completion_tokens) FROM requests WHERE status='settled'")
        assert status["total_tokens"]["used"] == billed and status["total_tokens"]["reserved"] == 0
    finally:
        gate.stop()


# =================================================================================================
# Three instances on one Redis: limits hold across them
# =================================================================================================

def _three(make_world, dsn: str, limits: dict, **kw) -> tuple[list[Harness], str]:
    """Three proxies on one key prefix and one PostgreSQL ledger (users and keys shared), one upstream."""
    prefix = _prefix()
    pg = {"database.backend": "postgres", "database.dsn": dsn}
    first = make_world(prefix=prefix, config=pg, **kw)
    key = first.new_user("dana", limits=limits)
    others = [make_world(prefix=prefix, config=pg, upstream_url=first.upstream_url) for _ in (1, 2)]
    return [first, *others], key  # the others loaded the user and key at start


def _spread(worlds: list[Harness], key: str, n: int, concurrency: int, **create) -> tuple[int, list]:
    async def run():
        clients = [w.async_client(key) for w in worlds]
        gate = asyncio.Semaphore(concurrency)
        refusals = []
        ok = 0

        async def one(i):
            nonlocal ok
            async with gate:
                try:
                    r = await clients[i % len(clients)].chat.completions.create(model="llama3.2:1b", **create)
                    if create.get("stream"):
                        async for _ in r:
                            pass
                    ok += 1
                except openai.RateLimitError as e:
                    refusals.append(e)

        await asyncio.gather(*[one(i) for i in range(n)])
        for cl in clients:
            await cl.close()
        return ok, refusals

    return asyncio.run(run())


def _billed(worlds) -> tuple[int, int, int]:
    """(requests, tokens, max tokens of one) settled in the ledger all three write."""
    for w in worlds:
        w.settle_all()
    [(n, tokens, most)] = worlds[0].rows("SELECT COUNT(*), SUM(prompt_tokens + completion_tokens),"
                                         " MAX(prompt_tokens + completion_tokens) FROM requests WHERE status='settled'")
    return n, tokens or 0, most or 0


@pytest.mark.parametrize("limit", ["total_tokens", "tokens_per_minute"])
def test_three_instances_never_bill_past_a_shared_token_limit(pg_dsn, make_world, limit):
    worlds, key = _three(make_world, pg_dsn, {limit: 1000}, emulator={"token_delay_s": 0.002})
    msgs = [{"role": "user", "content": "[[emu:reply_tokens=50]] Hi"}]  # runs into max_tokens: billed = reserved
    ok, refusals = _spread(worlds, key, 120, 40, messages=msgs, max_tokens=20)
    count, billed, per_request = _billed(worlds)
    assert billed <= 1000
    # Each instance got 40 of the requests: enforced per instance, the limit would have billed up to 3x.
    assert count == ok == 1000 // per_request and len(refusals) == 120 - ok


def test_three_instances_keep_a_limit_when_redis_loses_everything_mid_run(pg_dsn, make_world, redis_url):
    """120 requests at 10-way concurrency over three instances against a total-token limit that admits about
    half of them; early on Redis loses every key of the deployment (an empty restart): one instance
    rebuilds from the ledger, all re-enter what they have in flight, and the total still bills no more
    than the limit, admitting as many as fit."""
    worlds, key = _three(make_world, pg_dsn, {"total_tokens": 3000}, emulator={"token_delay_s": 0.01})
    for w in worlds:
        w.ctx.meter.admission.settle_grace_s = 1.0  # the real grace: ledger commits in progress land first
    prefix = worlds[0].ctx.meter.admission.prefix
    msgs = [{"role": "user", "content": "[[emu:reply_tokens=50]] Hi"}]
    flushed = threading.Event()

    def flush_when_busy():
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if worlds[0].rows("SELECT COUNT(*) FROM requests WHERE status='settled'")[0][0] >= 8:
                _drop(redis_url, prefix)
                flushed.set()
                return
            time.sleep(0.01)

    t = threading.Thread(target=flush_when_busy)
    t.start()
    ok, refusals = _spread(worlds, key, 120, 10, messages=msgs, max_tokens=20, stream=True)
    t.join()
    assert flushed.is_set()
    count, billed, per_request = _billed(worlds)
    # The first start's and the one after the loss (one more if a loaded test process kept an instance from
    # renewing within the 1.5 s lease: its peers then rebuild too).
    assert sum(w.ctx.meter.admission.rebuilds for w in worlds) >= 2
    assert billed <= 3000, (billed, count)
    assert count == ok and ok >= 3000 // per_request - 2 and count >= 16, (count, ok, per_request)


def test_three_instances_share_a_concurrency_limit(pg_dsn, make_world):
    worlds, key = _three(make_world, pg_dsn, {"max_concurrent_requests": 3}, emulator={"token_delay_s": 0.01})
    msgs = [{"role": "user", "content": "[[emu:reply_tokens=30]] Hi"}]
    ok, refusals = _spread(worlds, key, 120, 40, messages=msgs, max_tokens=30, stream=True)
    emu = worlds[0].emu  # the one upstream all three forward to
    assert emu.max_active_streams == 3, emu.max_active_streams  # reached, never passed
    assert ok + len(refusals) == 120 and ok >= 3
    assert all("max_concurrent_requests" in e.message for e in refusals)
    count, _, _ = _billed(worlds)
    assert count == ok
    for w in worlds:
        assert w.ctx.meter.admission.pending == 0


# =================================================================================================
# kill -9 of one of two proxyd processes (Redis + PostgreSQL) under load
# =================================================================================================

def _start_instance(tmp_path, dsn: str, redis_url: str, prefix: str, upstream: str, port: int, *args: str):
    import os
    import subprocess
    import sys

    from tests.test_process import ADMIN, ROOT, wait_http

    cfg = tmp_path / f"instance-{port}.yaml"
    cfg.write_text("logging:\n  access_log: false\n"
                   f"database:\n  backend: postgres\n  dsn: {dsn}\n  pending_row_after_s: 0\n  instance_stale_s: 1.5\n"
                   f"admission:\n  backend: redis\n  url: {redis_url}\n  key_prefix: '{prefix}'\n  lease_s: 1.5\n")
    env = {**os.environ, "PROXYD_PORT": str(port), "PROXYD_UPSTREAM": upstream, "PROXYD_ADMIN_TOKEN": ADMIN,
           "PROXYD_CONFIG": str(cfg)}
    proc = subprocess.Popen([sys.executable, "app.py", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    wait_http(f"http://127.0.0.1:{port}/healthz", proc)
    return proc


def test_kill_9_under_load_holds_lapse_and_counters_agree_with_the_ledger(tmp_path, emulator, pg_dsn, redis_url):
    """Every request the killed instance answered is in the ledger; its reservations lapse within the
    lease (and the survivor rebuilds from the ledger); afterwards /v1/limits and /v1/usage agree with
    the ledger."""
    import httpx

    from tests.test_postgres import fetch
    from tests.test_postgres_process import kill_under_load
    from tests.test_process import ADMIN, free_port

    prefix = _prefix()
    pa, pb = free_port(), free_port()
    procs = []
    try:
        for port in (pa, pb):
            procs.append(_start_instance(tmp_path, pg_dsn, redis_url, prefix, emulator, port))
        a, b = procs
        r = httpx.post(f"http://127.0.0.1:{pa}/admin/users", headers={"Authorization": f"Bearer {ADMIN}"},
                       json={"user_id": "alice", "limits": {"tokens_per_day": 10**9, "max_concurrent_requests": 50}})
        assert r.status_code == 201, r.text
        key = r.json()["api_key"]
        time.sleep(0.3)  # b hears of the key (LISTEN/NOTIFY)
        killed = kill_under_load([f"http://127.0.0.1:{pa}", f"http://127.0.0.1:{pb}"], key, a, pg_dsn, threads=8)

        def limits() -> dict:
            r = httpx.get(f"http://127.0.0.1:{pb}/v1/limits", headers={"Authorization": f"Bearer {key}"}, timeout=15)
            return {x["name"]: x for x in r.json()["limits"]}

        while True:  # a's reservations lapse: nothing reserved, nothing in flight once b is idle
            now = limits()
            if now["tokens_per_day"]["reserved"] == 0 and now["max_concurrent_requests"]["used"] == 0:
                break
            assert time.monotonic() - killed < 1.5 + 1.0 + 3.0, f"a's holds still held: {now}"  # lease + renewal + slack
            time.sleep(0.2)
        [(settled, tokens)] = fetch(pg_dsn, "SELECT COUNT(*), SUM(prompt_tokens + completion_tokens) FROM requests"
                                            " WHERE status = 'settled'")
        assert limits()["tokens_per_day"]["used"] == tokens
        usage = httpx.get(f"http://127.0.0.1:{pb}/v1/usage", headers={"Authorization": f"Bearer {key}"}).json()
        assert usage["totals"]["requests"] == settled
        assert usage["totals"]["prompt_tokens"] + usage["totals"]["completion_tokens"] == tokens
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(15)
        _drop(redis_url, prefix)


def test_workers_share_their_limits_through_redis(tmp_path, emulator, pg_dsn, redis_url):
    """app.py --workers 2 on Redis + PostgreSQL starts (no refusal to lift) and its processes share one
    concurrency limit: with two streams open, every further request is refused, whichever worker takes it."""
    import signal

    import httpx

    from tests.test_process import ADMIN, free_port

    prefix = _prefix()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = _start_instance(tmp_path, pg_dsn, redis_url, prefix, emulator, port, "--workers", "2")
    try:
        r = httpx.post(base + "/admin/users", headers={"Authorization": f"Bearer {ADMIN}"},
                       json={"user_id": "erin", "limits": {"max_concurrent_requests": 2}})
        assert r.status_code == 201, r.text
        auth = {"Authorization": f"Bearer {r.json()['api_key']}"}
        time.sleep(0.5)  # the other worker hears of the key (LISTEN/NOTIFY)
        long = {"model": "llama3.2:1b", "stream": True,
                "messages": [{"role": "user", "content": "[[emu:reply_tokens=150]] go"}]}  # 3 s at 20 ms a token
        with httpx.Client(timeout=30) as c1, httpx.Client(timeout=30) as c2:
            with c1.stream("POST", base + "/v1/chat/completions", json=long, headers=auth) as s1, \
                    c2.stream("POST", base + "/v1/chat/completions", json=long, headers=auth) as s2:
                assert (s1.status_code, s2.status_code) == (200, 200)
                refused = []
                for _ in range(8):  # a new connection each: the kernel spreads them over both workers
                    r = httpx.post(base + "/v1/chat/completions", headers=auth, timeout=10,
                                   json={"model": "llama3.2:1b", "messages": MSG, "max_tokens": 3})
                    refused.append(r.status_code == 429 and "max_concurrent_requests" in r.text)
                assert all(refused), refused
        # Both streams closed: the room is back (a worker's settle or void, seen by every worker).
        deadline = time.monotonic() + 10
        while httpx.post(base + "/v1/chat/completions", headers=auth, timeout=10,
                         json={"model": "llama3.2:1b", "messages": MSG, "max_tokens": 3}).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        _drop(redis_url, prefix)


def test_a_reserve_whose_answer_was_lost_is_voided_once_redis_answers(make_world, redis_url):
    """The script ran (the hold exists in Redis) but its answer never came back: the client gets its 503,
    and the hold is voided later instead of being renewed for ever by an instance that does not know it."""
    from urllib.parse import urlsplit

    gate = Gate(urlsplit(redis_url).port or 6379)
    try:
        world = make_world(config={"admission.url": f"redis://127.0.0.1:{gate.port}/0"})
        key = world.new_user("fay", limits={"total_tokens": 10_000})
        c = world.client(key)
        c.chat.completions.create(model="llama3.2:1b", messages=MSG, max_tokens=5)
        world.settle_all()
        gate.muted = True
        with pytest.raises(openai.InternalServerError) as e:  # no answer: the watchdog drops the connection
            c.chat.completions.create(model="llama3.2:1b", messages=MSG, max_tokens=5)
        assert e.value.status_code == 503
        r = redis.Redis.from_url(redis_url)
        holds = [k for k in r.scan_iter(world.ctx.meter.admission.prefix + "h:*") if r.hget(k, "s") == b"p"]
        assert len(holds) == 1  # reserved in Redis, unknown to the instance
        gate.muted = False
        deadline = time.monotonic() + 10
        while r.hget(holds[0], "s") == b"p":  # the renewal sends the queued void once Redis answers
            assert time.monotonic() < deadline, "the lost hold was never voided"
            time.sleep(0.1)
        r.close()
        [status] = [x for x in world.get("/v1/limits", key).json()["limits"] if x["name"] == "total_tokens"]
        assert status["reserved"] == 0
    finally:
        gate.stop()
