"""The dashboard's history logic: steps bound the points per series, time arguments, local
midnight across a DST change, and series (from rows and from rollups) against a plain
reference over the stored rows, gaps included."""

from __future__ import annotations

import time
from datetime import datetime
from zoneinfo import ZoneInfo

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.dashboard.history import (
    GAP_US,
    BadTime,
    bucket_count,
    choose_step,
    local_midnight_us,
    missing_runs,
    parse_time,
    series,
)
from shared.config import Meter
from shared.db import MINUTE_US, PowerBatch, RawBatch, open_database

BERLIN = ZoneInfo("Europe/Berlin")
NOW = 1_795_000_000_123_456
T0 = 1_767_225_600_000_000  # 2026-01-01 00:00 UTC


@given(t0=st.integers(0, 2**52), span=st.integers(1, 400 * 86_400_000_000),
       most=st.integers(10, 5000))
def test_a_step_never_gives_more_buckets_than_asked(t0, span, most):
    step = choose_step(span, most)
    assert bucket_count(t0, t0 + span, step) <= most


@pytest.mark.parametrize("text,want", [
    ("now", NOW), ("15m", NOW - 900_000_000), ("-15m", NOW - 900_000_000),
    ("1.5h", NOW - 5_400_000_000), ("2d", NOW - 2 * 86_400_000_000), ("90s", NOW - 90_000_000),
    ("@1700000000.5", 1_700_000_000_500_000), ("@1700000000", 1_700_000_000_000_000),
    ("2026-07-01 14:00", 1_782_907_200_000_000),  # CEST: 12:00 UTC
    ("2026-01-01T01:00:00.25", T0 + 250_000),  # CET: 00:00:00.25 UTC
    ("2026-01-01T00:00:00+00:00", T0), ("2026-01-01T00:00:00Z", T0),
    ("2026-01-01", T0 - 3_600_000_000),  # the date's local midnight
])
def test_time_arguments(text, want):
    assert parse_time(text, BERLIN, NOW) == want


@pytest.mark.parametrize("text", ["", "yesterday", "@soon", "-", "5 parsecs", "2026-13-01"])
def test_bad_time_arguments_say_what_is_accepted(text):
    with pytest.raises(BadTime, match="expected a date and time"):
        parse_time(text, BERLIN, NOW)


def test_local_midnight_on_a_day_of_23_hours():
    noon = int(datetime(2026, 3, 29, 12, 0, tzinfo=BERLIN).timestamp()) * 1_000_000
    midnight = local_midnight_us(noon, BERLIN)
    assert midnight == int(datetime(2026, 3, 28, 23, 0, tzinfo=ZoneInfo("UTC")).timestamp()
                           ) * 1_000_000
    assert local_midnight_us(midnight, BERLIN) == midnight
    assert local_midnight_us(midnight - 1, BERLIN) < midnight


def test_missing_runs():
    have = np.array([0, 60, 240, 300]) * 1_000_000
    assert missing_runs(have, 0, 420_000_000, 60_000_000) == [
        (120_000_000, 180_000_000), (360_000_000, 420_000_000)]
    assert missing_runs(have, 0, 60_000_000, 60_000_000) == []
    assert missing_runs(np.array([], np.int64), 60, 0, 60) == []


def reference(ts: np.ndarray, values: np.ndarray, start: int, stop: int, step: int,
              rolled: frozenset = frozenset()) -> list[tuple]:
    """Buckets of ``step`` from ``start`` to ``stop`` over the points, in plain Python: (t, n,
    min, max, mean, gap). A point in a minute of ``rolled`` (one with a rollup) is known only
    by its minute: it covers the minute whole, and counts even after ``stop``."""
    def minute(s: int) -> int:
        return s - s % MINUTE_US

    def lo(s: int) -> int:
        return minute(s) if minute(s) in rolled else s

    def hi(s: int) -> int:
        return minute(s) + MINUTE_US - 1 if minute(s) in rolled else s

    points = [(s, v) for s, v in zip(ts.tolist(), values.tolist(), strict=True)
              if s <= stop or minute(s) == minute(stop) and minute(s) in rolled]
    out, prev_last = [], None
    for t in range(start - start % step, stop + 1, step):
        inside = [(s, v) for s, v in points if t <= s < t + step]
        before = [s for s, _ in points if s < t]
        if before and prev_last is None:
            prev_last = hi(max(before))
        if not inside:
            continue
        vals = [v for _, v in inside]
        gap = prev_last is None or min(lo(s) for s, _ in inside) - prev_last > GAP_US
        out.append((t, len(vals), min(vals), max(vals), sum(vals) / len(vals), gap))
        prev_last = max(hi(s) for s, _ in inside)
    return out


def rows_of(s: dict) -> list[tuple]:
    return list(zip(*(s[k].tolist() for k in ("t", "n", "min", "max", "mean", "gap")),
                    strict=True))


def same(got: list[tuple], want: list[tuple]) -> None:
    assert [g[:4] + g[5:] for g in got] == [w[:4] + w[5:] for w in want]
    assert [g[4] for g in got] == pytest.approx([w[4] for w in want], rel=1e-12)


@pytest.fixture
def data(tmp_path):
    """Readings of one meter and power of one circuit: runs with gaps of 3 s, 6 s, 2 min."""
    db = open_database(f"sqlite:///{tmp_path / 'w.db'}", [Meter("10.0.0.1", "V", 0, 1e9)])
    rng = np.random.default_rng(3)
    ts = []
    t = T0 + 17_000_000
    for gap in (3_000_000, 6_000_000, 120_000_000, 5_000_000, 5_000_001, 61_000_000):
        ts += list(t + np.arange(0, 90_000_000, 250_000))
        t = ts[-1] + gap
    ts = np.array(ts, np.int64)
    values = np.round(rng.uniform(0, 1000, len(ts)), 3)
    db.write([RawBatch("s", 0, 0, np.zeros(len(ts), np.int64), ts, values)])
    n = len(ts)
    db.write([PowerBatch({"circuit": np.array([b"c"] * n), "v_meter": np.array([b"v"] * n),
                          "a_meter": np.array([b"a"] * n), "ts_us": ts, "watts": values,
                          "volts": values, "amps": np.ones(n)})])
    yield db, ts, values
    db.close()


@pytest.mark.parametrize("step", [250_000, 1_000_000, 7_000_000])
def test_series_from_rows_is_the_reference(data, step):
    db, ts, values = data
    a, b = T0 + 50_000_000, T0 + 700_000_000
    for kind, name in (("readings", "10.0.0.1"), ("power", "c")):
        got = rows_of(series(db, kind, [name], a, b, step)[name])
        same(got, reference(ts, values, a, b, step))
        assert sum(g[5] for g in got) >= 3  # the 6 s, 2 min and 61 s gaps at least


@pytest.mark.parametrize("rolled", [0, 3, 1000])
def test_series_from_rollups_is_the_reference_by_minutes(data, rolled):
    # power: any number of minutes rolled up (the rest from rows); readings: always rolled up
    db, ts, values = data
    # as if no minute were rolled up yet (storage rolls up in-order points as they come)
    db.conn.executescript("DELETE FROM power_1m; DELETE FROM power_1h; INSERT INTO power_dirty"
                          " SELECT DISTINCT circuit_id, ts_us - ts_us % 60000000, 0 FROM power")
    db.rollup_step(time.time() + 60, most=rolled)
    a, b = T0 + 50_000_000, T0 + 700_000_000
    every = frozenset((ts - ts % MINUTE_US).tolist())
    settled = frozenset(db.rollup("power", "1m", ["c"], 0, 2**62)["t"].tolist())
    assert bool(settled) == bool(rolled) and (rolled < 100) == (settled != every)
    for step in (MINUTE_US, 2 * MINUTE_US):
        for kind, name, known in (("readings", "10.0.0.1", every), ("power", "c", settled)):
            got = rows_of(series(db, kind, [name], a, b, step)[name])
            same(got, reference(ts, values, a, b, step, known))
