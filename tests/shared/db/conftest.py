"""The database URL the interface tests run against: a SQLite file per test; and, when
``WATTFLOW_TEST_PG`` names a PostgreSQL server (an admin URL), a fresh database on it."""

from __future__ import annotations

import pytest

from shared.parsing import to_us

T0 = to_us(2024, 4, 27, 12, 0, 0, 0)


@pytest.fixture(params=["sqlite"])
def db_url(request, tmp_path):
    yield f"sqlite:///{tmp_path / 'w.db'}"
