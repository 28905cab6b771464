"""A small asyncio + aiohttp load generator, run by ``load.bench`` in its own process.

    python -m load.loadgen --url http://127.0.0.1:8000 --mix mix.json --concurrency 50 --duration 10
    python -m load.loadgen --url ... --mix mix.json --rate 100 --duration 10      # open loop

A *mix* file is a JSON list of request kinds, each
``{"name", "path", "body" | "body_file", "stream": bool, "weight", "headers": {}, "expect": [statuses],
"auth_keys": [keys]}`` (``expect`` lists answers that are outcomes, not errors: e.g. 429 for a user with
a tight limit, 500 for an injected fault, "stream_error" for a stream cut on purpose; ``auth_keys``: a
bearer key picked at random per request);
every request picks one kind by weight (a fixed-seed RNG, so runs are comparable).

Closed loop (default): ``--concurrency`` workers, each sending its next request as soon as the last
one is answered, for ``--duration`` seconds. Open loop (``--rate R``): requests start on a fixed
schedule of R per second whatever the answers do, and latency is measured from the *scheduled* start,
so a stalled server is not hidden by the generator waiting for it (no coordinated omission).

Requests answered during the first ``--warmup`` seconds are not counted (connections opening).
Streams: time to first byte (the first body bytes, i.e. the first event) and total time; a stream is
complete when its body ends with ``data: [DONE]``. The result is one JSON object on stdout:
rps, latency percentiles (ms), statuses, errors by kind, and the same per kind of request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from typing import Any

import aiohttp


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"n": 0, "p50": None, "p90": None, "p99": None, "max": None, "mean": None}
    v = sorted(values)
    n = len(v)

    def at(q: float) -> float:
        return round(v[min(n - 1, int(q * n))], 3)

    return {"n": n, "p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "max": round(v[-1], 3),
            "mean": round(sum(v) / n, 3)}


class Kind:
    def __init__(self, spec: dict[str, Any], base_url: str, default_headers: dict[str, str]) -> None:
        self.name = spec.get("name") or spec["path"]
        self.url = base_url.rstrip("/") + spec["path"]
        if "body_file" in spec:
            with open(spec["body_file"], "rb") as f:
                self.body = f.read()
        else:
            body = spec.get("body")
            self.body = body.encode() if isinstance(body, str) else json.dumps(body, separators=(",", ":")).encode()
        self.stream = bool(spec.get("stream"))
        self.weight = float(spec.get("weight", 1))
        self.headers = {"Content-Type": "application/json", **default_headers, **(spec.get("headers") or {})}
        self.expect = set(spec.get("expect") or [200])
        self.keys = list(spec.get("auth_keys") or [])  # one picked per request (several users in one mix)
        self.stats = Stats()


class Stats:
    def __init__(self) -> None:
        self.latency_ms: list[float] = []  # completed as expected
        self.ttfb_ms: list[float] = []
        self.events: list[int] = []
        self.status: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.ok = 0
        self.expected_other = 0  # an expected non-200 (429 of a tight user, an injected fault)

    def to_json(self, seconds: float) -> dict[str, Any]:
        out = {
            "requests": self.ok + self.expected_other + sum(self.errors.values()),
            "ok": self.ok,
            "expected_non_200": self.expected_other,
            "errors": sum(self.errors.values()),
            "errors_by_kind": dict(sorted(self.errors.items())),
            "status": dict(sorted(self.status.items())),
            "rps": round(self.ok / seconds, 2) if seconds > 0 else 0.0,
            "latency_ms": percentiles(self.latency_ms),
        }
        if self.ttfb_ms:
            out["ttfb_ms"] = percentiles(self.ttfb_ms)
            out["events_mean"] = round(sum(self.events) / len(self.events), 2)
        return out


class RawConnection(asyncio.Protocol):
    """A minimal keep-alive HTTP/1.1 client connection for the closed-loop non-stream fast path.

    aiohttp's client costs a few hundred microseconds of CPU per request, which on a 2-core machine is
    taken from the servers being measured; this costs a few tens. Content-Length and chunked bodies.
    """

    def __init__(self) -> None:
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future | None = None
        self.closed = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.waiter is not None and not self.waiter.done():
            self._complete()

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionResetError("server closed the connection"))

    def _complete(self) -> None:
        buf = self.buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(buf[:end]).lower()
        status = int(head[9:12])
        i = head.find(b"\r\ncontent-length:")
        if i >= 0:
            j = head.find(b"\r\n", i + 2)
            total = end + 4 + int(head[i + 17: j if j > 0 else len(head)])
            if len(buf) < total:
                return
        elif b"\r\ntransfer-encoding: chunked" in head:
            pos = end + 4
            while True:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    return
                size = int(bytes(buf[pos:eol]).split(b";")[0], 16)
                pos = eol + 2 + size + 2
                if len(buf) < pos:
                    return
                if size == 0:
                    break
            total = pos
        else:
            return  # body until close: not produced by the servers measured here
        keep = b"\r\nconnection: close" not in head
        del buf[:total]
        self.waiter.set_result((status, keep))

    async def request(self, data: bytes) -> tuple[int, bool]:
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return await self.waiter


class Generator:
    def __init__(self, args: argparse.Namespace) -> None:
        with open(args.mix) as f:
            specs = json.load(f)
        headers = dict(h.split(":", 1) for h in args.header)
        headers = {k.strip(): v.strip() for k, v in headers.items()}
        self.kinds = [Kind(s, args.url, headers) for s in specs]
        self.weights = [k.weight for k in self.kinds]
        self.rng = random.Random(args.seed)
        self.args = args
        self.total = Stats()
        self.count_from = 0.0
        self.timeout = aiohttp.ClientTimeout(total=args.timeout)

    def pick(self) -> Kind:
        if len(self.kinds) == 1:
            return self.kinds[0]
        return self.rng.choices(self.kinds, self.weights)[0]

    def record(self, kind: Kind, started: float, outcome: str, status: int | None,
               ttfb: float | None = None, events: int = 0) -> None:
        end = time.perf_counter()
        if end < self.count_from:
            return
        for s in (kind.stats, self.total):
            if status is not None:
                s.status[str(status)] = s.status.get(str(status), 0) + 1
            if outcome == "ok":
                s.ok += 1
                s.latency_ms.append((end - started) * 1000)
                if ttfb is not None:
                    s.ttfb_ms.append((ttfb - started) * 1000)
                    s.events.append(events)
            elif outcome == "expected":
                s.expected_other += 1
            else:
                s.errors[outcome] = s.errors.get(outcome, 0) + 1

    async def one(self, session: aiohttp.ClientSession, kind: Kind, started: float) -> None:
        status = None
        try:
            headers = kind.headers
            if kind.keys:
                headers = {**headers, "Authorization": "Bearer " + self.rng.choice(kind.keys)}
            async with session.post(kind.url, data=kind.body, headers=headers) as resp:
                status = resp.status
                if status != 200:
                    await resp.read()
                    self.record(kind, started, "expected" if status in kind.expect else f"http_{status}", status)
                    return
                if not kind.stream:
                    await resp.read()
                    self.record(kind, started, "ok", status)
                    return
                ttfb = None
                events = 0
                tail = b""
                async for chunk in resp.content.iter_any():
                    if ttfb is None:
                        ttfb = time.perf_counter()
                    events += chunk.count(b"\n\n")
                    tail = (tail + chunk)[-64:]
                if tail.rstrip().endswith(b"data: [DONE]"):
                    self.record(kind, started, "ok", status, ttfb, events)
                elif b'"error"' in tail:
                    self.record(kind, started, "expected" if "stream_error" in kind.expect else "stream_error_event", status)
                else:
                    self.record(kind, started, "expected" if "stream_error" in kind.expect else "stream_incomplete", status)
        except TimeoutError:
            self.record(kind, started, "timeout", status)
        except aiohttp.ClientPayloadError:
            self.record(kind, started, "expected" if "stream_error" in kind.expect else "payload_error", status)
        except (aiohttp.ClientError, OSError) as exc:
            self.record(kind, started, type(exc).__name__, status)

    def raw_ok(self) -> bool:
        return (self.args.engine != "aiohttp" and self.args.rate is None
                and not any(k.stream or k.keys for k in self.kinds))

    async def raw_worker(self, deadline: float) -> None:
        from urllib.parse import urlsplit

        loop = asyncio.get_running_loop()
        prepared = {}
        for k in self.kinds:
            u = urlsplit(k.url)
            head = f"POST {u.path or '/'} HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Length: {len(k.body)}\r\n"
            head += "".join(f"{n}: {v}\r\n" for n, v in k.headers.items()) + "\r\n"
            prepared[k.name] = head.encode() + k.body
        u = urlsplit(self.kinds[0].url)
        conn: RawConnection | None = None
        n = 0
        while time.perf_counter() < deadline and (self.args.max_requests is None or n < self.args.max_requests):
            n += 1
            kind = self.pick()
            started = time.perf_counter()
            try:
                if conn is None or conn.closed:
                    _, conn = await loop.create_connection(RawConnection, u.hostname, u.port)
                status, keep = await asyncio.wait_for(conn.request(prepared[kind.name]), self.args.timeout)
            except TimeoutError:
                self.record(kind, started, "timeout", None)
                conn.transport.close()
                conn = None
                continue
            except OSError as exc:
                self.record(kind, started, type(exc).__name__, None)
                conn = None
                continue
            if status == 200:
                self.record(kind, started, "ok", status)
            else:
                self.record(kind, started, "expected" if status in kind.expect else f"http_{status}", status)
            if not keep:
                conn.transport.close()
                conn = None
        if conn is not None and conn.transport is not None:
            conn.transport.close()

    async def run(self) -> dict[str, Any]:
        a = self.args
        if self.raw_ok():
            t0 = time.perf_counter()
            self.count_from = t0 + a.warmup
            deadline = t0 + a.warmup + a.duration
            await asyncio.gather(*(self.raw_worker(deadline) for _ in range(a.concurrency)))
            measured = time.perf_counter() - self.count_from
            return self.result(measured, "raw")
        limit = a.concurrency if a.rate is None else max(a.concurrency, 256)
        connector = aiohttp.TCPConnector(limit=limit, keepalive_timeout=60)
        async with aiohttp.ClientSession(connector=connector, timeout=self.timeout,
                                         skip_auto_headers=("User-Agent",)) as session:
            t0 = time.perf_counter()
            self.count_from = t0 + a.warmup
            deadline = t0 + a.warmup + a.duration
            if a.rate is None:
                await asyncio.gather(*(self.worker(session, deadline) for _ in range(a.concurrency)))
            else:
                await self.open_loop(session, t0, deadline)
            measured = time.perf_counter() - self.count_from
        return self.result(measured, "aiohttp")

    def result(self, measured: float, engine: str) -> dict[str, Any]:
        a = self.args
        out = {"mode": "closed" if a.rate is None else "open", "engine": engine, "concurrency": a.concurrency,
               "rate": a.rate, "seconds": round(measured, 3), **self.total.to_json(measured)}
        if len(self.kinds) > 1:
            out["by_kind"] = {k.name: k.stats.to_json(measured) for k in self.kinds}
        return out

    async def worker(self, session: aiohttp.ClientSession, deadline: float) -> None:
        n = 0
        while time.perf_counter() < deadline and (self.args.max_requests is None or n < self.args.max_requests):
            n += 1
            await self.one(session, self.pick(), time.perf_counter())

    async def open_loop(self, session: aiohttp.ClientSession, t0: float, deadline: float) -> None:
        interval = 1.0 / self.args.rate
        tasks: set[asyncio.Task] = set()
        i = 0
        while True:
            scheduled = t0 + i * interval
            if scheduled >= deadline:
                break
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(self.one(session, self.pick(), scheduled))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
        if tasks:
            await asyncio.wait(tasks, timeout=self.args.timeout)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m load.loadgen", description="asyncio+aiohttp load generator")
    p.add_argument("--url", required=True, help="base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--mix", required=True, help="JSON file: list of request kinds (see the module doc)")
    p.add_argument("--header", action="append", default=[], help="'Name: value', sent with every request")
    p.add_argument("--concurrency", type=int, default=50, help="closed loop: workers (open loop: min pool size)")
    p.add_argument("--rate", type=float, default=None, help="open loop: requests started per second")
    p.add_argument("--duration", type=float, default=10.0, help="seconds measured (after the warm-up)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds not counted at the start")
    p.add_argument("--max-requests", type=int, default=None, help="closed loop: cap per worker")
    p.add_argument("--timeout", type=float, default=60.0, help="per request, seconds")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--engine", choices=("auto", "aiohttp"), default="auto",
                   help="auto: a minimal raw HTTP/1.1 client for closed-loop non-stream mixes, else aiohttp")
    a = p.parse_args(argv)
    if a.duration <= 0 or a.duration > 24 * 3600:
        p.error("--duration must be in (0, 86400]")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = asyncio.run(Generator(args).run())
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
