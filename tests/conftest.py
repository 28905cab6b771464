import pytest

from tests.harness import Harness


@pytest.fixture
def make_world(tmp_path):
    """Factory: make_world(config={...}, emulator={...}) -> a started Harness; all closed at the end.
    PROXYD_TEST_STORAGE=postgres runs every world on a PostgreSQL database of its own instead of SQLite."""
    import os

    worlds = []
    databases = []

    def make(**kw) -> Harness:
        if os.environ.get("PROXYD_TEST_STORAGE") == "postgres":
            from tests.services import postgres_database

            databases.append(postgres_database())
            kw["config"] = {"database.backend": "postgres", "database.dsn": next(databases[-1]),
                            **(kw.get("config") or {})}
        h = Harness(str(tmp_path / f"proxyd{len(worlds)}.db"), **kw).start()
        worlds.append(h)
        return h

    yield make
    for h in worlds:
        h.close()
    for db in databases:
        db.close()  # drops it (the generator's finally)


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
