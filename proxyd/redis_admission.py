"""The shared admission: the Admission port (proxyd/admission.py) over Redis, for several proxyd processes.

The same limits, arithmetic and refusals as the in-memory ``Limiter`` (proxyd/limits.py), kept in Redis
by one Lua script (proxyd/redis_admission.lua) so that each operation is atomic and on Redis's clock:

- ``reserve``: every limit of the request (both scopes, every window, concurrency) checked and reserved
  in one round trip, or none; a refusal comes back with what refused and the checks as they stood.
- ``settle`` / ``void``: keyed by the hold's id and idempotent (a retry applies once). One that cannot
  reach Redis is kept and retried by the instance's renewal task: the ledger is not held up by Redis.
- Leases: holds belong to an instance, whose one lease the renewal task extends every second (or
  ``lease_s / 3``) for all its holds at once; a renewal also lapses the holds of instances whose lease
  ran out (a dead instance's holds are released within ``lease_s`` plus one renewal interval).
- Rebuild: the script refuses to work while the ``ready`` marker is missing (Redis restarted empty,
  flushed, or restarted from a snapshot: its run id changed). One instance (a lock taken with SET NX)
  then waits for ledger commits in progress, rebuilds the counters from the ledger (the source of
  truth), and sets the marker with a short recovery window during which every instance re-enters its
  running holds before anyone is admitted again.
- Redis unreachable: reserve fails closed (503 with Retry-After); the client reconnects by itself.

docs/DESIGN.md ("Redis admission") argues the exactness and goes through each failure.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import itertools
import logging
import os
import re
import struct
import time
import uuid
from typing import Any

import hiredis

from .admission import Check, OpenRequests, Refusal
from .errors import ServiceUnavailable
from .limits import refusal
from .limitspec import LIMIT_FIELDS, Limits, Metric, Window
from .periods import calendar_of, day_key, month_key

log = logging.getLogger("proxyd.admission")
_REPLY_ERROR = hiredis.ReplyError

REQUESTS, TOKENS, COST = Metric.REQUESTS, Metric.TOKENS, Metric.COST
MINUTE, CONCURRENT, DAY, MONTH = Window.MINUTE, Window.CONCURRENT, Window.DAY, Window.MONTH
_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "redis_admission.lua")
RETRY_AFTER_S = 2  # what a client is told to wait when Redis cannot be reached
READY_WAIT_S = 10.0  # longest a request waits for a rebuild (another instance's, or this one's) before a 503
SETTLE_GRACE_S = 1.0  # a rebuild waits this long for ledger commits of settles Redis already took (DESIGN)


class RedisHold:
    """A reservation in Redis, as the rest of proxyd sees it (the Reservation protocol) plus what settle,
    void and a re-adoption need."""

    __slots__ = ("rid", "user_id", "model", "prompt_tokens", "completion_tokens", "cost_nusd", "admitted_at",
                 "checks", "day", "month", "epoch", "state")

    def __init__(self, rid, user_id, model, prompt_tokens, completion_tokens, cost_nusd, admitted_at, checks, day,
                 month, epoch) -> None:
        self.rid = rid
        self.user_id = user_id
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens
        self.cost_nusd = cost_nusd
        self.admitted_at = admitted_at
        self.checks = checks
        self.day = day
        self.month = month
        self.epoch = epoch
        self.state = "pending"

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def _unavailable(detail: str) -> ServiceUnavailable:
    return ServiceUnavailable(
        "The limits service is unreachable; no request is admitted until it is back. Try again shortly.",
        headers={"Retry-After": str(RETRY_AFTER_S)}, detail=detail)


class _AnswerLost(ConnectionError):
    """The command was sent but its answer never came (the connection dropped): it may have run."""


class _Pipe(asyncio.Protocol):
    """One connection to Redis on which script calls are pipelined: each call writes its command and waits
    for its reply, replies come in order. The request path's round trips go here rather than through
    redis-py's command machinery (its pool, retries, encoders: ~800 Python calls per reserve + settle,
    against ~200 here); hiredis parses the replies. redis-py still does the rest (INFO, SCAN, the rebuild)."""

    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.waiting: collections.deque = collections.deque()  # (future, sent at), oldest first
        self.transport: asyncio.Transport | None = None
        self.lost: BaseException | None = None
        self.outbox: list[bytes] = []  # commands of this loop iteration, written together at its end

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        waiting = self.waiting
        while True:
            reply = self.reader.gets()
            if reply is False:
                return
            fut = waiting.popleft()[0]
            if not fut.done():
                fut.set_result(reply)

    def connection_lost(self, exc) -> None:
        self.lost = ConnectionError(f"connection to Redis lost ({exc!r})")
        while self.waiting:
            fut = self.waiting.popleft()[0]
            if not fut.done():
                fut.set_exception(self.lost)

    def call(self, packed: bytes) -> asyncio.Future:
        if self.lost is not None:
            raise self.lost
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.waiting.append((fut, time.monotonic()))
        # Under load several requests reach Redis in one loop iteration: one write for all of them is one
        # send here and one read on Redis's side, and Redis answers them in one write (fewer syscalls on
        # both, and Redis's CPU is shared with the proxy's on one machine). Replies keep the order.
        if not self.outbox:
            loop.call_soon(self._flush)
        self.outbox.append(packed)
        return fut

    def _flush(self) -> None:
        out, self.outbox = self.outbox, []
        if self.lost is None and self.transport is not None:
            self.transport.write(b"".join(out) if len(out) > 1 else out[0])

    def stalled(self, timeout: float) -> bool:
        return bool(self.waiting) and time.monotonic() - self.waiting[0][1] > timeout


def _bulks(args: list) -> list[bytes]:
    """RESP bulk strings of a command's arguments (comprehensions: no Python frame per argument)."""
    enc = [a if type(a) is bytes else str(a).encode() for a in args]
    return [b"$%d\r\n%s\r\n" % (len(e), e) for e in enc]


class RedisAdmission:
    def __init__(self, url: str, *, ledger: Any, connections_per_key: int, key_prefix: str = "proxyd:",
                 lease_s: float = 15.0, socket_timeout_s: float = 2.0, settle_grace_s: float = SETTLE_GRACE_S) -> None:
        import redis.asyncio as aioredis  # only when configured

        # redis-py for what is not on the request path (INFO, SCAN, the rebuild's pipeline); see _Pipe.
        self.redis = aioredis.Redis.from_url(
            url, socket_timeout=socket_timeout_s, socket_connect_timeout=socket_timeout_s,
            health_check_interval=30, retry_on_timeout=False)
        self.errors = (aioredis.ConnectionError, aioredis.TimeoutError, OSError)
        with open(_SCRIPT, encoding="utf-8") as fh:
            self.script_text = fh.read()
        self.sha = hashlib.sha1(self.script_text.encode()).hexdigest()
        self.layout = re.search(r"^local LAYOUT = '(\w+)'", self.script_text, re.M).group(1)
        self._head = b"".join(_bulks(["EVALSHA", self.sha, 0]))  # every call: EVALSHA <sha> 0 <args>
        self._pipe: _Pipe | None = None
        self._connecting: asyncio.Future | None = None
        self.socket_timeout_s = socket_timeout_s
        self.url = url
        self.ledger = ledger
        self.prefix = key_prefix
        self.lease_s = lease_s
        self.lease_us = int(lease_s * 1_000_000)
        # Renewals are one small script call per instance, whatever its holds: every second (or lease_s / 3
        # if shorter), so that a rebuild's recovery window, which must see every instance renew, stays short.
        self.renew_every = min(lease_s / 3, 1.0)
        self.recover_us = int((self.renew_every + 0.5) * 1_000_000)  # every live instance renews (re-adopts) in it
        self.settle_grace_s = settle_grace_s
        self.instance = uuid.uuid4().hex[:16]
        self._ids = itertools.count()
        self.open_requests = OpenRequests(connections_per_key)
        self.live: dict[str, RedisHold] = {}  # this instance's pending holds, by id (renewed, re-adopted)
        self.unsent: dict[str, tuple] = {}  # settles/voids Redis did not take yet: retried by the renewal task
        self.epoch = ""  # the counters' generation this instance last saw
        self._task: asyncio.Task | None = None
        self._ready_lock: asyncio.Lock | None = None
        self.clock = time.time  # the port's clock (refusal texts, x-ratelimit resets); limits use Redis's TIME
        self.rebuilds = 0  # this instance's, for tests and logs
        self._packed: dict[tuple[int, int], tuple] = {}  # see _limit_args

    # -- the port ----------------------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        return len(self.live)

    async def reserve(self, *, user_id: str, model: str, user_limits: Limits, model_limits: Limits,
                      prompt_tokens: int, completion_tokens: int, completion_is_default: bool,
                      min_completion_tokens: int, price: tuple[int, int]) -> RedisHold | Refusal:
        if self._task is None:
            self._start()
        rid = f"{self.instance}.{next(self._ids)}"
        specs, packed = self._limit_args(user_limits, model_limits)
        ih, il = divmod(price[0], 1_000_000)
        oh, ol = divmod(price[1], 1_000_000)
        try:
            r = (await self._run(["reserve", self.prefix, rid, self.instance, self.lease_us, user_id, model,
                                  prompt_tokens, completion_tokens, 1 if completion_is_default else 0,
                                  min_completion_tokens, ih, il, oh, ol, packed], wait_ready=True))
        except ServiceUnavailable as exc:
            if getattr(exc, "maybe_applied", False):
                # The script may have run and only its answer been lost: void that hold if it exists (the
                # renewal sends it once Redis answers), or this instance would renew it for ever.
                self.unsent[rid] = ("void", "")
            raise
        # r: 1, completion tokens, nano-USD, Redis's time (us), day, month, ends of both, epoch, the checks;
        # or 0, the refusing check, need, when it frees (us), budget?, the same head and checks.
        if r[0] == 1:
            hold = RedisHold(rid, user_id, model, prompt_tokens, r[1], r[2], r[3] / 1e6,
                             self._checks(specs, model, r, 9), r[4].decode(), r[5].decode(), r[8].decode())
            self.live[rid] = hold
            return hold
        checks = self._checks(specs, model, r, 11)
        return _refusal(checks[r[1] - 1], r[5] / 1e6, r[2], r[3] / 1e6, checks, r[4] == 1)

    async def settle(self, hold: RedisHold, prompt_tokens: int, completion_tokens: int, cost_nusd: int) -> None:
        self._end(hold, "settled")
        await self._post(hold.rid, ("settle", hold.epoch, prompt_tokens + completion_tokens, cost_nusd, hold.user_id,
                                    hold.model, hold.day, hold.month))

    async def void(self, hold: RedisHold) -> None:
        self._end(hold, "voided")
        await self._post(hold.rid, ("void", hold.epoch))

    async def status(self, user_id: str, scope: str, limits: Limits, now: float) -> list[Check]:
        """The limits of one scope as Redis holds them (``/v1/limits``); ``now`` is Redis's, not ours."""
        model = "*" if scope == "*" else scope
        specs, packed = self._limit_args(limits if scope == "*" else {}, {} if scope == "*" else limits)
        argv = ["status", self.prefix, "", self.instance, self.lease_us, user_id, model, 0, 0, 0, 0, 0, 0, 0, 0, packed]
        return self._checks(specs, model, await self._run(argv, wait_ready=True), 7)

    async def health(self) -> tuple[bool, str]:
        """Whether requests can be admitted now (/healthz); starts the renewal, which rebuilds if need be."""
        if self._task is None:
            self._start()
        try:
            epoch, at, layout = await self.redis.hmget(self.prefix + "ready", "epoch", "at", "layout")
            sec, usec = await self.redis.time()
        except self.errors as exc:
            return False, f"Redis unreachable ({type(exc).__name__})"
        if epoch is None or _s(layout or b"") != self.layout:
            return False, "the counters are being rebuilt from the ledger"
        if int(at) > sec * 1_000_000 + usec:
            return False, "recovering after a rebuild: running requests are being re-entered"
        return True, "ready"

    async def close(self) -> None:
        """Stops renewing (the holds lapse if any are left) after one last try at the unsent settles.
        Bounded: with the renewal stopped nothing else notices a reply Redis never sends, and a shutdown
        must not wait for one (the holds lapse by themselves)."""
        try:
            await asyncio.wait_for(self._close(), self.socket_timeout_s * 2)
        except asyncio.TimeoutError:
            log.warning("redis admission: close did not finish in %gs; holds left will lapse", self.socket_timeout_s * 2)
            if self._pipe is not None and self._pipe.transport is not None:
                self._pipe.transport.abort()

    async def _close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None
        try:
            await self._flush_unsent()
            if not self.live:  # stopped cleanly: not to be taken for dead (which would rebuild the counters)
                await self.script(args=["leave", self.prefix, self.instance])
        except self.errors:
            pass
        if self._pipe is not None and self._pipe.transport is not None:
            self._pipe.transport.close()
        await self.redis.aclose()

    # -- the script --------------------------------------------------------------------------------------

    async def script(self, args: list) -> Any:
        """One call of the script on the pipelined connection (connected, or reconnected, on demand)."""
        pipe = self._pipe
        if pipe is None or pipe.lost is not None:
            pipe = await self._connect()
        packed = b"".join([b"*%d\r\n" % (len(args) + 3), self._head, *_bulks(args)])
        fut = pipe.call(packed)
        try:
            reply = await fut
        except ConnectionError as exc:
            raise _AnswerLost(str(exc)) from None
        if type(reply) is _REPLY_ERROR:
            if str(reply).startswith("NOSCRIPT"):  # a restarted (or flushed) Redis forgot the script
                await self.redis.script_load(self.script_text)
                reply = await pipe.call(packed)
            if type(reply) is _REPLY_ERROR:
                raise RuntimeError(f"admission script failed: {reply}")
        return reply

    async def _connect(self) -> _Pipe:
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open())
        try:
            return await asyncio.shield(self._connecting)
        finally:
            if self._connecting is not None and self._connecting.done():
                self._connecting = None

    async def _open(self) -> _Pipe:
        kw = self.redis.connection_pool.connection_kwargs
        loop = asyncio.get_running_loop()
        pipe = _Pipe()
        if "path" in kw:
            connect = loop.create_unix_connection(lambda: pipe, kw["path"])
        else:
            connect = loop.create_connection(lambda: pipe, kw.get("host", "127.0.0.1"), kw.get("port", 6379),
                                             ssl=True if self.url.startswith("rediss://") else None)
        await asyncio.wait_for(connect, self.socket_timeout_s)
        setup = []
        if kw.get("password"):
            setup.append(["AUTH", *([kw["username"]] if kw.get("username") else []), kw["password"]])
        if kw.get("db"):
            setup.append(["SELECT", kw["db"]])
        for cmd in setup:
            reply = await asyncio.wait_for(pipe.call(b"".join([b"*%d\r\n" % len(cmd), *_bulks(cmd)])),
                                           self.socket_timeout_s)
            if type(reply) is _REPLY_ERROR:
                pipe.transport.close()
                raise ConnectionError(f"Redis refused {cmd[0]}: {reply}")
        if self._pipe is not None and self._pipe.transport is not None:
            self._pipe.transport.abort()
        self._pipe = pipe
        return pipe

    async def _run(self, argv: list, *, wait_ready: bool) -> Any:
        """Runs the script; waits out a rebuild (or runs it) when the counters are not ready. Redis
        unreachable, or not ready within READY_WAIT_S: ServiceUnavailable (fail closed)."""
        deadline = time.monotonic() + READY_WAIT_S
        while True:
            try:
                r = await self.script(args=argv)
            except self.errors as exc:
                err = _unavailable(f"redis {self.url}: {exc!r}")
                err.maybe_applied = isinstance(exc, _AnswerLost)  # sent: the script may have run
                raise err from None
            if not wait_ready or r[0] >= 0:  # the answer; -1 not ready, -2 recovering
                return r
            if time.monotonic() > deadline:
                raise _unavailable("the admission counters are being rebuilt")
            if r[0] == -1:
                await self._ensure_ready()
            else:  # recovering: every instance re-enters its running holds before admissions resume
                await asyncio.sleep(min(int(r[1]) / 1e6, 1.0))

    def _limit_args(self, user_limits: Limits, model_limits: Limits) -> tuple[list, bytes]:
        """The limits as the script takes them (one packed argument: scope, metric, window code, limit as
        a double, per limit), and what the checks it answers are. Cached
        by the limits' identity: the meter hands the same dicts until the admin API replaces them."""
        key = (id(user_limits), id(model_limits))
        hit = self._packed.get(key)
        if hit is not None and hit[0] is user_limits and hit[1] is model_limits:
            return hit[2], hit[3]
        specs, parts = [], []
        for flag, limits in ((0, user_limits), (1, model_limits)):
            for name, value in limits.items():
                if value is None or name == "models":
                    continue
                metric, window = LIMIT_FIELDS[name]
                specs.append((flag, name, value, metric, window))
                parts.append(struct.pack("<BBBd", flag, int(metric), _WINDOW_CODE[window], value))
        packed = b"".join(parts)
        if len(self._packed) >= 10_000:  # model names come from clients: keep it bounded
            self._packed.clear()
        self._packed[key] = (user_limits, model_limits, specs, packed)  # holding them: no id is reused meanwhile
        return specs, packed

    @staticmethod
    def _checks(specs: list, model: str, r: list, at: int) -> list[Check]:
        out = []
        for flag, name, value, metric, window in specs:
            used, reserved, reset = r[at], r[at + 1], r[at + 2]  # integers in the script's answer
            at += 3
            out.append(Check(model if flag else "*", name, value, used, reserved, None if reset < 0 else reset / 1e6,
                             metric, window))
        return out

    def _end(self, hold: RedisHold, state: str) -> None:
        if hold.state != "pending":
            raise RuntimeError(f"hold already {hold.state}")
        hold.state = state
        self.live.pop(hold.rid, None)

    async def _post(self, rid: str, what: tuple) -> None:
        """A settle or void, applied once. A hold from before a rebuild that was not re-entered is posted
        as an orphan (its usage as used): its ledger row is written after this returns, so the rebuild
        did not count it; not ready, the rebuild is waited for first. Unreachable: kept for the renewal
        task, the request is not failed for it."""
        try:
            r = await self.script(args=self._post_args(rid, what, orphan=True))
            if r == -1:
                await self._ensure_ready()
                r = await self.script(args=self._post_args(rid, what, orphan=True))
            if r == -1:
                raise ConnectionError("the admission counters are not ready")
        except (*self.errors, ServiceUnavailable) as exc:
            log.warning("admission: %s of %s not applied yet (%r); retried in the background", what[0], rid, exc)
            self.unsent[rid] = what
        else:
            if r == 3:
                log.warning("admission: %s settled after its lease lapsed (was this instance stalled?)", rid)

    def _post_args(self, rid: str, what: tuple, *, orphan: bool) -> list:
        return [what[0], self.prefix, rid, what[1], 1 if orphan else 0, *what[2:]]

    async def _flush_unsent(self) -> None:
        """Retries the settles and voids Redis did not take. A retry is not posted as an orphan: if the
        counters were rebuilt meanwhile, the ledger row (written right after the failed attempt) was
        counted by the rebuild, which waited for ledger commits in progress."""
        for rid, what in list(self.unsent.items()):
            r = await self.script(args=self._post_args(rid, what, orphan=False))
            if r == -1:
                return
            del self.unsent[rid]

    # -- leases, renewal, rebuild ------------------------------------------------------------------------

    def _start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._renew_loop())

    async def _renew_loop(self) -> None:
        while True:
            pipe = self._pipe
            if pipe is not None and pipe.stalled(self.socket_timeout_s):
                # No reply within the timeout: drop the connection, failing every call waiting on it (the
                # requests get their 503); the next call connects anew. One check a second, not a timer a call.
                log.warning("admission: Redis did not answer within %.1f s: reconnecting", self.socket_timeout_s)
                pipe.transport.abort()
            try:
                # Bounded: a renewal stuck on a stalled connection must not keep the check above from running.
                await asyncio.wait_for(self.renew(), self.socket_timeout_s + 1)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis down: keep trying; reserve fails closed meanwhile
                log.warning("admission: lease renewal failed (%r)", exc)
            await asyncio.sleep(self.renew_every)

    async def renew(self) -> None:
        """One renewal: this instance's lease extended for all its holds, dead instances' holds lapsed,
        the unsent settles retried, and a lost or replaced Redis noticed (rebuild, re-adoption)."""
        run_id = (await self.redis.info("server")).get("run_id", "")
        marker = self.prefix + "ready"
        stored = await self.redis.hget(marker, "run_id")
        if stored is not None and _s(stored) != run_id:
            # Redis restarted from a snapshot: its counters are as old as the snapshot. Start over.
            log.warning("admission: Redis restarted (run id %s -> %s): rebuilding the counters", _s(stored), run_id)
            await self.redis.delete(marker)
        r = await self.script(args=["renew", self.prefix, self.instance, self.lease_us])
        epoch, fresh, lapsed, reaped = _s(r[0]), int(r[1]), int(r[2]), int(r[3])
        if not epoch:
            await self._ensure_ready()
            return
        if reaped:
            # An instance stopped renewing (killed, or cut off longer than lease_s). Its running holds were
            # released above. But it may have died between a settle Redis took and that request's ledger
            # commit: counted here, never billed. Rebuilding from the ledger (one instance, a second or two
            # of admissions waiting) makes the counters equal the ledger again.
            log.warning("admission: %d instance(s) stopped renewing (%d holds lapsed): rebuilding the counters "
                        "from the ledger", reaped, lapsed)
            await self.redis.delete(self.prefix + "ready")
            await self._ensure_ready()
            return
        if epoch != self.epoch or fresh:
            await self._adopt(epoch)
        if self.unsent:
            await self._flush_unsent()

    async def _adopt(self, epoch: str) -> None:
        """Re-enters this instance's running holds (after a rebuild, or after its lease lapsed)."""
        holds = list(self.live.values())
        args: list = []
        for h in holds:
            args += (h.rid, h.user_id, h.model, h.day, h.month, h.tokens, h.cost_nusd, int(h.admitted_at * 1e6))
        n = await self.script(args=["adopt", self.prefix, self.instance, self.lease_us, epoch, *args])
        for h in holds:
            h.epoch = epoch
        self.epoch = epoch
        if n:
            log.warning("admission: re-entered %d running holds into Redis", n)

    async def _ensure_ready(self) -> None:
        """The counters are missing: rebuild them (one instance: SET NX), or wait for whoever does."""
        if self._ready_lock is None:
            self._ready_lock = asyncio.Lock()
        async with self._ready_lock:
            lock = self.prefix + "rebuild"
            deadline = time.monotonic() + READY_WAIT_S
            while time.monotonic() < deadline:
                if await self.redis.exists(self.prefix + "ready"):
                    return
                token = f"{self.instance}.{time.time()}"
                if await self.redis.set(lock, token, nx=True, px=int((READY_WAIT_S + 20) * 1000)):
                    try:
                        await self._rebuild()
                    finally:
                        if _s(await self.redis.get(lock) or b"") == token:
                            await self.redis.delete(lock)
                    return
                await asyncio.sleep(0.05)
            raise _unavailable("the admission counters are being rebuilt by another instance")

    async def _rebuild(self) -> None:
        """Counters from the ledger: settled usage of today, this month and all time (its aggregates),
        and the last minute's requests; then the marker, with the recovery window."""
        log.warning("admission: Redis has no counters (restarted empty or flushed): rebuilding from the ledger")
        # Settles Redis took just before it lost them have their ledger rows committed right after:
        # wait for those commits, so the ledger read below has them.
        await asyncio.sleep(self.settle_grace_s)
        r = self.redis
        lock = self.prefix + "rebuild"
        async for batch in _scan_batches(r, self.prefix + "*"):
            batch = [k for k in batch if _s(k) != lock]
            if batch:
                await r.unlink(*batch)
        sec, usec = await r.time()
        now = sec + usec / 1e6
        cal = calendar_of(now)
        today, month = day_key(now), month_key(now)
        usage = await asyncio.to_thread(self.ledger.period_usage, today, month)
        recent = await asyncio.to_thread(self.ledger.recent_requests, now - 60.0)
        expiry = {"d": int(cal[2]) + 172800, "m": int(cal[3]) + 172800}
        # Summed here, then written once per key in the script's layout: packed doubles (struct), a bucket
        # r0 r1 r2 h0 h1 h2, a minute entry requests tokens, its "#" the sums and 0 (expiry not yet renewed).
        buckets: dict[tuple[str, str], list[int]] = collections.defaultdict(lambda: [0, 0, 0])
        for rows, period in zip(usage, ("d" + today, "m" + month, "total")):
            for user_id, model, requests, tokens, cost in rows:
                for scope in (model, "*"):
                    acc = buckets[(period, _who(user_id, scope))]
                    acc[0] += requests
                    acc[1] += tokens
                    acc[2] += cost
        pipe = r.pipeline(transaction=False)
        for (period, w), (requests, tokens, cost) in buckets.items():
            pipe.set(f"{self.prefix}b:{period}:{w}", struct.pack("<6d", requests, tokens, cost, 0, 0, 0),
                     exat=expiry.get(period[0]))
        horizon = now - 60.0
        sums: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
        for n, (t, user_id, model, tokens, voided) in enumerate(sorted(recent)):
            if t <= horizon:
                continue
            for scope in ("*",) if voided else (model, "*"):
                w = _who(user_id, scope)
                zk, hk, member = f"{self.prefix}mz:{w}", f"{self.prefix}mw:{w}", f"seed.{n}"
                pipe.zadd(zk, {member: int(t * 1e6)})
                pipe.hset(hk, member, struct.pack("<2d", 1, 0 if voided else tokens))
                sums[w][0] += 1
                sums[w][1] += 0 if voided else tokens
        for w, (requests, tokens) in sums.items():
            pipe.hset(f"{self.prefix}mw:{w}", "#", struct.pack("<3d", requests, tokens, 0))
            pipe.pexpire(f"{self.prefix}mz:{w}", 120000)
            pipe.pexpire(f"{self.prefix}mw:{w}", 120000)
        await pipe.execute()
        epoch = uuid.uuid4().hex[:12]
        await self._adopt(epoch)
        run_id = (await r.info("server")).get("run_id", "")
        await r.hset(self.prefix + "ready", mapping={"epoch": epoch, "at": int(now * 1e6) + self.recover_us,
                                                     "layout": self.layout,
                                                     "run_id": run_id})
        self.rebuilds += 1
        log.warning("admission: counters rebuilt from the ledger (%d sums, %d recent requests); epoch %s",
                    sum(len(x) for x in usage), len(recent), epoch)


async def _scan_batches(r: Any, pattern: str):
    cursor = 0
    while True:
        cursor, keys = await r.scan(cursor, match=pattern, count=1000)
        yield keys
        if cursor == 0:
            return


# The script's window codes (its WINDOWS table): limits go to it packed, as struct.unpack reads them.
_WINDOW_CODE = {MINUTE: 0, CONCURRENT: 1, DAY: 2, MONTH: 3, Window.TOTAL: 4}


def _who(user_id: str, scope: str) -> str:
    return f"{len(user_id)}:{user_id}:{scope}"


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _refusal(c: Check, now: float, need: int, free_at: float, checks: list[Check], default_budget: bool) -> Refusal:
    """``limits.refusal``, with the minute window's free time computed by the script."""
    return refusal(c, now, need, checks, default_budget, lambda: free_at)
