import pytest

from tests.integration.stack import Stack


@pytest.fixture
def stack(tmp_path):
    """A running stack (all services up and connected); stopped after the test."""
    s = Stack(tmp_path)
    try:
        s.start()
        s.wait_ready()
        yield s
    finally:
        s.close()


@pytest.fixture
def make_stack(tmp_path):
    """Factory for a stack with config overrides, not yet started."""
    made = []

    def make(**overrides):
        s = Stack(tmp_path, overrides)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()
