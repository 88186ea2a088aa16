"""The storage database on real SQLite files: many-row INSERTs and the writer thread."""

import contextlib
import sqlite3

import numpy as np
import pytest

from services.storage.db import ROWS_PER_STATEMENT, Database, Writer
from shared.config import Meter

METERS = (Meter("10.0.0.1", "V", 0.0, 110.0), Meter("10.0.0.2", "A", 0.0, 5.0))


def readings(n: int, start: int = 0):
    k = np.arange(start, start + n)
    return (k % 2).astype(np.int64), 1_700_000_000_000_000 + k * 1000, k * 0.5


def rows(db: Database) -> list[tuple]:
    return db.conn.execute("SELECT meter, ts_us, value FROM readings_view"
                           " ORDER BY ts_us").fetchall()


@pytest.mark.parametrize("n", [1, 49, 50, 51, 999, 1000, 2051])
def test_every_row_of_a_batch_is_stored_once_in_order(tmp_path, n):
    # sizes around the statement shapes (ROWS_PER_STATEMENT rows per INSERT, then smaller)
    assert ROWS_PER_STATEMENT[-1] == 1
    db = Database(str(tmp_path / "w.db"), METERS)
    meter, ts, value = readings(n)
    db.write((meter, ts, value), None, None, {"ingest-a": 7})
    got = rows(db)
    assert [r[0] for r in got] == [METERS[i].ip for i in meter.tolist()]
    assert [r[1] for r in got] == ts.tolist()
    assert [r[2] for r in got] == value.tolist()
    assert db.applied() == {"ingest-a": 7}
    db.close()


def test_power_rows_name_their_circuit(tmp_path):
    db = Database(str(tmp_path / "w.db"), METERS)
    cols = {"circuit": np.array([b"main", b"main", b"aux"]),
            "v_meter": np.array([b"10.0.0.1"] * 3), "a_meter": np.array([b"10.0.0.2"] * 3),
            "ts_us": np.array([1, 2, 3]), "watts": np.array([10.0, 20.0, 30.0]),
            "volts": np.array([5.0, 5.0, 5.0]), "amps": np.array([2.0, 4.0, 6.0])}
    db.write(None, [cols], None)
    got = db.conn.execute("SELECT circuit, ts_us, watts FROM power_view ORDER BY ts_us")
    assert got.fetchall() == [("main", 1, 10.0), ("main", 2, 20.0), ("aux", 3, 30.0)]
    db.close()


def test_writer_commits_in_order_and_returns_tags(tmp_path):
    path = str(tmp_path / "w.db")
    db = Database(path, METERS)
    writer = Writer(db)
    for k in range(5):
        writer.submit(k, readings(100, k * 100), None, None, {"ingest-a": k})
    writer.close()
    assert writer.completed() == [0, 1, 2, 3, 4]
    assert writer.in_flight == 0
    db.close()
    # committed: another connection sees every row and the last applied number
    check = sqlite3.connect(path)
    assert check.execute("SELECT count(*) FROM readings").fetchone()[0] == 500
    assert check.execute("SELECT seq FROM applied").fetchone()[0] == 4


def test_a_failed_write_is_raised_on_the_callers_thread(tmp_path):
    db = Database(str(tmp_path / "w.db"), METERS)
    writer = Writer(db)
    bad = (np.array([5]), np.array([1]), np.array([1.0]))  # meter index 5: no such meter
    writer.submit("bad", bad, None, None)
    writer.thread.join(timeout=10)  # the writer stops at the failure
    assert not writer.thread.is_alive()
    assert writer.completed() == []
    with pytest.raises(RuntimeError, match="database write failed"):
        writer.check()
    with pytest.raises(RuntimeError, match="database write failed"):
        writer.submit("next", readings(1), None, None)
    writer.close()  # returns at once: the thread has stopped
    db.close()


def test_close_returns_when_the_writer_fails_with_a_full_queue(tmp_path):
    db = Database(str(tmp_path / "w.db"), METERS)
    writer = Writer(db, depth=1)
    bad = (np.array([5]), np.array([1]), np.array([1.0]))
    writer.submit("ok", readings(300_000), None, None)  # slow enough for the queue to fill
    writer.submit("bad", bad, None, None)
    with contextlib.suppress(RuntimeError):  # (raised if the failure came first)
        writer.submit("never", readings(10, 300_000), None, None)  # waits in the full queue
    writer.close()  # must not wait forever for a thread that has stopped
    assert writer.completed() == ["ok"]
    with pytest.raises(RuntimeError, match="database write failed"):
        writer.check()
    db.close()


def test_statements_fit_a_small_parameter_limit(tmp_path):
    # SQLite before 3.32 allowed 999 parameters per statement: 5 columns -> 199 rows at most
    db = Database(str(tmp_path / "w.db"), METERS)
    db.conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)
    db.max_params = 999
    cols = {"circuit": np.array([b"main"] * 1234), "v_meter": np.array([b"10.0.0.1"] * 1234),
            "a_meter": np.array([b"10.0.0.2"] * 1234), "ts_us": np.arange(1234),
            "watts": np.ones(1234), "volts": np.ones(1234), "amps": np.ones(1234)}
    db.write(readings(2345), [cols], None)
    assert db.conn.execute("SELECT count(*) FROM readings").fetchone()[0] == 2345
    assert db.conn.execute("SELECT count(*) FROM power").fetchone()[0] == 1234
    db.close()
