"""The database URL the interface tests run against: a SQLite file per test; and a fresh
database on a real, private PostgreSQL server (tests/pg.py: started once per session, skipped
with the reason when no PostgreSQL binaries are installed)."""

from __future__ import annotations

import pytest

from shared.parsing import to_us

T0 = to_us(2024, 4, 27, 12, 0, 0, 0)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """A SQLite file, then a fresh PostgreSQL database (``pg_url``: tests/conftest.py)."""
    if request.param == "postgresql":
        yield request.getfixturevalue("pg_url")
    else:
        yield f"sqlite:///{tmp_path / 'w.db'}"
