"""A bare keep-alive forwarder: the yardstick the proxy is measured against.

    python -m load.forwarder --port 8100 --upstream http://127.0.0.1:11434

Same stack as proxyd (a Tornado HTTPServer in front, aiohttp's pooled keep-alive connector behind,
configured like ``proxyd.upstream.Upstream``) but nothing else: no auth, no validation, no token
counting, no limits, no ledger. The request body goes upstream as received (only Content-Type is
sent, like proxyd); a non-stream answer is read whole and written back; an event stream is relayed
chunk by chunk, each chunk written and flushed as it arrives. Whatever this costs is the price of the
stack itself; the proxy's overhead is what it costs on top.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import subprocess
import sys

import aiohttp
import tornado.web
from tornado.httpserver import HTTPServer
from tornado.iostream import StreamClosedError

log = logging.getLogger("load.forwarder")


class ForwardHandler(tornado.web.RequestHandler):
    def initialize(self, session: aiohttp.ClientSession, upstream: str) -> None:
        self.session = session
        self.upstream = upstream
        self._resp: aiohttp.ClientResponse | None = None

    def set_default_headers(self) -> None:
        self.clear_header("Server")

    def compute_etag(self):
        return None

    def on_connection_close(self) -> None:
        if self._resp is not None:
            self._resp.close()  # client gone: drop the upstream connection, as proxyd does

    async def get(self) -> None:
        await self._forward()

    async def post(self) -> None:
        await self._forward()

    async def _forward(self) -> None:
        headers = {"Accept": "application/json, text/event-stream"}
        if self.request.method == "POST":
            headers["Content-Type"] = "application/json"
        try:
            resp = await self.session.request(
                self.request.method, self.upstream + self.request.uri, data=self.request.body or None, headers=headers
            )
        except (aiohttp.ClientError, OSError) as exc:
            self.set_status(502)
            self.finish({"error": {"message": f"upstream: {exc!r}"}})
            return
        self._resp = resp
        self.set_status(resp.status)
        ctype = resp.headers.get("Content-Type", "application/json")
        self.set_header("Content-Type", ctype)
        try:
            if ctype.startswith("text/event-stream"):
                async for chunk in resp.content.iter_any():
                    self.write(chunk)
                    await self.flush()
                resp.release()
            else:
                body = await resp.read()
                resp.release()
                self.write(body)
            self.finish()
        except StreamClosedError:
            resp.close()
        except (aiohttp.ClientError, OSError):
            resp.close()
            if not self._headers_written:
                self.set_status(502)
                self.finish({"error": {"message": "upstream connection lost"}})
            else:
                self.finish()  # cut stream: end it (the client sees no [DONE])


def make_app(session: aiohttp.ClientSession, upstream: str) -> tornado.web.Application:
    return tornado.web.Application(
        [(r"/.*", ForwardHandler, {"session": session, "upstream": upstream.rstrip("/")})],
        log_function=lambda handler: None,  # no access log, like the benchmarked proxy
    )


async def serve(port: int, upstream: str, address: str = "127.0.0.1", pool_size: int = 512,
                reuse_port: bool = False) -> None:
    # The same connector settings as proxyd.upstream.Upstream.session.
    connector = aiohttp.TCPConnector(limit=pool_size, keepalive_timeout=30, ttl_dns_cache=300)
    session = aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=5.0),
        skip_auto_headers=("User-Agent",),
        cookie_jar=aiohttp.DummyCookieJar(),
    )
    server = HTTPServer(make_app(session, upstream), idle_connection_timeout=120, body_timeout=60,
                        max_body_size=40 * 1024 * 1024)
    server.listen(port, address=address, reuse_port=reuse_port)
    log.info("forwarder listening on http://%s:%d -> %s", address, port, upstream)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.stop()
    try:
        await asyncio.wait_for(server.close_all_connections(), 2.0)
    except TimeoutError:
        pass
    await session.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m load.forwarder", description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--address", default="127.0.0.1")
    p.add_argument("--upstream", default="http://127.0.0.1:11434")
    p.add_argument("--pool-size", type=int, default=512)
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--workers", type=int, default=1,
                   help="N processes sharing the port (SO_REUSEPORT); it keeps no state, so this is all it takes")
    p.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.workers > 1:
        run_workers(args.workers, [sys.executable, "-m", "load.forwarder", "--port", str(args.port),
                                   "--address", args.address, "--upstream", args.upstream,
                                   "--pool-size", str(args.pool_size), "--log-level", args.log_level, "--reuse-port"])
        return
    asyncio.run(serve(args.port, args.upstream, args.address, args.pool_size, args.reuse_port))


def run_workers(n: int, cmd: list[str]) -> int:
    """Starts n copies of cmd, passes SIGTERM/SIGINT on, returns when all have exited."""

    def die_with_parent() -> None:
        try:
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except Exception:  # noqa: BLE001, S110 - not Linux: stopped by the signal handler below instead
            pass

    procs = [subprocess.Popen(cmd, preexec_fn=die_with_parent) for _ in range(n)]  # noqa: PLW1509

    def stop(*_: object) -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    return max(proc.wait() for proc in procs)


if __name__ == "__main__":
    main()
