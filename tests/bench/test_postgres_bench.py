"""The PostgreSQL measurements of the benchmark (``--postgres``) run on the test session's
private server and count what they write. No timing is asserted."""

import pytest

from bench.run import print_postgres, run_postgres
from tests.pg import PostgresServer


def test_postgres_measurements_run_and_write_every_row(postgres_server, capsys):
    if postgres_server is None:
        pytest.skip(PostgresServer.missing())
    r = run_postgres(postgres_server.url(), rows=20_000, repeats=1)
    assert set(r["best_rows_per_s"]) == {"copy_binary", "copy_write_row", "storage_write",
                                           "storage_write_10"}
    assert all(v > 0 for v in r["best_rows_per_s"].values())
    print_postgres(r)
    assert "of bare binary COPY" in capsys.readouterr().out
