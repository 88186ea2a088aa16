"""What only the SQLite backend has: a bounded WAL under a writer that never pauses, a full disk
(a real one: a small tmpfs), and the migration from schema 1."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from services.storage.writer import Writer
from shared.config import Circuit, Meter
from shared.db import DiskFull, PowerBatch, RawBatch
from shared.db.sqlite import SqliteDatabase
from tests.conftest import small_filesystem
from tests.shared.db.conftest import T0

METERS = (Meter("10.0.0.1", "V", 0.0, 110.0), Meter("10.0.0.2", "A", 0.0, 5.0))


def batch(seq: int, n: int = 2000) -> RawBatch:
    k = np.arange(seq * n, (seq + 1) * n)
    return RawBatch("s", seq, 0, (k % 2).astype(np.int64), T0 + k * 1000, k * 0.25)


def test_wal_stays_bounded_under_a_writer_that_never_pauses(tmp_path):
    path = str(tmp_path / "w.db")
    db = SqliteDatabase(path, METERS, wal_max_mb=2)
    stop = threading.Event()

    def reader() -> None:  # short read transactions, as the dashboard or power would make
        conn = sqlite3.connect(path, timeout=5)
        while not stop.is_set():
            conn.execute("SELECT count(*) FROM readings_1m").fetchone()
        conn.close()

    t = threading.Thread(target=reader)
    t.start()
    biggest = 0
    try:
        for seq in range(300):  # ~600k rows, several times the bound in WAL frames
            db.write([batch(seq)])
            biggest = max(biggest, os.stat(path + "-wal").st_size)
    finally:
        stop.set()
        t.join()
    state = db.upkeep_state()
    db.close()
    assert state["wal_restarts"] > 0
    # the bound plus what one transaction adds before the next looks at the size
    assert biggest < 2 * (1 << 20) + 1.5 * (1 << 20), biggest


@pytest.fixture
def small_disk(tmp_path):
    """A real filesystem of 6 MB."""
    with small_filesystem(tmp_path, 6) as mnt:
        yield mnt


def fill(directory: Path) -> Path:
    """Take every free byte of the filesystem with one file."""
    filler = directory / "filler"
    with open(filler, "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 65536)
            f.flush()
    return filler


def test_full_disk_fails_the_write_cleanly_and_checkpoints_recover(small_disk):
    path = str(small_disk / "w.db")
    db = SqliteDatabase(path, METERS, wal_max_mb=64)
    db.write([batch(0)])
    filler = fill(small_disk)
    with pytest.raises(DiskFull):
        for seq in range(1, 200):
            db.write([batch(seq)])
    failed_seq = seq
    # the checkpoint thread fails too: the WAL's pages past the file's end cannot be copied in
    deadline = time.monotonic() + 10
    while db.upkeep_state()["checkpoint_failing"] is None:
        assert time.monotonic() < deadline, "checkpoints did not fail on a full disk"
        time.sleep(0.05)
    filler.unlink()  # space returns
    assert db.write([batch(failed_seq)]) == [True]  # the batch that failed, now written
    deadline = time.monotonic() + 40
    while db.upkeep_state()["checkpoint_failing"] is not None:
        assert time.monotonic() < deadline, "checkpoints did not recover"
        time.sleep(0.1)
    assert db.upkeep_state()["checkpoint_failures"] >= 1
    readings = db.totals()["readings"]
    db.close()
    assert readings == 2000 * (failed_seq + 1)  # every batch committed, none twice


def test_writer_holds_a_batch_while_the_disk_is_full_and_writes_it_later(small_disk):
    path = str(small_disk / "w.db")
    db = SqliteDatabase(path, METERS)
    writer = Writer(db, retention=False)
    filler = fill(small_disk)
    for seq in range(3):  # one being written, two waiting: submit would block on the next
        writer.submit(seq, [batch(seq)])
    deadline = time.monotonic() + 30
    while writer.disk_full is None:
        assert time.monotonic() < deadline, "the writer never noticed the full disk"
        time.sleep(0.05)
    done_while_full = writer.completed()
    filler.unlink()
    for seq in range(3, 6):
        writer.submit(seq, [batch(seq)])
    writer.close()
    writer.check()  # no failure: the full disk was waited out
    done = done_while_full + writer.completed()
    assert [tag for tag, _ in done] == list(range(6))
    assert all(applied == [True] for _, applied in done)
    assert db.totals()["readings"] == 6 * 2000
    db.close()


SCHEMA_1 = """
CREATE TABLE meters (id INTEGER PRIMARY KEY, ip TEXT NOT NULL UNIQUE, unit TEXT NOT NULL,
    range_start REAL NOT NULL, range_stop REAL NOT NULL);
CREATE TABLE readings (meter_id INTEGER NOT NULL REFERENCES meters(id), ts_us INTEGER NOT NULL,
    value REAL NOT NULL);
CREATE INDEX readings_meter_ts ON readings (meter_id, ts_us);
CREATE TABLE circuits (id INTEGER PRIMARY KEY, name TEXT NOT NULL, v_meter TEXT NOT NULL,
    a_meter TEXT NOT NULL, UNIQUE (name, v_meter, a_meter));
CREATE TABLE power (circuit_id INTEGER NOT NULL REFERENCES circuits(id), ts_us INTEGER NOT NULL,
    watts REAL NOT NULL, volts REAL NOT NULL, amps REAL NOT NULL);
CREATE INDEX power_circuit_ts ON power (circuit_id, ts_us);
CREATE VIEW power_view AS SELECT c.name AS circuit, p.ts_us AS ts_us, p.watts AS watts
    FROM power p JOIN circuits c ON c.id = p.circuit_id;
CREATE TABLE rejected (t_recv REAL NOT NULL, peer TEXT NOT NULL, reason TEXT NOT NULL,
    message TEXT NOT NULL, line BLOB NOT NULL);
CREATE TABLE applied (source TEXT PRIMARY KEY, seq INTEGER NOT NULL);
INSERT INTO meters VALUES (1, '10.0.0.1', 'V', 0, 110), (2, '10.0.0.2', 'A', 0, 5);
INSERT INTO readings VALUES (1, 1000, 230.0), (2, 1000, 2.0), (2, 61000000, 3.0);
INSERT INTO circuits VALUES (1, 'c', '10.0.0.1', '10.0.0.2');
INSERT INTO power VALUES (1, 1000, 460.0, 230.0, 2.0), (1, 1000, 460.0, 230.0, 2.0),
    (1, 2000, 10.0, 5.0, 2.0);
INSERT INTO rejected VALUES (1.0, 'p', 'malformed', 'm', X'00');
INSERT INTO applied VALUES ('ingest-old', 41);
"""


def test_schema_1_is_migrated_keeping_the_data(tmp_path):
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.executescript(SCHEMA_1)
    conn.close()
    db = SqliteDatabase(str(path), METERS)
    assert db.totals() == {"readings": 3, "power_writes": 2, "rejected": 1,
                           "rejected.malformed": 1}
    assert db.power(["c"], 0, 10**9)["ts_us"].tolist() == [1000, 2000]  # the twin is one now
    assert db.low_marks() == {"ingest-old": 41}
    assert db.write([RawBatch("ingest-old", 41, 0, np.zeros(1, np.int64), np.ones(1, np.int64),
                              np.ones(1))]) == [False]  # applied under schema 1
    assert db.rollup("readings", "1m", ["10.0.0.2"], 0, 10**9)["n"].tolist() == [1, 1]
    db.close()
    again = SqliteDatabase(str(path), METERS)  # a second start finds schema 2: nothing to do
    assert again.totals()["readings"] == 3
    again.close()


# ---- power rollups kept as points are written, against the recompute from the rows ----------

CIRCUITS = ("main", "aux")
HOUR0 = T0 - T0 % 3_600_000_000 + 3_600_000_000 - 90_000_000  # 90 s before an hour starts


def _power(circuit: str, ts: list[int], watts: list[float]) -> dict:
    n = len(ts)
    return {"circuit": np.array([circuit.encode()] * n, "S"),
            "v_meter": np.array([b"10.0.0.1"] * n), "a_meter": np.array([b"10.0.0.2"] * n),
            "ts_us": np.array(ts, np.int64), "watts": np.array(watts, np.float64),
            "volts": np.full(n, 10.0), "amps": np.array(watts, np.float64) / 10.0}


def _rollup_rows(db, table: str) -> dict[tuple[int, int], tuple]:
    return {(c, t): rest for c, t, *rest in db.conn.execute(
        f"SELECT circuit_id, t, n, sum, min, max, wh FROM {table}")}


def _check_settled_rollups_match_the_rows(db) -> None:
    """Every minute not waiting for its recompute has the rollup ``power_minute`` computes
    from the stored points (none if it has no points); every hour without such a minute is
    its minutes' sum (min and max: theirs)."""
    waiting = set(db.conn.execute("SELECT circuit_id, t FROM power_dirty"))
    minutes = _rollup_rows(db, "power_1m")
    with_points = set(db.conn.execute(
        "SELECT DISTINCT circuit_id, ts_us - ts_us % 60000000 FROM power"))
    for key in (set(minutes) | with_points) - waiting:
        want, got = db.power_minute(*key), minutes.get(key)
        assert (got is None) == (want is None), (key, got, want)
        if want is not None:
            assert got[:4] == pytest.approx(want[:4], rel=1e-9), key
            assert got[4] == pytest.approx(want[4], rel=1e-9, abs=1e-12), key
    hours = _rollup_rows(db, "power_1h")
    waiting_hours = {(c, t - t % 3_600_000_000) for c, t in waiting}
    for (c, h), got in hours.items():
        if (c, h) in waiting_hours:
            continue
        mine = [v for (cc, t), v in minutes.items() if cc == c and h <= t < h + 3_600_000_000]
        assert got[0] == sum(m[0] for m in mine)
        assert got[1] == pytest.approx(sum(m[1] for m in mine), rel=1e-9)
        assert got[4] == pytest.approx(sum(m[4] for m in mine), rel=1e-9, abs=1e-12)
        assert (got[2], got[3]) == (min(m[2] for m in mine), max(m[3] for m in mine)), (c, h)


def rewrite(db, c: str, k: int, watts: float) -> None:
    """The newest ``k`` points of circuit ``c`` written again with ``watts``."""
    ts = [t for (t,) in db.conn.execute("SELECT ts_us FROM power_view WHERE circuit = ?"
                                        " ORDER BY ts_us DESC LIMIT ?", (c, k))]
    if ts:
        db.write([PowerBatch(_power(c, ts, [watts] * len(ts)))])


_step = st.one_of(
    # points after the newest: steps from 0.1 s to 8 s (some longer than the energy gap)
    st.tuples(st.just("append"), st.sampled_from(CIRCUITS),
              st.lists(st.integers(100_000, 8_000_000), min_size=1, max_size=30),
              st.floats(0, 5000)),
    # a point just before a minute starts, then points from just after (its hold crosses)
    st.tuples(st.just("edge"), st.sampled_from(CIRCUITS),
              st.lists(st.integers(100_000, 8_000_000), min_size=1, max_size=5),
              st.floats(0, 5000), st.integers(1, 4_000_000)),
    # points anywhere in the five minutes (late, or written again)
    st.tuples(st.just("anywhere"), st.sampled_from(CIRCUITS),
              st.lists(st.integers(0, 300_000_000).map(lambda x: x - x % 250_000),
                       min_size=1, max_size=10),
              st.floats(0, 5000)),
    # the newest points written again with other watts (a replaced point marks its minute)
    st.tuples(st.just("rewrite"), st.sampled_from(CIRCUITS), st.integers(1, 5),
              st.floats(0, 5000)),
    st.tuples(st.just("reopen")),
    st.tuples(st.just("replace"), st.sampled_from(CIRCUITS), st.integers(0, 300_000_000),
              st.integers(0, 60_000_000)),
    st.tuples(st.just("rollup")),
    # a rollup round that stores what it read before in-order points came (storage reads on
    # a thread of its own, and its writer stores the result between two writes)
    st.tuples(st.just("slow rollup"), st.sampled_from(CIRCUITS),
              st.lists(st.integers(100_000, 3_000_000), min_size=1, max_size=5),
              st.floats(0, 5000)))


@settings(max_examples=50, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(_step, min_size=1, max_size=25), near=st.sampled_from([1, 16]),
       run_gap=st.sampled_from([0, 250_000, 2**62]), halve_down_to=st.sampled_from([1, 3]),
       near_min=st.sampled_from([0, 8]), extremes_reads=st.sampled_from([0, 1, 100]))
# too many stored points between new ones (a minute starts 30 s after HOUR0): the run goes in
# halves, down to single points (the point 2 s before holds into the next minute)
@example(steps=[("anywhere", "main", [28_000_000, 30_750_000, 33_000_000], 100.0),
                ("anywhere", "main", [30_500_000, 31_000_000], 200.0)], near=1,
         run_gap=2**62, halve_down_to=1, near_min=8, extremes_reads=100)
@example(steps=[("anywhere", "main", [28_000_000, 30_750_000, 30_800_000, 30_900_000,
                                      33_000_000], 100.0),
                ("anywhere", "main", [30_500_000, 31_000_000], 200.0)], near=1,
         run_gap=2**62, halve_down_to=3, near_min=0, extremes_reads=0)
def test_power_rollups_kept_while_writing_match_the_recompute(tmp_path_factory, steps, near,
                                                             run_gap, halve_down_to,
                                                             near_min, extremes_reads):
    """The rollups storage adds as points arrive in order (``_roll_power``) against the plain
    definition, ``power_minute`` over the stored points, after any mix of in-order, late and
    rewritten points, recomputes (``replace_power``), restarts and rollup rounds; at the end,
    once every minute is recomputed, everything matches. ``near``: stored points read per
    new one at most (1: often too few, and the run goes in halves, down to
    ``halve_down_to`` points, then to the recompute); ``run_gap``: points further apart are
    rolled up apart (0: each point alone); ``near_min``: a run reads at least this many
    (and halves only while a run of ``halve_down_to`` points would read no more at the
    density read); ``extremes_reads``: a minute's min and max read
    again in the write at most this often, then it goes to the recompute."""
    path = str(tmp_path_factory.mktemp("roll") / "w.db")
    db = SqliteDatabase(path, METERS, checkpoints=False)

    def tune(db):
        db.near_rows_per_point, db.run_gap_us, db.near_rows_min = near, run_gap, near_min
        db.halve_down_to, db.extremes_reads_per_minute = halve_down_to, extremes_reads

    tune(db)
    newest = {c: HOUR0 for c in CIRCUITS}
    try:
        for step in steps:
            if step[0] == "slow rollup":  # (after a rewrite: the newest minute waits)
                rewrite(db, step[1], 1, 1.0)
                read_at = time.time()
                stale = [(c, t, db.power_minute(c, t)) for c, t in db.dirty_power_minutes(2e9)]
            if step[0] in ("append", "edge", "slow rollup"):
                _, c, gaps, w, *edge = step
                first = newest[c]
                if edge and step[0] == "edge":  # the newest point's hold crosses a minute
                    first = first - first % 60_000_000 + 120_000_000 - edge[0]
                    db.write([PowerBatch(_power(c, [first], [w]))])
                ts = (first + np.cumsum(gaps)).tolist()
                newest[c] = ts[-1]
                db.write([PowerBatch(_power(c, ts, [w + k for k in range(len(ts))]))])
            elif step[0] == "anywhere":
                _, c, offsets, w = step
                ts = [HOUR0 + o for o in offsets]  # (a time twice: the later point wins)
                newest[c] = max(newest[c], *ts)
                db.write([PowerBatch(_power(c, ts, [w + k for k in range(len(ts))]))])
            elif step[0] == "rewrite":
                rewrite(db, *step[1:])
            elif step[0] == "reopen":
                db.close()
                db = SqliteDatabase(path, METERS, checkpoints=False)
                tune(db)
            elif step[0] == "replace":
                _, c, start, length = step
                t0, t1 = HOUR0 + start, HOUR0 + start + length
                keep = [t for t in range(t0, t1 + 1, 7_000_000)]
                db.replace_power(Circuit(c, "10.0.0.1", "10.0.0.2"), t0, t1,
                                 _power(c, keep, [42.0] * len(keep)))
            elif step[0] == "rollup":
                db.rollup_step(2e9, settle_s=0)
            if step[0] == "slow rollup":
                db.store_power_rollups(stale, read_at)
            _check_settled_rollups_match_the_rows(db)
        while db.rollup_step(2e9, settle_s=0):
            pass
        assert not db.conn.execute("SELECT count(*) FROM power_dirty").fetchone()[0]
        _check_settled_rollups_match_the_rows(db)
    finally:
        db.close()


def test_late_points_spread_over_many_stored_ones_keep_the_rollups_without_a_recompute(tmp_path):
    """Late points 200 ms apart among 100 stored points each (late work under a backlog), and
    a minute's only minimum replaced: the run goes in halves and the minute's min and max are
    read again, so no minute waits for the recompute and every rollup matches
    ``power_minute``."""
    db = SqliteDatabase(str(tmp_path / "w.db"), METERS, checkpoints=False)
    try:
        ts = [HOUR0 + k * 2_000 for k in range(60_000)]  # 2 ms apart: two minutes
        watts = [100.0 + k % 7 for k in range(len(ts))]
        watts[14] = 10.0  # the first minute's only minimum
        db.write([PowerBatch(_power("main", ts, watts))])
        db.write([PowerBatch(_power("main", [HOUR0 + 3_000 + k * 200_000 for k in range(50)],
                                    [50.0 + k for k in range(50)]))])
        assert db.state.get("rollup_runs_halved", 0) > 0
        db.write([PowerBatch(_power("main", [ts[14]], [99.0]))])
        assert db.state.get("rollup_extremes_read", 0) == 1
        assert not db.conn.execute("SELECT count(*) FROM power_dirty").fetchone()[0]
        _check_settled_rollups_match_the_rows(db)
    finally:
        db.close()


def test_a_minute_whose_maximum_keeps_being_replaced_goes_to_the_recompute(tmp_path):
    """Under a rising trend every correction of the newest point lowers the minute's maximum,
    and each read of a minute's extremes scans it: after ``extremes_reads_per_minute`` reads
    the minute goes to the recompute instead, which then makes it exact."""
    db = SqliteDatabase(str(tmp_path / "w.db"), METERS, checkpoints=False)
    db.extremes_reads_per_minute = 4
    try:
        ts = [HOUR0 + k * 1_000 for k in range(1000)]
        db.write([PowerBatch(_power("main", ts, [float(k) for k in range(1000)]))])
        for i in range(6):  # the newest point corrected, still above the one before
            db.write([PowerBatch(_power("main", [ts[-1]], [998.9 - i / 10]))])
        reads = db.extremes_reads_per_minute
        assert db.state.get("rollup_extremes_read", 0) == reads
        assert db.state.get("rollup_recompute.min_max", 0) == 1  # then it waits for it:
        assert db.state.get("rollup_recompute.waiting", 0) == 6 - reads - 1
        assert db.conn.execute("SELECT count(*) FROM power_dirty").fetchone()[0] == 1
        _check_settled_rollups_match_the_rows(db)
        while db.rollup_step(2e9, settle_s=0):
            pass
        _check_settled_rollups_match_the_rows(db)
        assert db.rollup("power", "1m", ["main"], 0, 2**62)["max"].tolist() == [998.4]
    finally:
        db.close()
