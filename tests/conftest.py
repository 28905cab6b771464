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
