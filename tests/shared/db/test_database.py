"""The database interface on a real backend (a SQLite file here; the same tests run on a real
PostgreSQL server where one is configured): idempotence keys, upserts, rollups, totals,
retention."""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import pytest

from shared.config import Circuit, Meter
from shared.db import (
    HOUR_US,
    MINUTE_US,
    NotReady,
    PowerBatch,
    RawBatch,
    Retention,
    open_database,
)
from tests.shared.db.conftest import T0

METERS = (Meter("10.0.0.1", "V", 0.0, 110.0), Meter("10.0.0.2", "A", 0.0, 5.0))
IPS = [m.ip for m in METERS]


def raw(source: str, seq: int, n: int, start: int = 0, base: int = 0, step_us: int = 1000,
        rejected: int = 0) -> RawBatch:
    k = np.arange(start, start + n)
    bad = [(1.0, "127.0.0.1:1", "malformed", "m", b"x%d" % i) for i in range(rejected)]
    return RawBatch(source, seq, base, (k % 2).astype(np.int64), T0 + k * step_us, k * 0.5,
                    bad)


def stored(db) -> Counter:
    cols = db.readings(IPS, 0, 2**62)
    return Counter(zip(cols["meter"].tolist(), cols["ts_us"].tolist(), cols["value"].tolist(),
                       strict=True))


def expected(*batches: RawBatch) -> Counter:
    return Counter((IPS[m].encode(), t, v) for b in batches
                   for m, t, v in zip(b.meter.tolist(), b.ts_us.tolist(), b.value.tolist(),
                                      strict=True))


@pytest.mark.parametrize("n", [1, 49, 50, 51, 999, 1000, 2051])
def test_every_row_of_a_batch_is_stored_once(db_url, n):
    # sizes around the statement shapes (many rows per INSERT, then smaller)
    db = open_database(db_url, METERS)
    b = raw("ingest-a", 0, n)
    assert db.write([b]) == [True]
    assert stored(db) == expected(b)
    assert db.totals()["readings"] == n
    db.close()


def test_a_batch_seen_again_is_skipped_in_any_order(db_url):
    db = open_database(db_url, METERS)
    b0, b1, b2 = raw("s", 0, 10, 0), raw("s", 1, 10, 10), raw("s", 2, 10, 20)
    assert db.write([b2, b0]) == [True, True]  # out of order is fine
    assert db.write([b0, b1, b2]) == [False, True, False]
    assert db.write([raw("other", 0, 5, 100)]) == [True]  # another stream, its own numbers
    assert stored(db) == expected(b0, b1, b2, raw("other", 0, 5, 100))
    assert db.totals()["readings"] == 35
    db.close()


def test_a_streams_first_batch_after_its_second_is_applied(db_url):
    # base 0: nothing of the stream is known applied (batches are numbered from 0), so no low
    # mark may cover batch 0 yet (two replicas commit a stream's batches in any order)
    db = open_database(db_url, METERS)
    assert db.write([raw("s", 1, 3, 3)]) == [True]
    assert db.write([raw("s", 0, 3)]) == [True]
    assert db.write([raw("s", 0, 3), raw("s", 1, 3, 3)]) == [False, False]
    assert db.totals()["readings"] == 6
    db.close()


def test_low_mark_from_base_makes_older_numbers_duplicates(db_url):
    db = open_database(db_url, METERS)
    db.write([raw("s", 0, 3), raw("s", 1, 3, 3)])
    db.write([raw("s", 5, 3, 6, base=2)])  # the sender says: everything below 2 is applied
    assert db.low_marks()["s"] == 1
    assert db.write([raw("s", 0, 3), raw("s", 1, 3, 3)]) == [False, False]
    assert db.write([raw("s", 5, 3, 6, base=2)]) == [False]
    assert db.totals()["readings"] == 9
    db.close()


def test_rejected_lines_count_by_reason(db_url):
    db = open_database(db_url, METERS)
    db.write([raw("s", 0, 4, rejected=3)])
    db.write([raw("s", 0, 4, rejected=3)])  # again: nothing more
    t = db.totals()
    assert (t["readings"], t["rejected"], t["rejected.malformed"]) == (4, 3, 3)
    db.close()


def power_cols(circuit: bytes, ts: list[int], watts: list[float]) -> dict:
    n = len(ts)
    return {"circuit": np.array([circuit] * n), "v_meter": np.array([b"10.0.0.1"] * n),
            "a_meter": np.array([b"10.0.0.2"] * n), "ts_us": np.array(ts, np.int64),
            "watts": np.array(watts), "volts": np.array([10.0] * n),
            "amps": np.array(watts) / 10.0}


def test_power_point_computed_again_replaces_the_old_one(db_url):
    db = open_database(db_url, METERS)
    db.write([PowerBatch(power_cols(b"main", [1, 2, 3], [10.0, 20.0, 30.0]))])
    db.write([PowerBatch(power_cols(b"main", [2, 4], [25.0, 40.0])),
              PowerBatch(power_cols(b"aux", [2], [5.0]))])
    got = db.power(["main", "aux"], 0, 10)
    assert list(zip(got["circuit"].tolist(), got["ts_us"].tolist(), got["watts"].tolist(),
                    strict=True)) == [(b"main", 1, 10.0), (b"main", 2, 25.0), (b"main", 3, 30.0),
                                      (b"main", 4, 40.0), (b"aux", 2, 5.0)]
    db.close()


def test_same_key_twice_in_one_batch_keeps_the_last(db_url):
    db = open_database(db_url, METERS)
    db.write([PowerBatch(power_cols(b"main", [7, 7], [1.0, 2.0]))])
    assert db.power(["main"], 0, 10)["watts"].tolist() == [2.0]
    db.close()


def test_rollups_match_the_readings_with_late_ones(db_url):
    db = open_database(db_url, METERS)
    rng = np.random.default_rng(1)
    batches = []
    for seq in range(6):  # readings over three hours, every batch scattered in time
        n = 500
        ts = T0 + rng.integers(0, 3 * HOUR_US, n)
        batches.append(RawBatch("s", seq, 0, rng.integers(0, 2, n), ts,
                                np.round(rng.uniform(0, 5, n), 3)))
    for b in batches:
        db.write([b])
    db.write(batches[:2])  # duplicates change nothing
    meter = np.concatenate([b.meter for b in batches])
    ts = np.concatenate([b.ts_us for b in batches])
    value = np.concatenate([b.value for b in batches])
    for res, width in (("1m", MINUTE_US), ("1h", HOUR_US)):
        got = db.rollup("readings", res, IPS, 0, 2**62)
        rows = {(n.decode(), t): (c, s, lo, hi) for n, t, c, s, lo, hi in zip(
            *(got[k].tolist() for k in ("name", "t", "n", "sum", "min", "max")), strict=True)}
        want = {}
        for m, t, v in zip(meter.tolist(), ts.tolist(), value.tolist(), strict=True):
            key = (IPS[m], t - t % width)
            c, s, lo, hi = want.get(key, (0, 0.0, np.inf, -np.inf))
            want[key] = (c + 1, s + v, min(lo, v), max(hi, v))
        assert rows.keys() == want.keys()
        for key, (c, s, lo, hi) in want.items():
            assert rows[key][0] == c and rows[key][2:] == (lo, hi)
            assert rows[key][1] == pytest.approx(s)
    db.close()


def test_retention_removes_old_rows_in_steps_and_keeps_the_rest(db_url):
    retention = Retention(readings_days=1, power_days=1, rejected_days=0, rollup_1m_days=2,
                          rollup_1h_days=0, step_rows=300)
    db = open_database(db_url, METERS, retention=retention)
    day = 86_400_000_000
    now = T0 + 10 * day
    old = raw("s", 0, 1000, step_us=60_000_000)  # ~17 hours, from T0 (ten days ago)
    new = RawBatch("s", 1, 0, np.zeros(10, np.int64), now - day // 2 + np.arange(10),
                   np.ones(10))
    db.write([old, new])
    db.write([PowerBatch(power_cols(b"main", [T0, now - 5], [1.0, 2.0]))])
    # PostgreSQL drops whole time partitions (a day each), one per table and step
    whole = {"readings", "power", "rejected"} if db_url.startswith("postgres") else set()
    steps = 0
    while True:
        removed = db.retention_step(now)
        assert all(n <= 300 for table, n in removed.items() if table not in whole)
        steps += 1
        if not any(removed.values()):
            break
        assert steps < 50
    assert steps > 3  # a little at a time
    assert stored(db) == expected(new)
    assert db.totals()["readings"] == 10
    assert db.power(["main"], 0, 2**62)["ts_us"].tolist() == [now - 5]
    assert db.rollup("readings", "1m", IPS, 0, now - 2 * day).get("t").size == 0
    assert db.rollup("readings", "1h", IPS, 0, 2**62)["n"].sum() == 1010  # kept forever
    db.close()


def test_power_rollups_hold_energy_and_follow_corrections(db_url):
    db = open_database(db_url, METERS)
    t0 = T0 - T0 % MINUTE_US + 50 * 1_000_000  # 50 s into a minute: the run spans two
    ts = [t0 + k * 100_000 for k in range(361)]  # 1 kW for 36 s, a point every 0.1 s
    db.write([PowerBatch(power_cols(b"main", ts, [1000.0] * 361))])
    far_later = 2e9
    while db.rollup_step(far_later):  # (SQLite adds in-order points as they come)
        pass
    got = db.rollup("power", "1m", ["main"], 0, 2**62)
    assert got["n"].sum() == 361
    assert got["wh"].sum() == pytest.approx(10.0)  # 1 kW x 36 s = 0.01 kWh
    assert db.rollup("power", "1h", ["main"], 0, 2**62)["wh"].sum() == pytest.approx(10.0)
    # a correction: the second half at 2 kW; a gap (no points for 10 s) adds no energy
    late = [t + 60_000_000 for t in range(t0, t0 + 1, 1)]
    db.write([PowerBatch(power_cols(b"main", ts[180:], [2000.0] * 181)),
              PowerBatch(power_cols(b"main", late, [5000.0]))])
    db.rollup_step(far_later)
    got = db.rollup("power", "1m", ["main"], 0, 2**62)
    assert got["wh"].sum() == pytest.approx(18 * 1000 / 3600 + 18 * 2000 / 3600)
    assert got["max"].max() == 5000.0
    db.close()


def test_progress_only_rises_and_replace_power_drops_stale_points(db_url):
    db = open_database(db_url, METERS)
    db.write([PowerBatch(power_cols(b"main", [1, 2, 3], [1.0, 2.0, 3.0]),
                         progress={"main": 2})])
    db.write([PowerBatch(power_cols(b"main", [4], [4.0]), progress={"main": 1})])
    assert db.progress() == {"main": 2}
    db.replace_power(Circuit("main", "10.0.0.1", "10.0.0.2"), 2, 4,
                     power_cols(b"main", [3], [30.0]))
    got = db.power(["main"], 0, 10)
    assert list(zip(got["ts_us"].tolist(), got["watts"].tolist(), strict=True)) == \
        [(1, 1.0), (3, 30.0)]
    assert db.totals()["power_writes"] == 4 + 1  # points written (a rewrite counts again)
    db.close()


def numbered(source: str, seq: int, lines: range, bad: tuple[int, ...] = ()) -> RawBatch:
    """A batch of the acknowledged mode: sender ``m1`` numbered these lines; those in
    ``bad`` were rejected lines (the rest readings)."""
    good = np.array([k for k in lines if k not in bad], np.int64)
    b = RawBatch(source, seq, 0, good % 2, T0 + good * 1000, good * 1.0,
                 [(1.0, "127.0.0.1:1", "malformed", "m", b"x%d" % k) for k in bad])
    b.senders = ["m1"]
    b.reading_sender, b.reading_no = np.zeros(len(good), np.int64), good
    b.rejected_sender, b.rejected_no = [0] * len(bad), list(bad)
    return b


def test_lines_a_sender_resent_are_skipped_readings_and_rejected_alike(db_url):
    db = open_database(db_url, METERS)
    first = numbered("a", 0, range(0, 10), bad=(3, 8))
    assert db.write([first]) == [True]
    again = numbered("b", 0, range(5, 15), bad=(8, 12))  # after a reconnect, another stream
    assert db.write([again]) == [True]
    assert again.resent == 5  # lines 5..9 were in
    assert again.reading_no.tolist() == [10, 11, 13, 14]  # every column filtered alike
    assert len(again.meter) == len(again.ts_us) == len(again.value) == 4
    assert (again.rejected_no, [r[4] for r in again.rejected]) == ([12], [b"x12"])
    t = db.totals()
    assert (t["readings"], t["rejected"]) == (12, 3)  # 15 lines, 0..14, each once
    assert stored(db) == expected(numbered("x", 0, range(0, 15), bad=(3, 8, 12)))
    db.close()


def test_a_reader_waits_for_the_schema_and_writes_nothing(db_url):
    for _ in range(2):  # nothing there yet (storage makes it), and a reader made nothing
        with pytest.raises(NotReady):
            open_database(db_url, METERS, writer=False)
    db = open_database(db_url, METERS[:1])
    db.write([RawBatch("s", 0, 0, np.zeros(2, np.int64), T0 + np.array([0, 2000]),
                       np.array([1.0, 2.0]))])
    reader = open_database(db_url, writer=False)
    assert reader.readings(IPS, 0, 2**62)["ts_us"].tolist() == [T0, T0 + 2000]
    assert reader.totals()["readings"] == 2
    assert reader.newest(IPS) == {IPS[0]: T0 + 2000} and reader.progress() == {}
    reader.close()
    db.close()


def test_newest_and_oldest_times(db_url):
    db = open_database(db_url, METERS)
    db.write([raw("s", 0, 10)])  # meter 0 at T0 + 0, 2, 4, 6, 8 ms; meter 1 at 1, 3, ...
    db.write([PowerBatch(power_cols(b"main", [T0 + 5, T0 + 9], [1.0, 2.0]))])
    assert db.newest(IPS + ["10.9.9.9"]) == {IPS[0]: T0 + 8000, IPS[1]: T0 + 9000}
    assert db.oldest(IPS) == {IPS[0]: T0, IPS[1]: T0 + 1000}
    assert db.oldest(IPS, after=T0 + 7000) == {IPS[0]: T0 + 8000, IPS[1]: T0 + 9000}
    assert db.oldest(IPS, after=T0 + 9000) == {}
    assert db.newest_power(["main", "aux"]) == {"main": T0 + 9}
    db.close()


def minute_rollups(db) -> dict[int, tuple]:
    got = db.rollup("power", "1m", ["main"], 0, 2**62)
    return {t: (n, s, wh) for t, n, s, wh in zip(
        *(got[k].tolist() for k in ("t", "n", "sum", "wh")), strict=True)}


def test_a_rollup_read_before_a_correction_is_done_again(db_url):
    db = open_database(db_url, METERS)
    m = T0 - T0 % MINUTE_US
    ts = [m + k * 1_000_000 for k in range(5)]
    db.write([PowerBatch(power_cols(b"main", ts, [100.0] * 5))])
    # (a recompute of circuits marks the minute for the rollup thread on both backends;
    # SQLite keeps plain writes' rollups as it writes)
    db.replace_power(Circuit("main", "10.0.0.1", "10.0.0.2"), m, m + MINUTE_US - 1,
                     power_cols(b"main", ts, [100.0] * 5))
    read_at = time.time()
    stale = [(cid, t, db.power_minute(cid, t)) for cid, t in db.dirty_power_minutes(2e9)]
    assert m in {t for _, t, _ in stale}
    db.write([PowerBatch(power_cols(b"main", ts, [200.0] * 5))])  # after the read
    db.store_power_rollups(stale, read_at)
    assert {t for _, t in db.dirty_power_minutes(2e9)} >= {m}  # still to do
    while db.rollup_step(2e9):
        pass
    assert minute_rollups(db) == {m: (5, 1000.0, pytest.approx(200 * 4 / 3600))}
    assert db.rollup("power", "1h", ["main"], 0, 2**62)["sum"].tolist() == [1000.0]
    db.close()


def test_replace_power_redoes_the_rollups_of_the_minutes_it_changes(db_url):
    db = open_database(db_url, METERS)
    m = T0 - T0 % MINUTE_US
    ts = [m + k * 1_000_000 for k in range(0, 120, 2)]  # two minutes, a point every 2 s
    db.write([PowerBatch(power_cols(b"main", ts, [100.0] * 60))])
    while db.rollup_step(2e9):
        pass
    assert sorted(minute_rollups(db)) == [m, m + MINUTE_US]
    main = Circuit("main", "10.0.0.1", "10.0.0.2")
    db.replace_power(main, m + MINUTE_US, m + 2 * MINUTE_US, power_cols(b"main", [], []))
    while db.rollup_step(2e9):
        pass
    # the second minute has no points left; the first's last point has no next one now
    assert minute_rollups(db) == {m: (30, 3000.0, pytest.approx(100 * 58 / 3600))}
    assert db.rollup("power", "1h", ["main"], 0, 2**62)["n"].tolist() == [30]
    db.close()
