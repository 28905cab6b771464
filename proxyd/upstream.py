"""Talking to Ollama: one keep-alive connection pool, its timeouts, and the error mapping.

aiohttp's pooled connector instead of Tornado's simple_httpclient, which opens a new connection
per request (measured: about half the throughput). The proxy never forwards client headers: it sends
its own Content-Type and lets the pool set ``Host`` from the upstream URL, which keeps Ollama's Host
check happy (it answers 403 to a non-local Host when it listens on loopback), never leaks the
client's Authorization, and leaves no hop-by-hop header to strip.

Timeouts: connect; first byte (generous: a cold model load takes minutes); the idle gap between two
chunks of a stream. Any failure becomes a typed error: unreachable -> 502, timeout -> 504. The client's
message never names the upstream (its URL, host or port are internal addresses, and the exception text
aiohttp gives names them too): those go into the error's ``detail``, which is logged with the request id.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from typing import Any, AsyncIterator, Iterator

import aiohttp

from . import jsonio
from .errors import UpstreamTimeout, UpstreamUnavailable

# Addresses inside a message that Ollama passes on: its runner errors name the runner's own URL
# ('Post "http://127.0.0.1:39123/completion": EOF'), a front proxy may name its backends. Only on the
# error path, so the cost of a regex does not matter.
_ADDRESS = re.compile(
    r"[A-Za-z][A-Za-z0-9+.-]*://[^\s\"'<>]+"  # URLs
    r"|\[[0-9A-Fa-f:.]+\](?::\d{1,5})?"  # [IPv6]:port
    r"|\b\d{1,3}(?:\.\d{1,3}){3}(?::\d{1,5})?\b"  # IPv4[:port]
    r"|\b(?:localhost|(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}):\d{1,5}\b"  # host:port
)


def without_addresses(text: str) -> str:
    """``text`` with every URL, IP address and host:port replaced by ``<upstream>``."""
    return _ADDRESS.sub("<upstream>", text)


class Upstream:
    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout_s: float = 5.0,
        first_byte_timeout_s: float = 300.0,
        idle_timeout_s: float = 60.0,
        pool_size: int = 512,
        max_response_bytes: int = 64 * 1024 * 1024,
        headers: dict[str, str] | None = None,
        health_path: str = "/",
    ) -> None:
        self.base_url = base_url.rstrip("/")
        # identity: Ollama never compresses, and an upstream that did would make the declared length
        # (checked against the size cap in read()) the compressed size. The configured headers (an
        # upstream's credential, a gateway's own) come last: proxyd's are the only others it ever sees.
        self.headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream",
                        "Accept-Encoding": "identity", **(headers or {})}
        self.health_path = health_path
        self.connect_timeout_s = connect_timeout_s
        self.first_byte_timeout_s = first_byte_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.pool_size = pool_size
        self.max_response_bytes = max_response_bytes
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self.pool_size, keepalive_timeout=30, ttl_dns_cache=300)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout_s),
                skip_auto_headers=("User-Agent",),
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> "UpstreamResponse":
        """Sends the request and waits for the response headers (the first byte)."""
        data = None if body is None else jsonio.dumps(body)
        headers = self.headers
        try:
            async with asyncio.timeout(self.first_byte_timeout_s):
                resp = await self.session.request(method, self.base_url + path, data=data, headers=headers)
        except TimeoutError:
            raise UpstreamTimeout(f"Upstream sent no response within {self.first_byte_timeout_s:g}s.",
                                  detail=f"{method} {self.base_url}{path}") from None
        except aiohttp.ClientConnectorError as exc:
            # The errno's text ("Connection refused") says what happened without saying where (asyncio's
            # strerror, "Connect call failed ('127.0.0.1', 11434)", says both).
            code = getattr(exc.os_error, "errno", None)
            reason = os.strerror(code) if code else None
            raise UpstreamUnavailable("Upstream is unreachable" + (f": {reason}." if reason else "."),
                                      detail=f"{self.base_url}: {exc!r}") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamUnavailable("Connection to upstream failed.", detail=f"{self.base_url}: {exc!r}") from None
        return UpstreamResponse(self, resp)

    async def health(self) -> tuple[bool, str]:
        try:
            async with asyncio.timeout(2.0):
                async with self.session.get(self.base_url + self.health_path, headers=self.headers) as resp:
                    return resp.status == 200, f"HTTP {resp.status}"
        except Exception as exc:  # any failure just means "not healthy"
            return False, str(exc) or type(exc).__name__

    async def get_json(self, path: str, timeout_s: float = 5.0) -> Any:
        """A small GET answered with JSON (model lists, /api/ps); raises on any failure."""
        async with asyncio.timeout(timeout_s):
            async with self.session.get(self.base_url + path, headers=self.headers) as resp:
                if resp.status != 200:
                    raise UpstreamUnavailable(f"HTTP {resp.status} from {path}")
                return jsonio.loads(await resp.read())


class UpstreamResponse:
    def __init__(self, upstream: Upstream, resp: aiohttp.ClientResponse) -> None:
        self._up = upstream
        self._resp = resp
        self.status = resp.status
        self.content_type = resp.headers.get("Content-Type", "")

    async def read(self) -> bytes:
        """The whole body (non-stream answers and errors), capped, with the idle timeout per read."""
        limit = self._up.max_response_bytes
        length = self._resp.content_length
        if length is not None and "Content-Encoding" not in self._resp.headers:
            # Ollama declares the length of every non-stream answer (it writes it whole once generated):
            # refuse an oversized one up front, else read it in one call under one timeout, which costs
            # a fraction of a timeout per chunk on this path that every non-stream request takes.
            if length > limit:
                self.abort()
                raise UpstreamUnavailable(f"Upstream answer is larger than {limit} bytes.")
            try:
                with self._read_errors():
                    if self._resp.content.is_eof():
                        # Already all here (it usually comes in the packet with the headers): nothing to
                        # wait for, so no timer to arm and cancel.
                        return await self._resp.read()
                    async with asyncio.timeout(self._up.idle_timeout_s):
                        return await self._resp.read()
            finally:
                self.release()
        parts, size = [], 0
        try:
            async for chunk in self.chunks():
                size += len(chunk)
                if size > limit:
                    raise UpstreamUnavailable(f"Upstream answer is larger than {limit} bytes.")
                parts.append(chunk)
        finally:
            self.release()
        return b"".join(parts)

    async def chunks(self) -> AsyncIterator[bytes]:
        """Body bytes as they arrive; raises UpstreamTimeout after idle_timeout_s without a byte."""
        content = self._resp.content
        idle = self._up.idle_timeout_s
        while True:
            with self._read_errors():
                async with asyncio.timeout(idle):
                    chunk = await content.readany()
            if not chunk:
                return
            yield chunk

    @contextlib.contextmanager
    def _read_errors(self) -> Iterator[None]:
        """A silent upstream (the idle timeout) -> 504, a broken connection -> 502."""
        try:
            yield
        except TimeoutError:
            raise UpstreamTimeout(f"Upstream went silent for {self._up.idle_timeout_s:g}s.",
                                  detail=self._up.base_url) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamUnavailable("Connection to upstream lost.", detail=f"{self._up.base_url}: {exc!r}") from None

    def release(self) -> None:
        """Returns the connection to the pool (body fully read)."""
        self._resp.release()

    def abort(self) -> None:
        """Drops the connection: Ollama sees the client go away and stops generating."""
        self._resp.close()
