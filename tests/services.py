"""The external services some tests need (PostgreSQL, Redis): where they are, and what a test does when
one is unreachable. Locally it skips with the reason; under CI (``.ci/run`` sets PROXYD_CI_REQUIRE_SERVICES=1)
the same test fails instead, so CI can never pass by skipping them."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit

import pytest

POSTGRES_DSN = os.environ.get("PROXYD_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("PROXYD_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def required() -> bool:
    return os.environ.get("PROXYD_CI_REQUIRE_SERVICES") == "1"


def need(name: str, url: str, default_port: int) -> None:
    """Skips (or, under CI, fails) the calling test unless ``url``'s host:port accepts a TCP connection."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or default_port
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError as exc:
        reason = f"{name} is not reachable at {host}:{port} ({exc}); set {'PROXYD_TEST_POSTGRES_DSN' if name == 'PostgreSQL' else 'PROXYD_TEST_REDIS_URL'}"
        if required():
            pytest.fail(reason + " -- PROXYD_CI_REQUIRE_SERVICES=1 makes this a failure, not a skip")
        pytest.skip(reason)


def need_postgres() -> str:
    need("PostgreSQL", POSTGRES_DSN, 5432)
    return POSTGRES_DSN


def need_redis() -> str:
    need("Redis", REDIS_URL, 6379)
    return REDIS_URL


def _admin(dsn: str, sql: str) -> None:
    import asyncio

    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(dsn, timeout=5)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run())


def postgres_database():
    """A generator (for a fixture): a new empty database proxyd_test_<random> on the test server, its DSN
    yielded, dropped afterwards (WITH (FORCE): connections a test left open do not keep it)."""
    import secrets

    dsn = need_postgres()
    name = "proxyd_test_" + secrets.token_hex(6)
    _admin(dsn, f"CREATE DATABASE {name}")
    parts = urlsplit(dsn)
    try:
        yield parts._replace(path="/" + name).geturl()
    finally:
        _admin(dsn, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
