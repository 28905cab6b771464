"""A test world: the Ollama emulator and a proxy on a private event loop in a background thread.

Real HTTP on loopback, a temporary database, the real ``openai`` SDK as the client. The proxy runs
in-process so tests can look at its state (the limiter, the emulator's received requests) and use
an injectable clock for window roll-over instead of sleeping.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import httpx
from openai import AsyncOpenAI, OpenAI
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from ollama_emulator import start_emulator
from proxyd.config import load_config
from proxyd.server import build_context, make_app

ADMIN_TOKEN = "test-admin-token"


class FakeClock:
    """Wall clock that tests can move forward (limit windows) without sleeping."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


class Harness:
    def __init__(self, db_path: str, *, config: dict[str, Any] | None = None, emulator: dict[str, Any] | None = None,
                 upstream_url: str | None = None, env: dict[str, str] | None = None) -> None:
        self.db_path = db_path
        self.config_overrides = config or {}
        self.emulator_options = emulator or {}
        self.upstream_url = upstream_url
        self.env = env or {}
        self.clock = FakeClock()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.emu_server = None
        self.emu = None
        self.ctx = None
        self.server = None
        self.port = 0

    # -- running things on the proxy's loop ---------------------------------------------------------------

    def call(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> "Harness":
        self.call(self._start())
        return self

    async def _start(self) -> None:
        if self.emu is None and self.upstream_url is None:
            self.emu_server, emu_port, self.emu = await start_emulator(port=0, **self.emulator_options)
            self.upstream_url = f"http://127.0.0.1:{emu_port}"
        overrides = {
            "upstream.url": self.upstream_url,
            "database.path": self.db_path,
            "admin.token": ADMIN_TOKEN,
            "logging.access_log": False,
            "images.allow_private_networks": False,
            **self.config_overrides,
        }
        config = load_config(None, overrides, env=self.env)
        self.config = config
        self.ctx = build_context(config, clock=self.clock)
        self.ctx.ledger.bind_loop(asyncio.get_running_loop())
        sockets = bind_sockets(0, "127.0.0.1")
        self.port = sockets[0].getsockname()[1]
        self.server = HTTPServer(make_app(self.ctx), max_body_size=config["server.max_body_bytes"] * 2)
        self.server.add_sockets(sockets)
        await self.ctx.router.start()

    def stop_proxy(self) -> None:
        self.call(self._stop_proxy())

    async def _stop_proxy(self) -> None:
        if self.server is None:
            return
        self.server.stop()
        await self.server.close_all_connections()
        await self.ctx.router.close()
        await self.ctx.images.close()
        await self.ctx.ledger.close()
        if hasattr(self.ctx.meter.admission, "close"):
            await self.ctx.meter.admission.close()
        self.ctx.tokens.close()
        self.server = None

    def restart(self) -> None:
        """Stops the proxy and starts a new one on the same database (and the same emulator)."""
        self.stop_proxy()
        self.start()

    def close(self) -> None:
        self.stop_proxy()
        if self.emu_server is not None:
            self.loop.call_soon_threadsafe(self.emu_server.stop)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    # -- clients ----------------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, key: str, *, v1: bool = True, **kw) -> OpenAI:
        return OpenAI(base_url=self.url + ("/v1" if v1 else ""), api_key=key, max_retries=0, **kw)

    def async_client(self, key: str, **kw) -> AsyncOpenAI:
        return AsyncOpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, **kw)

    def admin(self, method: str, path: str, json: Any = None, token: str = ADMIN_TOKEN) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.request(method, self.url + path, json=json, headers=headers, timeout=30)

    def get(self, path: str, key: str, **params) -> httpx.Response:
        return httpx.get(self.url + path, params=params, headers={"Authorization": f"Bearer {key}"}, timeout=30)

    def new_user(self, user_id: str, limits: dict[str, Any] | None = None) -> str:
        body: dict[str, Any] = {"user_id": user_id}
        if limits is not None:
            body["limits"] = limits
        r = self.admin("POST", "/admin/users", body)
        assert r.status_code == 201, r.text
        return r.json()["api_key"]

    # -- ledger views ---------------------------------------------------------------------------------------------

    @property
    def postgres(self) -> bool:
        return self.config["database.backend"] == "postgres"

    def rows(self, sql: str, params: tuple = ()) -> list[tuple]:
        """A query's rows; SQL with ? placeholders, on either backend (numbered $n for PostgreSQL)."""
        if self.postgres:
            return self.call(self.ctx.ledger.fetch(_numbered(sql), *params))
        return self.call(self.ctx.ledger.read(lambda c: [tuple(r) for r in c.execute(sql, params).fetchall()]))

    def execute(self, sql: str, params: tuple = ()) -> None:
        """A write outside the ledger's ports (a test's setup: a row a crash would leave), on either backend."""
        async def run() -> None:
            if self.postgres:
                await self.ctx.ledger.execute(_numbered(sql), *params)
            else:
                await self.ctx.ledger.submit_sql(sql, params)  # on the loop: submit uses the running one

        self.call(run())

    def settle_all(self) -> None:
        """Waits until every queued ledger write is committed and nothing is reserved."""
        deadline = time.time() + 10
        while time.time() < deadline:
            if self.ctx.ledger.queue_depth == 0 and self.ctx.meter.admission.pending == 0:
                return
            time.sleep(0.01)
        raise AssertionError(
            f"not idle: queue {self.ctx.ledger.queue_depth}, pending {self.ctx.meter.admission.pending}"
        )


def _numbered(sql: str) -> str:
    """? placeholders as PostgreSQL's $1, $2, ..."""
    parts = sql.split("?")
    return "".join(p + (f"${i + 1}" if i < len(parts) - 1 else "") for i, p in enumerate(parts))
