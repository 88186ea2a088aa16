"""The database URL the interface tests run against: a SQLite file per test; and a fresh
database on a real, private PostgreSQL server (tests/pg.py: started once per session, skipped
with the reason when no PostgreSQL binaries are installed)."""

from __future__ import annotations

import pytest

from shared.parsing import to_us
from tests.pg import PostgresServer, postgres_server  # noqa: F401 (a fixture)

T0 = to_us(2024, 4, 27, 12, 0, 0, 0)


@pytest.fixture
def pg_url(request):
    """A fresh database on the session's PostgreSQL server; dropped after the test."""
    server = request.getfixturevalue("postgres_server")
    if server is None:
        pytest.skip(PostgresServer.missing())
    url = server.create_database()
    yield url
    server.drop_database(url)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "postgresql":
        yield request.getfixturevalue("pg_url")
    else:
        yield f"sqlite:///{tmp_path / 'w.db'}"
