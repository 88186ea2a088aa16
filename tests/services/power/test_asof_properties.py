"""Properties of the as-of join on arbitrary readings (hypothesis):

* points_in_range equals the definition (reference_points) for any range;
* any arrival order and batching fed to Stream, its Late work answered after each batch from a
  store of what was fed so far (or of what was fed before the batch: in-hand readings must fill
  the gap), ends with exactly the reference's points and values, also with tiny lateness and a
  tiny per-meter cap; in-memory points never fall at or before final_through;
* a Stream that resumes from storage (load) after a recompute ends the same.

WATTFLOW_HYPOTHESIS_EXAMPLES sets the example count (default 200) for a long run by hand.
"""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from services.power.asof import I8_MAX, Stream, points_in_range, reference_points
from shared.config import Circuit

EXAMPLES = int(os.environ.get("WATTFLOW_HYPOTHESIS_EXAMPLES", "200"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

V1, V2, A1, A2, X = "v1", "v2", "a1", "a2", "x"  # x is in no circuit
# v1 serves two circuits, a1 too (with different voltage meters)
CIRCUITS = [Circuit("c1", V1, A1), Circuit("c2", V1, A2), Circuit("c3", V2, A1)]
METERS = [V1, V2, A1, A2, X]
ORDERS = ("shuffled", "in order", "reverse", "one meter after another", "connections")

values = st.sampled_from([0.0, 1.0, 2.0, 3.0]) | st.floats(-1e6, 1e6, allow_nan=False)
reading_st = st.tuples(st.sampled_from(METERS), st.integers(0, 150), values)
readings_st = st.lists(reading_st, max_size=12) | st.lists(reading_st, min_size=30, max_size=120)
max_diff_st = st.integers(0, 12)
lateness_st = st.integers(0, 8) | st.integers(0, 60) | st.just(10**6)
cap_st = st.integers(1, 4) | st.integers(1, 40) | st.just(10**6)
gap_st = st.integers(0, 20) | st.just(10**6)


def arrive(readings: list, order: str, rnd: random.Random) -> list[list]:
    """The readings in one arrival order, cut into batches."""
    seq = list(readings)
    rnd.shuffle(seq)  # ties in any order
    if order == "in order":
        seq.sort(key=lambda r: r[1])
    elif order == "reverse":
        seq.sort(key=lambda r: -r[1])
    elif order == "one meter after another":  # a whole history delivered after the others'
        rank = {m: rnd.random() for m in sorted({r[0] for r in seq})}
        seq.sort(key=lambda r: (rank[r[0]], r[1]))
    elif order == "connections":  # up to ten connections, each carrying some meters' readings
        k = rnd.randint(1, 10)      # (or time slices of them) in time order, in bursts
        chunk = rnd.choice([10**9, rnd.randint(1, 50)])
        conn = {key: rnd.randrange(k) for key in sorted({(r[0], r[1] // chunk) for r in seq})}
        queues = [sorted((r for r in seq if conn[(r[0], r[1] // chunk)] == i),
                         key=lambda r: r[1]) for i in range(k)]
        seq = []
        while any(queues):
            q = rnd.choice([q for q in queues if q])
            n = rnd.randint(1, 12)
            seq += q[:n]
            del q[:n]
    if len(seq) < 2:
        return [seq]
    cuts = sorted(rnd.sample(range(1, len(seq)), rnd.randint(0, len(seq) - 1)))
    return [seq[i:j] for i, j in zip([0, *cuts], [*cuts, len(seq)], strict=True)]


def columns(readings):
    if not readings:
        return np.empty(0, "S1"), np.empty(0, np.int64), np.empty(0, np.float64)
    meters, ts, vals = zip(*readings, strict=True)
    return (np.array([m.encode() for m in meters], "S"), np.array(ts, np.int64),
            np.array(vals, np.float64))


def upsert(result: dict, cols) -> list[tuple[str, int]]:
    keys = []
    for c, t, w, v, a in zip(*(cols[k].tolist() for k in ("circuit", "ts_us", "watts", "volts",
                                                          "amps")), strict=True):
        assert w == v * a
        keys.append((c.decode(), t))
        result[keys[-1]] = (v, a)
    return keys


def answer(work, store: dict) -> dict:
    """What the service does with Late work: fetch both meters' stored readings in [since, t1]."""
    got = []
    for m in (work.v_meter, work.a_meter):
        ts, vals = store.get(m, (np.empty(0, np.int64), np.empty(0)))
        i, j = np.searchsorted(ts, work.since, "left"), np.searchsorted(ts, work.t1, "right")
        got += [ts[i:j], vals[i:j]]
    return work.answer(*got)


def index(readings: list) -> dict:
    """A fake store: meter -> (ts, values) sorted by ts."""
    by_meter: dict = {}
    for m, t, x in readings:
        by_meter.setdefault(m, []).append((t, x))
    return {m: (np.array([t for t, _ in rows], np.int64), np.array([x for _, x in rows]))
            for m, rows in ((m, sorted(rows)) for m, rows in by_meter.items())}


def run_stream(stream: Stream, batches: list[list], fed: list, lag: bool,
               result: dict | None = None, events: bool = True) -> dict:
    """Feed batches; answer each batch's Late work after it from the store (everything fed so
    far, or with lag everything fed before the batch); check bounds and final_through."""
    result = {} if result is None else result
    n_late = n_again = 0
    for b in batches:
        final = {c.name: stream.final_through(c.name) for c in stream.circuits}
        before = len(fed)
        fed.extend(b)
        cols, late = stream.feed(*columns(b))
        for name, t in upsert(result, cols):
            assert t > final[name], "an in-memory point at or before final_through"
            n_again += (name, t) in result
        store = index(fed[:before] if lag else fed) if late else {}
        n_late += len(late)
        for work in late:
            upsert(result, answer(work, store))
        for s in stream.series.values():
            assert s.hi - s.lo <= stream.max_per_meter
    if events:  # how often the paths ran: pytest --hypothesis-show-statistics
        event(f"late work: {'none' if not n_late else '1-9' if n_late < 10 else '10+'}")
        event(f"points emitted again from memory: {'none' if not n_again else 'some'}")
    return result


@SETTINGS
@given(readings_st, max_diff_st, st.integers(-20, 170), st.integers(-20, 170), st.randoms())
def test_points_in_range_is_the_definition(readings, d, t0, t1, rnd):
    ref = reference_points(readings, CIRCUITS, d)
    for c in CIRCUITS:
        given_ = {}
        for m in (c.voltage, c.current):  # all of [t0 - D, t1], some others, shuffled
            rows = [(t, x) for mm, t, x in readings
                    if mm == m and (t0 - d <= t <= t1 or rnd.random() < 0.5)]
            rnd.shuffle(rows)
            given_[m] = ([t for t, _ in rows], [x for _, x in rows])
        p = points_in_range(*given_[c.voltage], *given_[c.current], t0, t1, d)
        assert (p["ts_us"][1:] > p["ts_us"][:-1]).all()
        assert (p["watts"] == p["volts"] * p["amps"]).all()
        got = {(c.name, t): (v, a) for t, v, a in zip(p["ts_us"].tolist(), p["volts"].tolist(),
                                                      p["amps"].tolist(), strict=True)}
        assert got == {k: x for k, x in ref.items() if k[0] == c.name and t0 <= k[1] <= t1}


@SETTINGS
@given(readings_st, st.sampled_from(ORDERS), st.randoms(), max_diff_st, lateness_st, cap_st,
       gap_st, st.booleans())
def test_any_order_and_batching_gives_the_definition(readings, order, rnd, d, lateness, cap,
                                                     gap, lag):
    batches = arrive(readings, order, rnd)
    got = run_stream(Stream(CIRCUITS, d, lateness, cap, late_gap_us=gap), batches, [], lag)
    assert got == reference_points(readings, CIRCUITS, d)


@SETTINGS
@given(readings_st, st.sampled_from(ORDERS), st.randoms(), max_diff_st, lateness_st, cap_st,
       st.data())
def test_resuming_from_storage_gives_the_definition(readings, order, rnd, d, lateness, cap,
                                                    data):
    """Power stops after some batches; it restarts: recompute everything stored with
    points_in_range, load each meter from a coverage start of its choice, feed the rest."""
    batches = arrive(readings, order, rnd)
    k = data.draw(st.integers(0, len(batches)))
    stored = [r for b in batches[:k] for r in b]
    result: dict = {}
    for c in CIRCUITS:
        v = [(t, x) for m, t, x in stored if m == c.voltage]
        a = [(t, x) for m, t, x in stored if m == c.current]
        p = points_in_range([t for t, _ in v], [x for _, x in v], [t for t, _ in a],
                            [x for _, x in a], -1000, 1000, d)
        n = len(p["ts_us"])
        upsert(result, {**p, "circuit": np.array([c.name.encode()] * n, "S")})
    stream = Stream(CIRCUITS, d, lateness, cap, start_us=I8_MAX,
                    late_gap_us=data.draw(gap_st))
    for m in METERS[:-1]:
        start = data.draw(st.integers(-5, 160))
        mine = [(t, x) for mm, t, x in stored if mm == m and t >= start]
        stream.load(m, [t for t, _ in mine], [x for _, x in mine], start)
    run_stream(stream, batches[k:], list(stored), False, result)
    assert result == reference_points(readings, CIRCUITS, d)


@pytest.mark.parametrize("seed", range(6))
def test_default_meters_at_scale_in_many_orders(seed):
    """The five default meters, 1 ms apart with jitter, 3,000 readings each, one arrival order
    per seed, small lateness and cap (the late paths), batches of up to 2,000."""
    rnd = random.Random(seed)
    circuits = [Circuit(f"10.0.0.{i}", "10.0.0.1", f"10.0.0.{i}") for i in range(2, 6)]
    gen = np.random.default_rng(seed)
    readings = []
    for i in range(1, 6):
        t = np.arange(3000) * 1000 + gen.integers(0, 3 if seed % 2 else 900, 3000)
        readings += [(f"10.0.0.{i}", ts, float(v)) for ts, v in
                     zip(t.tolist(), gen.integers(0, 50, 3000).tolist(), strict=True)]
    order = ORDERS[seed % len(ORDERS)]
    seq = [r for b in arrive(readings, order, rnd) for r in b]
    cuts = np.cumsum(gen.integers(1, 2000, 100))
    cuts = cuts[cuts < len(seq)].tolist()
    batches = [seq[i:j] for i, j in zip([0, *cuts], [*cuts, len(seq)], strict=True)]
    gap = 2000 if seed == 1 else 10**6  # small gaps: the hypothesis tests
    stream = Stream(circuits, 500, 20_000, 50 + 500 * (seed % 3), late_gap_us=gap)
    got = run_stream(stream, batches, [], seed % 2 == 1, events=False)
    ref = reference_points(readings, circuits, 500)
    assert got == ref and len(ref) > 1000
