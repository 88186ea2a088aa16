import contextlib
import os
import subprocess

import pytest

from tests.integration.stack import Stack
from tests.pg import PostgresServer, postgres_server  # noqa: F401 (the session's server)


@pytest.fixture
def pg_url(postgres_server):  # noqa: F811
    """A fresh database on the session's PostgreSQL server (tests/pg.py); dropped after the
    test. Skipped, with the reason, where no server can run."""
    if postgres_server is None:
        pytest.skip(PostgresServer.missing())
    url = postgres_server.create_database()
    yield url
    postgres_server.drop_database(url)


@pytest.fixture
def database(request) -> str | None:
    """The database of the stacks below: None, SQLite in the test's folder (the default); a
    test parametrized with ``tests.pg.BOTH_BACKENDS`` (indirect) runs again with storage on a
    fresh database of the session's PostgreSQL server (``storage.url``)."""
    kind = getattr(request, "param", "sqlite")
    if kind == "postgresql":
        return request.getfixturevalue("pg_url")
    if kind != "sqlite":
        raise ValueError(f"no such backend: {kind!r}")
    return None


def with_database(overrides: dict, url: str | None) -> dict:
    if url is None:
        return overrides
    return dict(overrides, storage={"url": url, **overrides.get("storage", {})})


@pytest.fixture
def stack(tmp_path, database):
    """A running stack (all services up and connected); stopped after the test."""
    s = Stack(tmp_path, with_database({}, database))
    try:
        s.start()
        s.wait_ready()
        yield s
    finally:
        s.close()


@pytest.fixture
def make_stack(tmp_path, database):
    """Factory for a stack with config overrides, not yet started."""
    made = []

    def make(**overrides):
        s = Stack(tmp_path, with_database(overrides, database))
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


@contextlib.contextmanager
def small_filesystem(tmp_path, size_mb: int):
    """A real filesystem of ``size_mb`` (tmpfs) at ``tmp_path/disk``; needs root, as CI has."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(mnt)],
                   check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
