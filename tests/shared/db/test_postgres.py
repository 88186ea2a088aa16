"""What only the PostgreSQL backend has, on a real private server (tests/pg.py): several
replicas writing at once (the same batches, overlapping rollup rows, one sender's lines in two
batches), time partitions made and dropped, the binary COPY fast path against psycopg's own
rows, and a full disk (a real one: a tablespace on a small tmpfs)."""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.config import Meter
from shared.db import (
    HOUR_US,
    MINUTE_US,
    DiskFull,
    NotReady,
    PowerBatch,
    RawBatch,
    Retention,
    open_database,
)
from shared.db.postgres import DAY_US, PostgresDatabase, copy_binary, shown_url
from tests.shared.db.conftest import T0

METERS = (Meter("10.0.0.1", "V", 0.0, 110.0), Meter("10.0.0.2", "A", 0.0, 5.0))
IPS = [m.ip for m in METERS]


def batch(source: str, seq: int, n: int = 400, base: int = 0, step_us: int = 1000,
          start: int | None = None) -> RawBatch:
    k = np.arange(seq * n if start is None else start, (seq * n if start is None else start) + n)
    return RawBatch(source, seq, base, (k % 2).astype(np.int64), T0 + k * step_us, k * 0.5)


def stored(db) -> Counter:
    cols = db.readings(IPS, 0, 2**62)
    return Counter(zip(cols["meter"].tolist(), cols["ts_us"].tolist(), cols["value"].tolist(),
                       strict=True))


def expected(batches) -> Counter:
    return Counter((IPS[m].encode(), t, v) for b in batches
                   for m, t, v in zip(b.meter.tolist(), b.ts_us.tolist(), b.value.tolist(),
                                      strict=True))


def both(*jobs) -> list:
    """Run the jobs on threads of their own, released together; their results (a failure is
    raised here)."""
    start = threading.Barrier(len(jobs))
    results: list = [None] * len(jobs)
    failures: list[BaseException] = []

    def run(i, job) -> None:
        try:
            start.wait(10)
            results[i] = job()
        except BaseException as exc:  # raised below, on the test's thread
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(i, j)) for i, j in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    if failures:
        raise failures[0]
    return results


def rollup_rows(db, res: str) -> int:
    return int(db.rollup("readings", res, IPS, 0, 2**62)["n"].sum())


# ---- several replicas at once ------------------------------------------------------------

@pytest.mark.parametrize("order", ["same", "reversed"])
def test_two_replicas_writing_the_same_batches_store_every_row_once(pg_url, order):
    a, b = open_database(pg_url, METERS), open_database(pg_url, METERS)
    n = 30
    seqs_b = list(range(n)) if order == "same" else list(range(n))[::-1]

    def phase1(db, seqs, group):
        out = []
        for i in range(0, len(seqs), group):
            chunk = [batch("s", q) for q in seqs[i : i + group]]
            out += list(zip([q for q in seqs[i : i + group]], db.write(chunk), strict=True))
        return out

    # phase 1: every batch from both replicas (none acknowledged yet: base 0)
    got = both(lambda: phase1(a, list(range(n)), 3), lambda: phase1(b, seqs_b, 2))
    # phase 2: new batches whose base says everything before them is applied (true: each
    # replica writes them in order, and one write of the previous has committed), so the
    # keys under the low mark are pruned while the other replica inserts those same keys;
    # b also sends phase 1's batches again meanwhile

    def phase2(db, resend):
        out = []
        for q in range(n, 2 * n):
            out += list(zip([q], db.write([batch("s", q, base=q)]), strict=True))
            if resend:
                old = (q * 7) % n
                out += list(zip([old], db.write([batch("s", old)]), strict=True))
        return out

    got2 = both(lambda: phase2(a, False), lambda: phase2(b, True))
    applied = Counter(q for part in got + got2 for q, ok in part if ok)
    assert applied == Counter(range(2 * n))  # each batch applied by exactly one replica
    everything = [batch("s", q) for q in range(2 * n)]
    assert stored(a) == expected(everything)
    assert a.totals()["readings"] == 2 * n * 400
    assert rollup_rows(a, "1m") == rollup_rows(a, "1h") == 2 * n * 400
    assert a.low_marks()["s"] == 2 * n - 2
    a.close()
    b.close()


def test_overlapping_rollup_rows_in_opposite_orders_never_fail(pg_url):
    """Each write of either replica touches the same rollup rows (both meters, the same
    minutes and hours) and the same totals, in opposite orders of time: with locks taken in
    one order there is no deadlock (none retried, none failed). (No senders here: their
    locks would serialize the two before the rollups.)"""
    a, b = open_database(pg_url, METERS), open_database(pg_url, METERS)
    rounds, n = 25, 600

    def spread(source: str, seq: int, forward: bool) -> RawBatch:
        k = np.arange(n)
        t = T0 + (k * 997 % n) * 6 * MINUTE_US // 10  # six hours, every minute hit
        if not forward:
            t = t[::-1].copy()
        return RawBatch(source, seq, 0, (k % 2).astype(np.int64), t, np.full(n, 1.0))

    def run(db, source, forward):
        for r in range(rounds):
            assert db.write([spread(source, r, forward), spread(source + "'", r, forward)]) \
                == [True, True]

    both(lambda: run(a, "fwd", True), lambda: run(b, "back", False))
    assert a.totals()["readings"] == 4 * rounds * n
    assert rollup_rows(a, "1m") == rollup_rows(a, "1h") == 4 * rounds * n
    assert a.state["write_retries"] == b.state["write_retries"] == 0
    a.close()
    b.close()


def test_one_senders_lines_in_two_batches_at_once_are_stored_once(pg_url):
    """The acknowledged mode: a sender resends lines after a reconnect, in a batch of another
    ingest stream, while a replica applies the first batch: each line goes in once."""
    a, b = open_database(pg_url, METERS), open_database(pg_url, METERS)

    def numbered(source: str, seq: int, lines: range) -> RawBatch:
        k = np.array(lines)
        bt = RawBatch(source, seq, 0, (k % 2).astype(np.int64), T0 + k * 1000, k * 1.0)
        bt.senders = ["meter-1"]
        bt.reading_sender = np.zeros(len(k), np.int64)
        bt.reading_no = k.astype(np.int64)
        return bt

    for r in range(20):  # each round: lines 1000r..1000r+999 twice, overlapping by half
        lo = 1000 * r
        got = both(lambda lo=lo, r=r: a.write([numbered("x", r, range(lo, lo + 1000))]),
                   lambda lo=lo, r=r: b.write([numbered("y", r, range(lo + 500, lo + 1000))]))
        assert got == [[True], [True]]
    assert stored(a) == expected([numbered("x", r, range(1000 * r, 1000 * r + 1000))
                                  for r in range(20)])
    assert a.totals()["readings"] == 20_000
    a.close()
    b.close()


@pytest.mark.parametrize("url, shown", [
    ("postgresql://u:s%40cret@db.example:5432/w", "postgresql://u:***@db.example:5432/w"),
    ("postgresql://u@/w?host=/run/pg&password=s3&port=1",
     "postgresql://u@/w?host=/run/pg&password=***&port=1"),
    ("postgres://db.example/w", "postgres://db.example/w"),
])
def test_the_url_shown_in_logs_has_no_password(url, shown):
    assert shown_url(url) == shown


def power_points(ts: list[int], watts: float) -> dict:
    n = len(ts)
    return {"circuit": np.array([b"main"] * n), "v_meter": np.array([b"10.0.0.1"] * n),
            "a_meter": np.array([b"10.0.0.2"] * n), "ts_us": np.array(ts, np.int64),
            "watts": np.full(n, watts), "volts": np.full(n, 10.0), "amps": np.full(n, watts / 10)}


@pytest.mark.parametrize("first", ["stale", "fresh"])
def test_a_replicas_stale_rollup_never_overwrites_a_fresher_one(pg_url, first):
    """Every replica computes rollups: one read a minute before a correction, another after
    it; whichever stores first, the minute ends up with the corrected points."""
    a, b = open_database(pg_url, METERS), open_database(pg_url, METERS)
    m = T0 - T0 % MINUTE_US
    ts = [m + k * 1_000_000 for k in range(10)]
    a.write([PowerBatch(power_points(ts, 100.0))])

    def computed(db) -> tuple[list, float]:
        read_at = time.time()
        return [(c, t, db.power_minute(c, t)) for c, t in db.dirty_power_minutes(2e9)], read_at

    stale = computed(a)
    b.write([PowerBatch(power_points(ts, 300.0))])  # the correction, after a's read
    fresh = computed(b)
    for db, rows in ((a, stale), (b, fresh))[:: 1 if first == "stale" else -1]:
        db.store_power_rollups(*rows)
    while a.rollup_step(2e9):
        pass
    got = a.rollup("power", "1m", ["main"], 0, 2**62)
    assert (got["t"].tolist(), got["sum"].tolist()) == ([m], [3000.0])
    assert got["wh"].tolist() == [pytest.approx(300 * 9 / 3600)]
    assert a.rollup("power", "1h", ["main"], 0, 2**62)["sum"].tolist() == [3000.0]
    assert a.dirty_power_minutes(2e9) == []
    a.close()
    b.close()


# ---- partitions ----------------------------------------------------------------------------

def partitions(url: str, table: str) -> list[str]:
    with psycopg.connect(url) as conn:
        return sorted(r[0] for r in conn.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = %s::regclass", (table,)))


def test_a_partition_per_day_and_retention_drops_whole_days_with_exact_totals(pg_url):
    retention = Retention(readings_days=2, power_days=2, rejected_days=2, rollup_1m_days=0,
                          rollup_1h_days=0)
    db = open_database(pg_url, METERS, retention=retention)
    b = batch("s", 0, n=3 * 24 * 6, step_us=10 * MINUTE_US)  # three days from T0 (noon)
    t_recv = (T0 + np.array([0, 1, 1, 2]) * DAY_US) / 1e6
    b.rejected = [(t, "p", reason, "m", b"x") for t, reason in
                  zip(t_recv.tolist(), ["malformed", "malformed", "unknown_meter", "malformed"],
                      strict=True)]
    db.write([b, PowerBatch({"circuit": np.array([b"c"] * 3), "v_meter": np.array([b"a"] * 3),
                             "a_meter": np.array([b"b"] * 3),
                             "ts_us": T0 + np.arange(3) * DAY_US, "watts": np.ones(3),
                             "volts": np.ones(3), "amps": np.ones(3)})])
    assert partitions(pg_url, "readings") == ["readings_p20240427", "readings_p20240428",
                                              "readings_p20240429", "readings_p20240430"]
    assert len(partitions(pg_url, "rejected")) == 3
    now = T0 + 4 * DAY_US  # 2024-05-01 noon: cutoff 04-29 noon, the 27th and 28th are due
    removed = [db.retention_step(now) for _ in range(3)]
    assert [r["readings"] for r in removed] == [72, 144, 0]  # T0 is noon: half a day first
    assert [r["rejected"] for r in removed] == [1, 2, 0]
    assert partitions(pg_url, "readings")[:2] == ["readings_p20240429", "readings_p20240430"]
    t = db.totals()
    assert (t["readings"], t["rejected"], t["rejected.malformed"], t["rejected.unknown_meter"]) \
        == (3 * 24 * 6 - 216, 1, 1, 0)
    assert t["readings"] == len(db.readings(IPS, 0, 2**62)["ts_us"])
    assert db.power(["c"], 0, 2**62)["ts_us"].tolist() == [T0 + 2 * DAY_US]
    # made ahead: the partitions of now and the next day
    assert {"readings_p20240501", "readings_p20240502"} <= set(partitions(pg_url, "readings"))
    db.close()


def test_a_partition_dropped_by_another_replica_is_made_again(pg_url):
    a = open_database(pg_url, METERS)
    b = open_database(pg_url, METERS, retention=Retention(readings_days=1))
    a.write([batch("s", 0, n=10)])  # a knows T0's partition now
    assert b.retention_step(T0 + 3 * DAY_US)["readings"] == 10  # b drops it
    assert a.write([batch("s", 1, n=10)]) == [True]  # a's COPY finds none: made again, retried
    assert a.state["write_retries"] == 1
    assert stored(a) == expected([batch("s", 1, n=10)])
    assert a.totals()["readings"] == 10
    a.close()
    b.close()


def test_two_replicas_running_retention_at_once_drop_each_day_once(pg_url):
    retention = Retention(readings_days=1, power_days=0, rejected_days=0, rollup_1m_days=0,
                          rollup_1h_days=0)
    a = open_database(pg_url, METERS, retention=retention)
    b = open_database(pg_url, METERS, retention=retention)
    a.write([batch("s", 0, n=5 * 24, step_us=HOUR_US)])  # five days from noon: six partitions
    now = T0 + 10 * DAY_US
    got = both(lambda: [a.retention_step(now)["readings"] for _ in range(6)],
               lambda: [b.retention_step(now)["readings"] for _ in range(6)])
    assert sum(got[0]) + sum(got[1]) == 5 * 24
    assert a.totals()["readings"] == 0
    assert not [p for p in partitions(pg_url, "readings") if p < "readings_p20240507"]
    a.close()
    b.close()


def test_an_existing_database_keeps_its_partition_width(pg_url):
    PostgresDatabase(pg_url, METERS, partition_days=1 / 24).close()  # hourly
    db = PostgresDatabase(pg_url, METERS)  # asks for daily: the database says hourly
    db.write([batch("s", 0, n=3, step_us=HOUR_US)])
    assert partitions(pg_url, "readings")[:3] == ["readings_p20240427_1200",
                                                  "readings_p20240427_1300",
                                                  "readings_p20240427_1400"]
    db.close()


def test_schema_2_is_migrated_and_readers_wait_for_it(pg_url):
    db = open_database(pg_url, METERS)
    db.write([PowerBatch(power_points([T0, T0 + 1], 5.0))])
    db.close()
    with psycopg.connect(pg_url, autocommit=True) as conn:  # as the first backend left it
        conn.execute("DROP TABLE power_dirty, power_progress")
        conn.execute("UPDATE totals SET name = 'power' WHERE name = 'power_writes'")
        conn.execute("UPDATE wattflow_schema SET version = 2")
    with pytest.raises(NotReady):
        open_database(pg_url, writer=False)
    open_database(pg_url, METERS).close()  # storage starts: migrated
    reader = open_database(pg_url, writer=False)
    assert reader.totals()["power_writes"] == 2 and "power" not in reader.totals()
    assert reader.progress() == {} and reader.newest_power(["main"]) == {"main": T0 + 1}
    reader.close()


# ---- the fast path against psycopg's own binary rows -------------------------------------

@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.tuples(st.integers(-2**31, 2**31 - 1), st.integers(-2**63, 2**63 - 1),
                               st.floats(allow_nan=True, allow_infinity=True)), max_size=60))
def test_copy_binary_matches_psycopgs_write_row(pg_url, rows):
    with psycopg.connect(pg_url, autocommit=True) as conn:
        for t in ("fast", "ref"):
            conn.execute(f"CREATE TEMP TABLE IF NOT EXISTS {t} (i int8, a int4, b int8, c float8)")
            conn.execute(f"TRUNCATE {t}")
        cols = [np.arange(len(rows)), *(np.array([r[j] for r in rows], dt) for j, dt in
                                        enumerate((np.int32, np.int64, np.float64)))]
        with conn.cursor().copy("COPY fast FROM STDIN (FORMAT BINARY)") as copy:
            copy.write(copy_binary(cols, ["int8", "int4", "int8", "float8"]))
        with conn.cursor().copy("COPY ref FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(["int8", "int4", "int8", "float8"])
            for i, r in enumerate(rows):
                copy.write_row((i, *r))
        fast = conn.execute("SELECT a, b, c FROM fast ORDER BY i").fetchall()
        ref = conn.execute("SELECT a, b, c FROM ref ORDER BY i").fetchall()
    assert len(fast) == len(ref) == len(rows)
    for f, r in zip(fast, ref, strict=True):
        assert f[:2] == r[:2]
        assert (math.isnan(f[2]) and math.isnan(r[2])) or (
            f[2] == r[2] and math.copysign(1, f[2]) == math.copysign(1, r[2]))


# ---- a full disk -------------------------------------------------------------------------

@pytest.fixture
def small_tablespace(postgres_server, tmp_path):
    """A database whose files live on a real filesystem of 24 MB (a tmpfs, as a tablespace;
    the server's WAL stays on the big disk): its URL and the mount point."""
    if postgres_server is None:
        pytest.skip("no PostgreSQL server")
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root")
    mnt = Path(f"{postgres_server.dir}/small")
    subprocess.run(["mkdir", str(mnt)], check=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], check=True)
    space = mnt / "space"
    space.mkdir()
    uid, gid = postgres_server._ids()
    os.chown(space, uid, gid)
    with psycopg.connect(postgres_server.url(), autocommit=True) as conn:
        conn.execute(f"CREATE TABLESPACE small LOCATION '{space}'")
        conn.execute("CREATE DATABASE fulldisk TABLESPACE small")
    url = postgres_server.url("fulldisk")
    try:
        yield url, mnt
    finally:
        postgres_server.drop_database(url)
        with psycopg.connect(postgres_server.url(), autocommit=True) as conn:
            conn.execute("DROP TABLESPACE IF EXISTS small")
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(directory: Path) -> Path:
    filler = directory / "filler"
    with open(filler, "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 65536)
            f.flush()
    return filler


def test_full_disk_raises_diskfull_and_the_same_batches_go_in_later(small_tablespace):
    url, mnt = small_tablespace
    db = open_database(url, METERS)
    db.write([batch("s", 0, n=2000)])
    failed = None

    def numbered(seq: int, lines: range) -> RawBatch:  # the acknowledged mode
        b = batch("t", seq, n=len(lines), start=lines[0])
        b.senders = ["meter-1"]
        b.reading_sender = np.zeros(len(lines), np.int64)
        b.reading_no = np.array(lines, np.int64)
        return b

    db.write([numbered(0, range(0, 10))])
    filler = fill(mnt)
    with pytest.raises(DiskFull):
        for seq in range(1, 400):  # lines 10 seq - 5 .. 10 seq + 9: the first 5 are in
            failed = [batch("s", seq, n=2000), numbered(seq, range(10 * seq - 5, 10 * seq + 10))]
            db.write(failed)
    # as it came (drop_resent's filtering put back: the next try filters and counts again)
    assert (len(failed[1].meter), len(failed[1].reading_no), failed[1].resent) == (15, 15, 0)
    filler.unlink()  # space returns
    assert db.write(failed) == [True, True]  # the same objects, as storage's writer retries
    assert failed[1].resent == 5 and len(failed[1].meter) == len(failed[1].reading_no) == 10
    seq = failed[0].seq
    assert db.totals()["readings"] == 2000 * (seq + 1) + 10 * (seq + 1)
    assert stored(db) == expected([batch("s", q, n=2000) for q in range(seq + 1)]
                                  + [batch("t", 0, n=10 * (seq + 1), start=0)])
    db.close()
