"""The as-of join's definition at its edges, and the stream's memory, late work, load and bounds."""

from __future__ import annotations

import numpy as np
import pytest

from services.power.asof import I8_MAX, Stream, points_in_range, reference_points
from shared.config import Circuit

D = 500_000  # 0.5 s
V, A1, A2, X = "10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.9"
C1, C2 = Circuit("c1", V, A1), Circuit("c2", V, A2)


def rows(cols) -> dict[tuple[str, int], tuple[float, float]]:
    """Power columns -> {(circuit, ts): (volts, amps)}; checks watts and the meter columns."""
    out = {}
    for c, t, w, v, a in zip(*(cols[k].tolist() for k in ("circuit", "ts_us", "watts", "volts",
                                                          "amps")), strict=True):
        assert w == v * a
        out[(c.decode(), t)] = (v, a)
    return out


def batch(*readings):
    meters, ts, values = zip(*readings, strict=True) if readings else ((), (), ())
    return (np.array([m.encode() for m in meters], dtype="S") if meters else np.empty(0, "S1"),
            np.array(ts, np.int64), np.array(values, np.float64))


def all_three(readings, circuits, d=D):
    """The reference, points_in_range per circuit, and one Stream batch must agree; -> result."""
    ref = reference_points(readings, circuits, d)
    by_range = {}
    for c in circuits:
        v = [(t, x) for m, t, x in readings if m == c.voltage]
        a = [(t, x) for m, t, x in readings if m == c.current]
        p = points_in_range([t for t, _ in v], [x for _, x in v], [t for t, _ in a],
                            [x for _, x in a], -10**15, 10**15, d)
        by_range.update({(c.name, t): (vv, aa) for t, vv, aa in
                         zip(p["ts_us"].tolist(), p["volts"].tolist(), p["amps"].tolist(),
                             strict=True)})
    s = Stream(circuits, d, 10 * d, 1000)
    cols, late = s.feed(*batch(*readings))
    assert late == []
    assert rows(cols) == by_range == ref
    assert len(cols["ts_us"]) == len(ref)  # one batch: each point once
    return ref


def test_readings_exactly_max_time_diff_apart_pair_in_either_order():
    assert all_three([(V, 0, 100.0), (A1, D, 0.25)], [C1]) == {("c1", D): (100.0, 0.25)}
    assert all_three([(A1, 0, 0.25), (V, D, 100.0)], [C1]) == {("c1", D): (100.0, 0.25)}


def test_one_microsecond_more_does_not_pair():
    assert all_three([(V, 0, 100.0), (A1, D + 1, 0.25)], [C1]) == {}
    assert all_three([(A1, 0, 0.25), (V, D + 1, 100.0)], [C1]) == {}


def test_equal_timestamps_on_both_meters_make_one_point():
    got = all_three([(V, 0, 10.0), (A1, 0, 1.0), (V, 1000, 20.0), (A1, 1000, 2.0)], [C1])
    assert got == {("c1", 0): (10.0, 1.0), ("c1", 1000): (20.0, 2.0)}


def test_duplicates_within_a_meter_count_once_with_the_highest_value():
    got = all_three([(V, 0, 10.0), (V, 0, 30.0), (V, 0, 20.0), (A1, 0, 2.0), (A1, 5, 1.0),
                     (A1, 5, 0.5)], [C1])
    assert got == {("c1", 0): (30.0, 2.0), ("c1", 5): (30.0, 1.0)}


def test_the_partner_is_the_latest_reading_at_or_before_not_the_nearest():
    # A at 100 is nearer to V at 150 than V at 0 is, but looks backward: (V 0, A 100) at 100;
    # V at 150 pairs with A at 100 at 150
    got = all_three([(V, 0, 1.0), (A1, 100, 2.0), (V, 150, 3.0)], [C1])
    assert got == {("c1", 100): (1.0, 2.0), ("c1", 150): (3.0, 2.0)}


def test_a_voltage_meter_shared_by_several_circuits():
    got = all_three([(A1, 0, 0.1), (A2, 100, 0.2), (V, 200, 10.0), (A2, 2 * D + 300, 0.3)],
                    [C1, C2])
    assert got == {("c1", 200): (10.0, 0.1), ("c2", 200): (10.0, 0.2)}


def test_a_meter_in_no_circuit_is_ignored():
    assert all_three([(X, 0, 1.0), (V, 0, 10.0), (X, 1, 2.0)], [C1]) == {}
    s = Stream([C1], D, D, 100)
    cols, late = s.feed(*batch((X, 0, 1.0), (V, 0, 10.0), (A1, 1, 0.5)))
    assert rows(cols) == {("c1", 1): (10.0, 0.5)} and late == [] and s.ignored == 1


def test_empty_input():
    assert all_three([], [C1, C2]) == {}
    assert reference_points([(V, 0, 1.0)], [], D) == {}
    p = points_in_range([], [], [], [], 0, 10, D)
    assert {k: len(v) for k, v in p.items()} == {"ts_us": 0, "watts": 0, "volts": 0, "amps": 0}
    cols, late = Stream([C1], D, D, 10).feed(*batch())
    assert all(len(c) == 0 for c in cols.values()) and late == []
    assert cols["circuit"].dtype.kind == "S" and cols["ts_us"].dtype == np.int64


def test_points_in_range_needs_readings_from_t0_minus_d_only():
    readings = [(V, t, float(t)) for t in range(0, 10_000, 7)] + \
               [(A1, t, float(t)) for t in range(3, 10_000, 11)]
    d, t0, t1 = 40, 5_000, 6_000
    ref = {k: x for k, x in reference_points(readings, [C1], d).items() if t0 <= k[1] <= t1}
    v = [(t, x) for m, t, x in readings if m == V and t0 - d <= t <= t1]
    a = [(t, x) for m, t, x in readings if m == A1 and t0 - d <= t <= t1]
    p = points_in_range(*zip(*v, strict=True), *zip(*a, strict=True), t0, t1, d)
    assert {("c1", t): (x, y) for t, x, y in zip(p["ts_us"].tolist(), p["volts"].tolist(),
                                                  p["amps"].tolist(), strict=True)} == ref
    assert len(ref) > 50


def test_bad_input_is_a_clear_error():
    s = Stream([C1], D, D, 10)
    with pytest.raises(ValueError, match="finite"):
        s.feed(*batch((V, 0, float("nan"))))
    with pytest.raises(ValueError, match="equal length"):
        s.feed(np.array([b"x"]), np.array([1, 2]), np.array([1.0]))
    with pytest.raises(ValueError, match="bytes column"):
        s.feed(np.array([1]), np.array([1]), np.array([1.0]))
    with pytest.raises(ValueError, match="finite"):
        points_in_range([0], [float("inf")], [], [], 0, 1, D)
    with pytest.raises(ValueError):
        Stream([C1], -1, D, 10)
    with pytest.raises(ValueError, match="differ"):
        Stream([Circuit("c", V, V)], D, D, 10)
    with pytest.raises(ValueError, match="no circuit"):
        s.load(X, [], [], 0)


def test_in_order_arrival_emits_each_new_timestamp_once():
    s = Stream([C1, C2], D, 2 * D, 10_000)
    emitted = 0
    readings = []
    for step in range(40):  # 3 meters x 25 timestamps per batch, 1 ms apart
        b = [(m, (step * 25 + i) * 1000, 1.0 + i) for i in range(25) for m in (V, A1, A2)]
        readings += b
        cols, late = s.feed(*batch(*b))
        assert late == []
        assert sorted(set(cols["ts_us"].tolist())) == sorted({t for _, t, _ in b})
        emitted += len(cols["ts_us"])
    assert emitted == len(reference_points(readings, [C1, C2], D)) == 2 * 1000


def test_a_late_reading_within_memory_corrects_the_points_it_changes():
    s = Stream([C1], 100, 10_000, 1000)
    cols, _ = s.feed(*batch((V, 0, 1.0), (A1, 50, 2.0), (A1, 80, 3.0), (A1, 200, 4.0)))
    assert rows(cols) == {("c1", 50): (1.0, 2.0), ("c1", 80): (1.0, 3.0)}
    # V at 60 becomes the partner of A at 80 (not of A at 50), and pairs with A at 50 itself
    cols, late = s.feed(*batch((V, 60, 5.0)))
    assert late == []
    assert rows(cols) == {("c1", 60): (5.0, 2.0), ("c1", 80): (5.0, 3.0)}
    # V at 150 makes a point of itself (with A at 80) and of A at 200
    cols, late = s.feed(*batch((V, 150, 6.0)))
    assert rows(cols) == {("c1", 150): (6.0, 3.0), ("c1", 200): (6.0, 4.0)}
    # a lower duplicate changes nothing; a higher one corrects
    assert len(s.feed(*batch((V, 150, 5.5)))[0]["ts_us"]) == 0
    cols, _ = s.feed(*batch((V, 150, 7.0)))
    assert rows(cols) == {("c1", 150): (7.0, 3.0), ("c1", 200): (7.0, 4.0)}


def test_readings_older_than_memory_come_back_as_late_work():
    d, lateness = 10, 100
    s = Stream([C1], d, lateness, 1000)
    store = [(V, t, 1.0) for t in range(0, 1000, 10)] + [(A1, t, 2.0) for t in range(0, 1000, 10)]
    s.feed(*batch(*store))
    assert s.coverage_start(V) == s.coverage_start(A1) == 880  # newest 990 - lateness - D
    assert s.final_through("c1") == 879
    late_a = (A1, 505, 3.0)
    cols, late = s.feed(*batch(late_a))
    assert len(cols["ts_us"]) == 0 and len(late) == 1
    w = late[0]
    assert (w.circuit, w.v_meter, w.a_meter, w.t0, w.t1, w.since) == ("c1", V, A1, 505, 515, 495)
    assert w.a_ts.tolist() == [505]  # in hand, maybe not stored yet; memory holds none there
    store.append(late_a)
    fetched = {m: [(t, x) for mm, t, x in store if mm == m and w.since <= t <= w.t1]
               for m in (V, A1)}
    got = rows(w.answer(*zip(*fetched[V], strict=True), *zip(*fetched[A1], strict=True)))
    ref = reference_points(store, [C1], d)
    assert got == {k: x for k, x in ref.items() if 505 <= k[1] <= 515}
    assert got == {("c1", 505): (1.0, 3.0), ("c1", 510): (1.0, 2.0)}


def test_partner_memory_too_short_gives_late_work_up_to_the_next_reading():
    d = 10
    s = Stream([C1], d, 0, 1000)
    s.feed(*batch((V, 0, 1.0), (V, 100, 1.0), (A1, 0, 2.0), (A1, 1990, 2.0), (A1, 2000, 2.0)))
    # lateness 0: A's memory starts at 1990 (the latest at or before 2000 - D), V's still holds
    # everything: V at 104 is in V's memory, but A's does not reach back to 104 - D
    cols, late = s.feed(*batch((V, 104, 5.0)))
    assert len(cols["ts_us"]) == 0
    assert [(w.t0, w.t1) for w in late] == [(104, 114)]
    assert late[0].v_ts.tolist() == [100, 104]  # memory's readings in [since, t1]


def test_late_ranges_close_together_share_one_fetch():
    s = Stream([C1], 10, 0, 1000, late_gap_us=100)
    s.feed(*batch(*[(m, t, 1.0) for t in (8000, 9000, 10_000) for m in (V, A1)]))
    assert s.coverage_start(A1) == 9000
    _, late = s.feed(*batch((A1, 100, 1.0), (A1, 105, 1.0), (A1, 130, 1.0), (A1, 500, 1.0)))
    assert [(w.t0, w.t1, w.starts.tolist(), w.ends.tolist()) for w in late] == [
        (100, 140, [100, 130], [115, 140]), (500, 510, [500], [510])]
    assert late[0].since == 90


def test_memory_is_bounded_by_lateness_and_by_the_cap():
    s = Stream([C1], 10, 100, 1_000_000)
    s.feed(*batch(*[(m, t, 1.0) for t in range(0, 100_000, 5) for m in (V, A1)]))
    # newest 99995: keep from the latest at or before 99995 - 110
    assert s.coverage_start(V) == 99_885 and s.held == 2 * 23
    s = Stream([C1], 10, 10**9, 7)
    s.feed(*batch(*[(m, t, 1.0) for t in range(0, 1000, 5) for m in (V, A1)]))
    assert s.held == 14 and s.coverage_start(A1) == 965
    assert s.memory_bytes >= 14 * 16


def test_load_seeds_memory_and_coverage():
    s = Stream([C1], 10, 1000, 1000, start_us=10**9)  # nothing covered yet
    assert s.final_through("c1") == 10**9 - 1
    _, late = s.feed(*batch((V, 500, 1.0)))
    assert [(w.t0, w.t1) for w in late] == [(500, 510)]
    s.load(V, [300, 100, 200, 200], [1.0, 2.0, 3.0, 4.0], coverage_start=200)
    s.load(A1, [195, 250], [0.5, 0.25], coverage_start=195)
    assert s.coverage_start(V) == 200 and s.coverage_start(A1) == 195
    assert s.final_through("c1") == 199
    cols, late = s.feed(*batch((A1, 305, 1.0)))
    assert late == [] and rows(cols) == {("c1", 305): (1.0, 1.0)}
    cols, late = s.feed(*batch((A1, 202, 2.0)))  # V's memory has its as-of: V at 200
    assert late == [] and rows(cols) == {("c1", 202): (4.0, 2.0)}
    cols, late = s.feed(*batch((A1, 190, 2.0)))  # before A's coverage: late
    assert rows(cols) == {} and [(w.t0, w.t1) for w in late] == [(190, 200)]
    assert late[0].v_ts.tolist() == [200] and sorted(late[0].a_ts.tolist()) == [190, 195]


def test_partner_as_of_unknown_until_coverage_plus_d_when_no_reading_at_its_start():
    d = 10
    s = Stream([C1], d, 1000, 1000, start_us=I8_MAX)
    s.load(V, [320], [1.0], coverage_start=300)  # a stored V at 299 would be unknown
    s.load(A1, [], [], coverage_start=0)
    cols, late = s.feed(*batch((A1, 309, 0.5)))  # might pair with V at 299: late
    assert rows(cols) == {} and [(w.t0, w.t1) for w in late] == [(309, 319)]
    cols, late = s.feed(*batch((A1, 310, 0.5)))  # V at 299 or before would be too old
    assert late == [] and rows(cols) == {("c1", 320): (1.0, 0.5)}


def test_set_circuits_keeps_shared_meters_and_uncovers_new_ones():
    s = Stream([C1], 10, 1000, 1000)
    s.feed(*batch((V, 100, 1.0), (A1, 100, 1.0)))
    s.set_circuits([C1, C2])
    assert s.coverage_start(V) < 100 and s.coverage_start(A2) > 10**18
    cols, late = s.feed(*batch((A2, 105, 2.0)))
    assert rows(cols) == {} and [(w.circuit, w.t0) for w in late] == [("c2", 105)]
    s.load(A2, [105], [2.0], coverage_start=0)
    cols, late = s.feed(*batch((V, 106, 3.0)))
    assert late == [] and rows(cols) == {("c1", 106): (3.0, 1.0), ("c2", 106): (3.0, 2.0)}
    s.set_circuits([C2])
    with pytest.raises(ValueError, match="no circuit"):
        s.load(A1, [], [], 0)


def test_long_meter_ids_group_exactly():
    long_v, long_a = "meter-with-a-long-name-1", "meter-with-a-long-name-2"
    s = Stream([Circuit("c", long_v, long_a)], D, D, 100)
    cols, _ = s.feed(*batch((long_v, 0, 2.0), (long_a, 1, 3.0), ("meter-with-a-long-name-3", 2,
                                                                  1.0)))
    assert rows(cols) == {("c", 1): (2.0, 3.0)} and s.ignored == 1


def test_meter_column_as_text_or_strided_groups_the_same():
    s = Stream([C1], D, D, 100)
    cols, _ = s.feed(np.array([V, A1]), np.array([0, 1]), np.array([2.0, 3.0]))
    assert rows(cols) == {("c1", 1): (2.0, 3.0)}
    wide = np.array([V.encode(), b"-", A1.encode(), b"-"], "S")[::2]  # not contiguous
    cols, _ = s.feed(wide, np.array([5, 6]), np.array([4.0, 5.0]))
    assert rows(cols) == {("c1", 5): (4.0, 3.0), ("c1", 6): (4.0, 5.0)}
