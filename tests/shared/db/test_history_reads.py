"""The database reads behind the dashboard and export, on a real backend, each against a plain
reference on arbitrary input (hypothesis): ``buckets`` (rows aggregated per time bucket),
``held_wh`` (the rollups' energy over any range), ``iter_readings`` / ``iter_power`` (every row
of a range, a chunk at a time), and the dashboard's ``energy_wh`` that combines settled
rollups with rows."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.dashboard.history import buckets_reference, energy_reference, energy_wh
from shared.config import Meter
from shared.db import ENERGY_GAP_US, HOUR_US, MINUTE_US, PowerBatch, RawBatch, open_database
from tests.shared.db.conftest import T0

METERS = (Meter("10.0.0.1", "V", 0.0, 110.0), Meter("10.0.0.2", "A", 0.0, 5.0))
IPS = [m.ip for m in METERS]
EXAMPLE = settings(max_examples=60, deadline=None,
                   suppress_health_check=[HealthCheck.function_scoped_fixture])


def power_cols(circuit: str, ts, watts, a_meter: str = "10.0.0.2") -> dict:
    n = len(ts)
    return {"circuit": np.array([circuit.encode()] * n, "S"),
            "v_meter": np.array([b"10.0.0.1"] * n), "a_meter": np.array([a_meter.encode()] * n),
            "ts_us": np.array(ts, np.int64), "watts": np.array(watts, np.float64),
            "volts": np.full(n, 10.0), "amps": np.array(watts, np.float64) / 10.0}


@pytest.fixture
def db(db_url):
    """One database for all examples of a test; each example works in a region of time of
    its own (``region``), so earlier examples never disturb it."""
    d = open_database(db_url, METERS)
    d.regions = itertools.count(1)
    yield d
    d.close()


def region(db) -> int:
    """3 h apart: an example's points span at most 1.5 h (``power_example``), and on
    PostgreSQL several examples share a day's partition (a partition made per example costs
    more than the example)."""
    return T0 + next(db.regions) * 3 * HOUR_US


# offsets (µs) in a few minutes, with many ties, and values
offsets = st.lists(st.integers(0, 4 * MINUTE_US).map(lambda x: x - x % 997), max_size=120)
steps = st.sampled_from([1, 997, 250_000, 1_000_000, 7_000_000, MINUTE_US, 2 * MINUTE_US])


@EXAMPLE
@given(data=st.data(), step=steps)
def test_buckets_are_the_rows_aggregated(db, data, step):
    base = region(db)
    off = data.draw(offsets)
    meter = data.draw(st.lists(st.integers(0, 1), min_size=len(off), max_size=len(off)))
    value = data.draw(st.lists(st.floats(-1e6, 1e6), min_size=len(off), max_size=len(off)))
    db.write([RawBatch(f"s{base}", 0, 0, np.array(meter, np.int64),
                       base + np.array(off, np.int64), np.array(value))])
    lo = base + data.draw(st.integers(-MINUTE_US, 5 * MINUTE_US))
    hi = lo + data.draw(st.integers(0, 5 * MINUTE_US))
    got = db.buckets("readings", IPS, lo, hi, step)
    want = []
    for i, ip in enumerate(IPS):
        rows = db.readings([ip], lo, hi)
        assert len(rows["ts_us"]) == sum(1 for m, o in zip(meter, off, strict=True)
                                         if m == i and lo <= base + o <= hi)
        want += [(ip.encode(), *b) for b in buckets_reference(rows["ts_us"], rows["value"],
                                                               step)]
    cols = ("name", "t", "n", "sum", "min", "max", "first", "last")
    rows = list(zip(*(got[c].tolist() for c in cols), strict=True))
    assert [r[:3] + r[4:] for r in rows] == [w[:3] + w[4:] for w in want]
    assert [r[3] for r in rows] == pytest.approx([w[3] for w in want], rel=1e-9, abs=1e-6)


def power_example(db, data, circuit: str = "main") -> tuple[int, np.ndarray, np.ndarray]:
    """Points of one circuit with holds under and over the gap limit, stored."""
    base = region(db)
    gaps = data.draw(st.lists(st.sampled_from([1, 100_000, 999_999, ENERGY_GAP_US,
                                               ENERGY_GAP_US + 1, 20_000_000, 61_000_000]),
                              min_size=0, max_size=80))
    ts = base + np.cumsum([data.draw(st.integers(0, 3 * MINUTE_US))] + gaps).astype(np.int64)
    watts = np.array(data.draw(st.lists(st.floats(0, 5000), min_size=len(ts),
                                        max_size=len(ts))))
    db.write([PowerBatch(power_cols(circuit, ts, watts))])
    return base, ts, watts


def held_reference(ts: np.ndarray, watts: np.ndarray, t0: int, t1: int) -> float:
    total = 0.0
    for i in range(len(ts) - 1):
        if t0 <= ts[i] < t1 and ts[i + 1] - ts[i] <= ENERGY_GAP_US:
            total += watts[i] * (ts[i + 1] - ts[i])
    return total / 3.6e9


@EXAMPLE
@given(data=st.data())
def test_held_wh_is_the_rollups_energy_over_any_range(db, data):
    base, ts, watts = power_example(db, data)
    t0 = base + data.draw(st.integers(-MINUTE_US, 8 * MINUTE_US))
    t1 = t0 + data.draw(st.integers(0, 8 * MINUTE_US))
    got = db.held_wh(["main", "nothing"], t0, t1)
    assert got["nothing"] == 0
    assert got["main"] == pytest.approx(held_reference(ts, watts, t0, t1), rel=1e-9, abs=1e-9)


@EXAMPLE
@given(data=st.data())
def test_energy_from_rollups_and_rows_is_the_definition(db, data):
    # some minutes rolled up (settled), the rest not yet: the same answer either way
    while db.rollup_step(time.time() + 60, most=500):  # earlier examples' minutes: done
        pass
    base, ts, watts = power_example(db, data)
    db.rollup_step(time.time() + 60, most=data.draw(st.integers(0, 12)))
    a = base + data.draw(st.integers(-MINUTE_US, 8 * MINUTE_US))
    b = a + data.draw(st.integers(0, 10 * MINUTE_US))
    got = energy_wh(db, ["main"], a, b)["main"]
    assert got == pytest.approx(energy_reference(ts, watts, a, b), rel=1e-9, abs=1e-9)


@EXAMPLE
@given(data=st.data(), chunk=st.integers(1, 9))
def test_iter_readings_gives_every_row_once_in_chunks(db, data, chunk):
    base = region(db)
    off = data.draw(offsets)
    meter = data.draw(st.lists(st.integers(0, 1), min_size=len(off), max_size=len(off)))
    value = np.arange(len(off), dtype=np.float64)  # tells rows of one meter and time apart
    db.write([RawBatch(f"s{base}", 0, 0, np.array(meter, np.int64),
                       base + np.array(off, np.int64), value)])
    lo = base + data.draw(st.integers(-MINUTE_US, 3 * MINUTE_US))
    hi = lo + data.draw(st.integers(0, 4 * MINUTE_US))
    names = data.draw(st.permutations(IPS + ["10.9.9.9"]))
    parts = list(db.iter_readings(names, lo, hi, chunk))
    assert all(0 < len(p["ts_us"]) <= chunk for p in parts)
    got = [(m, t, v) for p in parts for m, t, v in zip(
        p["meter"].tolist(), p["ts_us"].tolist(), p["value"].tolist(), strict=True)]
    # by meter in the order asked, then time; rows of one time in the order written
    want = [(ip.encode(), base + o, float(k)) for ip in names for k, (m, o) in sorted(
        enumerate(zip(meter, off, strict=True)), key=lambda r: r[1][1])
        if ip in IPS and IPS[m] == ip and lo <= base + o <= hi]
    assert got == want


@EXAMPLE
@given(data=st.data(), chunk=st.integers(1, 9))
def test_iter_power_gives_every_point_once_in_chunks(db, data, chunk):
    base, ts, watts = power_example(db, data, "main")
    # the same name on other meters (a circuit whose meters changed): merged by time
    other = np.unique(base + np.array(data.draw(st.lists(st.integers(0, 5 * MINUTE_US),
                                                         max_size=20)), np.int64))
    db.write([PowerBatch(power_cols("main", other, np.full(len(other), 7.0), "10.0.0.3"))])
    db.write([PowerBatch(power_cols("aux", ts[:5], watts[:5]))])
    lo = base + data.draw(st.integers(-MINUTE_US, 3 * MINUTE_US))
    hi = lo + data.draw(st.integers(0, 6 * MINUTE_US))
    parts = list(db.iter_power(["aux", "main"], lo, hi, chunk))
    assert all(0 < len(p["ts_us"]) <= chunk for p in parts)
    cols = ("circuit", "ts_us", "watts", "volts", "amps")
    got = [r for p in parts for r in zip(*(p[c].tolist() for c in cols), strict=True)]
    plain = db.power(["aux", "main"], lo, hi)
    want = list(zip(*(plain[c].tolist() for c in cols), strict=True))
    assert sorted(got) == sorted(want)
    assert got == sorted(got, key=lambda r: (r[0] != b"aux", r[1]))  # by circuit, then time


@EXAMPLE
@given(data=st.data())
def test_latest_is_the_newest_row_of_each(db, data):
    base = region(db)
    off = data.draw(offsets)
    meter = data.draw(st.lists(st.integers(0, 1), min_size=len(off), max_size=len(off)))
    value = np.arange(len(off), dtype=np.float64)
    db.write([RawBatch(f"s{base}", 0, 0, np.array(meter, np.int64),
                       base + np.array(off, np.int64), value)])
    got = db.latest("readings", IPS + ["10.9.9.9"])
    every = db.readings(IPS, 0, 2**62)  # (earlier examples' rows too)
    rows = {(m.decode(), t, v) for m, t, v in zip(
        *(every[c].tolist() for c in ("meter", "ts_us", "value")), strict=True)}
    want = {ip: max(t for i, t, _ in rows if i == ip) for ip in IPS if any(
        i == ip for i, _, _ in rows)}
    assert {n.decode(): t for n, t in zip(got["name"].tolist(), got["ts_us"].tolist(),
                                          strict=True)} == want
    for n, t, v in zip(got["name"].tolist(), got["ts_us"].tolist(), got["value"].tolist(),
                       strict=True):
        assert (n.decode(), t, v) in rows  # (of rows of one time: any one)
    _, ts, watts = power_example(db, data, "main")
    db.write([PowerBatch(power_cols("main", [int(ts[-1]) - 1], [3.0], "10.0.0.3"))])
    got = db.latest("power", ["main", "nobody"])
    assert got["name"].tolist() == [b"main"] and got["ts_us"].tolist() == [int(ts[-1])]
    assert got["watts"].tolist() == [watts[-1]] and got["amps"].tolist() == [watts[-1] / 10]


def test_ties_come_in_the_order_stored_across_chunks_and_pages(db):
    # rows of one time over several pages of the table (PostgreSQL: heap pages), two writes
    base, n = region(db), 1500
    for k in range(2):
        db.write([RawBatch(f"s{base}-{k}", 0, 0, np.zeros(n, np.int64), np.full(n, base),
                           np.arange(k * n, (k + 1) * n, dtype=np.float64))])
    parts = list(db.iter_readings([IPS[0]], base, base, 97))
    assert [len(p["value"]) for p in parts] == [97] * 30 + [3000 - 97 * 30]
    assert np.concatenate([p["value"] for p in parts]).tolist() == list(range(2 * n))
    # one circuit name on two circuit rows with points at the same times: by time, then by
    # (watts, volts, amps); the newest of them is the greatest such row
    db.write([PowerBatch(power_cols("main", [base, base + 1], [5.0, 1.0]))])
    db.write([PowerBatch(power_cols("main", [base, base + 1], [2.0, 9.0], "10.0.0.3"))])
    got = [(t, w) for p in db.iter_power(["main"], base, base + 1, 1)
           for t, w in zip(p["ts_us"].tolist(), p["watts"].tolist(), strict=True)]
    assert got == [(base, 2.0), (base, 5.0), (base + 1, 1.0), (base + 1, 9.0)]
    latest = db.latest("power", ["main", "nobody", "main"])
    assert latest["name"].tolist() == [b"main", b"main"]
    assert latest["ts_us"].tolist() == [base + 1] * 2 and latest["watts"].tolist() == [9.0] * 2
    assert db.latest("readings", [IPS[0], IPS[0]])["ts_us"].tolist() == [base, base]


def test_tiny_powers_roll_up_and_integrate_as_nothing(db):
    """Powers too small for a double's product (PostgreSQL raised "underflow" in the energy
    rollup: hypothesis found it) are energy 0 on both backends, and the rollup goes on."""
    base = region(db)
    ts = base + np.arange(6, dtype=np.int64)  # 1 µs apart: watts x µs x 5 / 3.6e9 is below
    watts = np.full(6, 5e-324)                # the smallest double
    db.write([PowerBatch(power_cols("tiny", ts, watts))])
    while db.rollup_step(time.time() + 60, most=500):
        pass
    assert db.held_wh(["tiny"], base, base + MINUTE_US)["tiny"] == pytest.approx(0.0, abs=1e-280)
    got = energy_wh(db, ["tiny"], base - MINUTE_US, base + 2 * MINUTE_US)["tiny"]
    assert got == pytest.approx(0.0, abs=1e-280)
