import pytest

from services.power.pairing import Pairing, to_columns
from shared.config import Circuit

S = 1_000_000
V, A1, A2 = "10.0.0.1", "10.0.0.2", "10.0.0.3"
CIRCUITS = [Circuit("c1", V, A1), Circuit("c2", V, A2)]


def feed(p: Pairing, *readings):
    """readings: (meter, ts_us, value); returns power rows as dicts."""
    meters, ts, values = zip(*readings, strict=True)
    out = p.feed(list(meters), list(ts), list(values), [0.0] * len(meters))
    keys = ("circuit", "ts_us", "watts", "volts", "amps", "v_meter", "a_meter")
    return [dict(zip(keys, row, strict=True)) for row in zip(*(out[k] for k in keys), strict=True)]


def test_exactly_max_time_diff_apart_pairs():
    p = Pairing([CIRCUITS[0]], 0.5)
    rows = feed(p, (V, 0, 100.0), (A1, S // 2, 0.25))
    assert rows == [{"circuit": "c1", "ts_us": S // 2, "watts": 25.0, "volts": 100.0,
                     "amps": 0.25, "v_meter": V, "a_meter": A1}]


def test_one_microsecond_more_does_not_pair():
    p = Pairing([CIRCUITS[0]], 0.5)
    assert feed(p, (V, 0, 100.0), (A1, S // 2 + 1, 0.25)) == []
    # ... in either order
    p = Pairing([CIRCUITS[0]], 0.5)
    assert feed(p, (A1, S // 2 + 1, 0.25), (V, 0, 100.0)) == []


def test_power_timestamp_is_the_later_reading_and_watts_is_v_times_i():
    p = Pairing([CIRCUITS[0]], 0.5)
    rows = feed(p, (A1, 3 * S, 0.4), (V, 3 * S - 100, 50.0))
    assert [(r["ts_us"], r["watts"]) for r in rows] == [(3 * S, pytest.approx(20.0))]


def test_older_reading_arriving_late_never_replaces_newer_one():
    p = Pairing([CIRCUITS[0]], 0.5)
    assert feed(p, (V, 10 * S, 100.0)) == []
    # a stale V reading (older than the one held) is ignored and triggers nothing
    assert feed(p, (V, 9 * S, 1.0)) == []
    assert p.stale == 1
    rows = feed(p, (A1, 10 * S + 1, 0.5))
    assert [r["volts"] for r in rows] == [100.0]
    # a late A reading older than the held A reading: ignored too
    assert feed(p, (A1, 10 * S, 0.1)) == []
    # equal timestamp counts as not newer
    assert feed(p, (A1, 10 * S + 1, 0.3)) == []
    assert p.stale == 3


def test_several_circuits_share_one_voltage_meter():
    p = Pairing(CIRCUITS, 0.5)
    assert feed(p, (A1, 0, 0.1), (A2, 100, 0.2)) == []
    rows = feed(p, (V, 200, 10.0))
    assert sorted((r["circuit"], r["watts"]) for r in rows) == [("c1", pytest.approx(1.0)),
                                                                ("c2", pytest.approx(2.0))]
    # an A reading far from the V reading pairs with nothing
    assert feed(p, (A2, 2 * S, 0.3)) == []


def test_unknown_meter_readings_are_ignored():
    p = Pairing(CIRCUITS, 0.5)
    assert feed(p, ("10.0.0.9", 0, 1.0)) == []


def test_to_columns_types():
    p = Pairing([CIRCUITS[0]], 0.5)
    out = p.feed([V, A1], [0, 1], [10.0, 0.5], [1.0, 2.0])
    cols = to_columns(out)
    assert cols["circuit"].tolist() == [b"c1"] and cols["ts_us"].dtype.kind == "i"
    assert cols["watts"].tolist() == [5.0] and cols["t_recv"].tolist() == [2.0]
