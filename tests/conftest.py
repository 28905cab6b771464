import pytest

from tests.harness import Harness


@pytest.fixture
def make_world(tmp_path):
    """Factory: make_world(config={...}, emulator={...}) -> a started Harness; all closed at the end."""
    worlds = []

    def make(**kw) -> Harness:
        h = Harness(str(tmp_path / f"proxyd{len(worlds)}.db"), **kw).start()
        worlds.append(h)
        return h

    yield make
    for h in worlds:
        h.close()


@pytest.fixture
def world(make_world):
    return make_world()


@pytest.fixture
def pg_dsn():
    """The DSN of a PostgreSQL database of the test's own (tests/services.py: skipped locally when there is
    no server, a failure under CI)."""
    from tests.services import postgres_database

    yield from postgres_database()


@pytest.fixture(params=["sqlite", "postgres"])
def backend_config(request, tmp_path):
    """Config overrides selecting each storage backend in turn (postgres: a database of the test's own)."""
    if request.param == "sqlite":
        yield {}
        return
    from tests.services import postgres_database

    yield from ({"database.backend": "postgres", "database.dsn": dsn} for dsn in postgres_database())
