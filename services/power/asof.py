"""Power as an as-of join of each circuit's two meters' readings (pure logic, no I/O).

Definition
----------
A circuit has a voltage meter v and a current meter a (a meter may serve several circuits, e.g.
one V meter and four A meters). Its power points are a function of the *set* of its two meters'
readings (meter, ts_us, value) and of ``max_time_diff`` D (microseconds) alone:

* Within one meter, readings with the same ``ts_us`` count as one reading: the one with the
  highest value (the tie rule; values that compare equal, such as 0.0 and -0.0, are one value).
* T is the set of distinct timestamps of v's and a's readings. For each t in T, V(t) is v's
  reading with the largest ts <= t and A(t) is a's reading with the largest ts <= t (an as-of
  join, like pandas ``merge_asof(direction="backward")``, kdb+ ``aj``, QuestDB ``ASOF JOIN``).
  If both exist and ``t - min(V(t).ts, A(t).ts) <= D`` (inclusive), the circuit has one point
  at t: volts = V(t).value, amps = A(t).value, watts = volts * amps, ts_us = t (which is the
  later of the two readings' times, since t is one of them).
* So there is at most one point per (circuit, ts_us), the key storage keeps unique, and every
  reading pairs with the other meter's latest reading at or before it, at most D older.
* Adding readings never removes a point; it can add points or change their values. T only
  grows, and for a fixed t, V(t) and A(t) can only be replaced by newer readings (a reading
  between the old one and t, or one at the same ts with a higher value), so
  ``t - min(V(t).ts, A(t).ts)`` can only shrink and a point once there stays there.

Where it differs from what came before
--------------------------------------
* The original program paired its latest voltage reading with the current reading nearest to
  it in time, on either side, within 0.5 s, so a V reading could take a *later* A reading as
  partner although an earlier one was within 0.5 s. The as-of join never looks forward: each
  reading's partner is the other meter's latest reading at or before it. A V at s and an A at
  s' > s still pair, as the point at s' (A's time), when no other V reading lies in (s, s'].
  Where both meters read at the same instants (the simulated set-up), a V reading's nearest A
  is the one at its own instant, and both rules pair the same readings.
* ``pairing.py`` (today's service) keeps each meter's latest reading in arrival order. With
  arrival in time order across both meters it gives the same points except where v and a read
  at the same instant t: it emits two points at t (the first-arriving reading with the
  partner's previous reading, then the pair at t), the as-of join one (the pair at t, which is
  pairing.py's last value at that key). So with in-order arrival the join gives at most one
  point per distinct timestamp of the two meters. Beyond that, ``pairing.py`` drops readings
  older than the one held (out-of-order and late readings get no power), keeps the *first* of
  equal timestamps within a meter, and when a reading arrives after a newer partner reading it
  pairs it forward (the point at the partner's time, with a reading that is not its as-of).

Computing it
------------
``reference_points`` is the definition line by line. ``points_in_range`` computes it with NumPy
for every t in T within [t0, t1] from both meters' readings in [t0 - D, t1]: older readings
are not needed because a point at t >= t0 needs both V(t) and A(t) at or after t - D >= t0 - D;
a reading older than t0 - D can be V(t) or A(t) only when it is too old to make a point, and
then "no reading in range" gives the same answer (no point). Readings after t1 are never an
as-of partner of t <= t1.

``Stream`` is the in-memory operator. Per meter m it holds every reading with ts >=
``coverage_start(m)`` that it was fed or loaded (a sorted array, at most ``max_per_meter``
long), so it knows m's as-of exactly for every t from its first reading held on, and for t
before that only that it is older than coverage_start. A new reading r of m at s changes only
the points at t in [s, next(s)) where next(s) is m's next reading after s (there V(t) or A(t)
becomes r; before s nothing changes, from next(s) on V(t)/A(t) is next(s) or newer); and since
r makes a point only for t - s <= D, the affected range is [s, min(next(s), s + D + 1)). When
m's memory does not reach back to s, next(s) is unknown and [s, s + D] is the range: a
superset, whose extra points are recomputed unchanged. The points in that range are
computed from memory when s >= coverage_start(m) and the partner p's as-of is known for every
t >= s: memory holds a reading of p at or before s, or s - D >= coverage_start(p) (then a
reading of p older than its coverage is more than D before t and makes no point). Otherwise
the stream returns the range as ``Late`` work for the service to answer from storage.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from shared.config import Circuit

POWER_COLUMNS = ("circuit", "ts_us", "watts", "volts", "amps", "v_meter", "a_meter")
I8_MIN = int(np.iinfo(np.int64).min)
I8_MAX = int(np.iinfo(np.int64).max)
_I8 = np.empty(0, np.int64)
_F8 = np.empty(0, np.float64)
_NONE = (_I8, _I8, True)


def reference_points(readings: Iterable[tuple[str, int, float]], circuits: Iterable[Circuit],
                     max_time_diff_us: int) -> dict[tuple[str, int], tuple[float, float]]:
    """The definition, plainly: readings (meter, ts_us, value) ->
    {(circuit name, ts_us): (volts, amps)}."""
    best: dict[str, dict[int, float]] = {}
    for meter, ts, value in readings:
        held = best.setdefault(meter, {})
        if ts not in held or value > held[ts]:
            held[ts] = value
    points = {}
    for c in circuits:
        v = sorted(best.get(c.voltage, {}).items())
        a = sorted(best.get(c.current, {}).items())
        v_ts, a_ts = [t for t, _ in v], [t for t, _ in a]
        for t in sorted(set(v_ts) | set(a_ts)):
            i = bisect.bisect_right(v_ts, t) - 1
            j = bisect.bisect_right(a_ts, t) - 1
            if i >= 0 and j >= 0 and t - min(v_ts[i], a_ts[j]) <= max_time_diff_us:
                points[(c.name, t)] = (v[i][1], a[j][1])
    return points


def points_in_range(v_ts, v_val, a_ts, a_val, t0: int, t1: int,
                    max_time_diff_us: int) -> dict[str, np.ndarray]:
    """The points of one circuit at every t in T with t0 <= t <= t1, as columns ``ts_us``,
    ``watts``, ``volts``, ``amps`` (sorted by ts_us). Give at least all readings of v (v_ts,
    v_val) and of a (a_ts, a_val) with ts in [t0 - D, t1], in any order, duplicates allowed."""
    return _points_in_ranges(v_ts, v_val, a_ts, a_val, np.array([t0], np.int64),
                             np.array([t1], np.int64), max_time_diff_us)


def _points_in_ranges(v_ts, v_val, a_ts, a_val, starts: np.ndarray, ends: np.ndarray,
                      max_time_diff_us: int) -> dict[str, np.ndarray]:
    """points_in_range for the t in any of the ranges [starts, ends] (inclusive)."""
    vt, vv = _dedupe(*_columns(v_ts, v_val, "v"))
    at, av = _dedupe(*_columns(a_ts, a_val, "a"))
    t = _sorted_unique(np.concatenate((_within(vt, starts, ends + 1),
                                       _within(at, starts, ends + 1))))
    t, volts, amps = _asof(vt, vv, at, av, t, max_time_diff_us)
    return {"ts_us": t, "watts": volts * amps, "volts": volts, "amps": amps}


@dataclass(frozen=True, eq=False)
class Late:
    """Points the stream cannot compute from memory: those of ``circuit`` at t in the ranges
    [starts[i], ends[i]] (inclusive, sorted, disjoint), which lie within [t0, t1].

    Answer it by fetching both meters' stored readings with ``since <= ts <= t1`` (one query
    per meter) and calling ``answer``; it merges them with the readings in hand (the stream's
    memory and the batch, which may not be stored yet) and computes the points in the ranges.
    Answer a batch's Late work before feeding the next batch, so that an answer never
    overwrites a newer point."""

    circuit: str
    v_meter: str
    a_meter: str
    t0: int
    t1: int
    max_time_diff_us: int
    starts: np.ndarray
    ends: np.ndarray
    v_ts: np.ndarray  # readings in hand of v within [since, t1]
    v_val: np.ndarray
    a_ts: np.ndarray
    a_val: np.ndarray

    @property
    def since(self) -> int:
        return self.t0 - self.max_time_diff_us

    def answer(self, v_ts, v_val, a_ts, a_val) -> dict[str, np.ndarray]:
        """Stored readings of v and a (at least those in [since, t1]) -> power columns."""
        p = _points_in_ranges(np.concatenate((self.v_ts, np.asarray(v_ts, np.int64))),
                              np.concatenate((self.v_val, np.asarray(v_val, np.float64))),
                              np.concatenate((self.a_ts, np.asarray(a_ts, np.int64))),
                              np.concatenate((self.a_val, np.asarray(a_val, np.float64))),
                              self.starts, self.ends, self.max_time_diff_us)
        n = len(p["ts_us"])
        return {"circuit": _bytes([self.circuit]).repeat(n), **p,
                "v_meter": _bytes([self.v_meter]).repeat(n),
                "a_meter": _bytes([self.a_meter]).repeat(n)}


class Stream:
    """The as-of join over readings as they arrive, in any order and batching, in bounded memory.

    ``feed`` returns the points each batch computed or corrected (UPSERT them by (circuit,
    ts_us)) and the Late work it could not do from memory. Memory per meter m: the readings
    with ts >= coverage_start(m); after each batch, readings older than the cutoff
    newest(m) - lateness_us - D are dropped except the latest one at or before the cutoff (the
    as-of partner of the times after it), and at most ``max_per_meter`` readings are kept;
    coverage_start moves up to the oldest reading kept. A reading within the lateness of both
    of a circuit's meters' newest readings is therefore computed in memory (unless the cap
    shrank memory); older ones come back as Late work.

    ``start_us``: every meter's coverage at construction; the default assumes no readings exist
    but those fed. A service that resumes over stored readings calls ``load`` per meter.
    ``late_gap_us``: a circuit's late ranges of one batch at most this far apart share one
    Late (one fetch of the span between them, instead of a query per range)."""

    def __init__(self, circuits: Iterable[Circuit], max_time_diff_us: int, lateness_us: int,
                 max_per_meter: int, start_us: int = I8_MIN, late_gap_us: int = 1_000_000):
        if min(max_time_diff_us, lateness_us, late_gap_us) < 0 or max_per_meter < 1:
            raise ValueError("need max_time_diff_us, lateness_us, late_gap_us >= 0 and "
                             "max_per_meter >= 1")
        self.late_gap = int(late_gap_us)
        self.max_diff = int(max_time_diff_us)
        self.lateness = int(lateness_us)
        self.max_per_meter = int(max_per_meter)
        self.series: dict[bytes, _Series] = {}
        self.readings_in = 0
        self.ignored = 0  # readings of meters in no circuit
        self.late_readings = 0  # (reading, circuit) pairs handed out as Late work
        self._set(circuits, start_us)

    def set_circuits(self, circuits: Iterable[Circuit]) -> None:
        """Compute these circuits from now on (e.g. after taking some over). Meters no longer
        used are forgotten; a new meter covers nothing until ``load`` seeds it (its readings
        come back as Late work until then)."""
        self._set(circuits, I8_MAX)

    def _set(self, circuits: Iterable[Circuit], new_coverage: int) -> None:
        self.circuits = tuple(circuits)
        names = [c.name for c in self.circuits]
        if len(set(names)) != len(names):
            raise ValueError("circuit names must be distinct")
        self._cv = [c.voltage.encode() for c in self.circuits]
        self._ca = [c.current.encode() for c in self.circuits]
        if any(v == a for v, a in zip(self._cv, self._ca, strict=True)):
            raise ValueError("a circuit's voltage and current meters must differ")
        self._index = {n: i for i, n in enumerate(names)}
        self._c_name = _bytes([c.name for c in self.circuits])
        self._c_v, self._c_a = _bytes(self._cv), _bytes(self._ca)
        self._roles: dict[bytes, list[int]] = {}
        for i, (v, a) in enumerate(zip(self._cv, self._ca, strict=True)):
            self._roles.setdefault(v, []).append(i)
            self._roles.setdefault(a, []).append(i)
        self.series = {m: self.series.get(m) or _Series(new_coverage) for m in self._roles}

    def feed(self, meter, ts_us, value) -> tuple[dict[str, np.ndarray], list[Late]]:
        """A batch of readings (columns; meter ids as bytes) in any order -> (power columns of
        every point this batch may have changed, Late work). In-order arrival yields just the
        points at the new timestamps."""
        meter = np.asarray(meter)
        if meter.dtype.kind == "U":
            meter = np.array([m.encode() for m in meter.tolist()], "S")
        ts, val = _columns(ts_us, value, "batch")
        if meter.dtype.kind != "S" or meter.shape != ts.shape:
            raise ValueError("meter: expected a bytes column as long as ts_us and value")
        self.readings_in += len(ts)
        # meter -> (ts of the readings that changed memory, end of the range each decides,
        # whether all are newer than what the meter held before)
        changed: dict[bytes, tuple[np.ndarray, np.ndarray, bool]] = {}
        outside: dict[bytes, tuple[np.ndarray, np.ndarray]] = {}  # older than its coverage
        for name, idx in _group(meter):
            s = self.series.get(name)
            if s is None:
                self.ignored += len(idx)
                continue
            t, v = _dedupe(ts[idx], val[idx])
            k = int(np.searchsorted(t, s.coverage, "left"))
            if k:
                outside[name] = (t[:k], v[:k])
            if k < len(t):
                newest = s.newest
                c = s.merge(t[k:], v[k:])
                if len(c) and c[0] > newest:  # in order: all after what was held
                    end = np.minimum(np.r_[c[1:], I8_MAX], c + (self.max_diff + 1))
                    changed[name] = (c, end, True)
                elif len(c):
                    changed[name] = (c, _affected_end(s.view()[0], c, self.max_diff), False)
        touched = sorted({i for m in (*changed, *outside) for i in self._roles[m]})
        parts, late = [], []
        for ci in touched:
            self._circuit(ci, changed, outside, parts, late)
        for name in changed:
            self.series[name].trim(self.lateness + self.max_diff, self.max_per_meter)
        return self._power_columns(parts), late

    def _circuit(self, ci: int, changed, outside, parts: list, late: list) -> None:
        """One circuit's share of a batch: points from memory into parts, the rest into late."""
        D = self.max_diff
        v, a = self._cv[ci], self._ca[ci]
        sv, sa = self.series[v], self.series[a]
        cv, ev, v_after = changed.get(v, _NONE)
        ca, ea, a_after = changed.get(a, _NONE)
        # from memory when the partner's as-of is known from the reading's time on
        mv, ma = cv >= sa.reach(D), ca >= sv.reach(D)
        starts, ends = [], []
        in_order = v_after and a_after and mv.all() and ma.all()
        if not mv.all():
            starts.append(cv[~mv])
            ends.append(ev[~mv] - 1)
            cv, ev = cv[mv], ev[mv]
        if not ma.all():
            starts.append(ca[~ma])
            ends.append(ea[~ma] - 1)
            ca, ea = ca[ma], ea[ma]
        for m in (v, a):
            if m in outside:  # its next reading is unknown: up to s + D
                starts.append(outside[m][0])
                ends.append(outside[m][0] + D)
        if len(cv) or len(ca):
            t, volts, amps = _stream_points(sv, sa, cv, ev, ca, ea, D, in_order)
            if len(t):
                parts.append((np.full(len(t), ci), t, volts, amps))
        if starts:
            late.extend(self._late(ci, np.concatenate(starts), np.concatenate(ends), outside))

    def _late(self, ci: int, t0: np.ndarray, t1: np.ndarray, outside) -> list[Late]:
        """Late ranges of one circuit: overlapping ones joined, then grouped into one Late
        when at most late_gap_us apart."""
        D = self.max_diff
        self.late_readings += len(t0)
        order = np.argsort(t0, kind="stable")
        t0, t1 = t0[order], np.maximum.accumulate(t1[order])
        first = np.flatnonzero(np.r_[True, t0[1:] > t1[:-1] + 1])
        starts, ends = t0[first], t1[np.r_[first[1:] - 1, len(t0) - 1]]
        group = np.flatnonzero(np.r_[True, starts[1:] > ends[:-1] + self.late_gap])
        v, a = self._cv[ci], self._ca[ci]
        out = []
        for g0, g1 in zip(group.tolist(), [*group[1:].tolist(), len(starts)], strict=True):
            lo, hi = int(starts[g0]), int(ends[g1 - 1])
            hand = []
            for m in (v, a):
                t, val = self.series[m].between(lo - D, hi)
                ot, ov = outside.get(m, (_I8, _F8))
                keep = (ot >= lo - D) & (ot <= hi)
                hand += [np.concatenate((t, ot[keep])), np.concatenate((val, ov[keep]))]
            out.append(Late(self.circuits[ci].name, v.decode(), a.decode(), lo, hi, D,
                            starts[g0:g1], ends[g0:g1], *hand))
        return out

    def _power_columns(self, parts: list) -> dict[str, np.ndarray]:
        if not parts:
            ci, t, volts, amps = np.empty(0, np.intp), _I8, _F8, _F8
        else:
            ci, t, volts, amps = (np.concatenate(col) for col in zip(*parts, strict=True))
        return {"circuit": self._c_name[ci], "ts_us": t, "watts": volts * amps, "volts": volts,
                "amps": amps, "v_meter": self._c_v[ci], "a_meter": self._c_a[ci]}

    def load(self, meter: str, ts_us, values, coverage_start: int) -> None:
        """Seed a meter's memory from storage (at start, or after taking over a circuit).
        ts_us/values: all of the meter's stored readings with ts >= coverage_start (any order);
        they are merged with what is held, and the memory covers from coverage_start on.
        Tip: let coverage_start be the ts of the latest stored reading before the window
        wanted, so the window's first points have their as-of partner. Emits nothing: compute
        the points of a range that needs it with points_in_range."""
        s = self.series.get(meter.encode())
        if s is None:
            raise ValueError(f"meter {meter!r} is in no circuit of this stream")
        t, v = _dedupe(*_columns(ts_us, values, "load"))
        keep = t >= coverage_start
        s.drop_before(coverage_start)
        s.merge(t[keep], v[keep])
        s.coverage = int(coverage_start)
        s.trim(self.lateness + self.max_diff, self.max_per_meter)

    def coverage_start(self, meter: str) -> int:
        """The meter's memory holds every reading it was given with ts >= this."""
        return self.series[meter.encode()].coverage

    def final_through(self, circuit: str) -> int:
        """max(coverage_start(v), coverage_start(a)) - 1 for the circuit's meters v and a: no
        reading the stream handles in memory can change the circuit's points at t <= this any
        more, since such a reading at s needs s >= the coverage start of both meters (its own,
        and its partner's as-of known from s on) and changes only points at t >= s. Later
        changes of those points come only as Late work (answered from storage). It rises as
        memory is trimmed (in steady flow to about newest - lateness - D) and falls only when
        ``load`` lowers a coverage."""
        ci = self._index[circuit]
        return _clip(max(self.series[self._cv[ci]].coverage,
                         self.series[self._ca[ci]].coverage) - 1)

    @property
    def memory_bytes(self) -> int:
        """Bytes of the arrays held for the meters (allocated, including room to grow)."""
        return sum(s.ts.nbytes + s.val.nbytes for s in self.series.values())

    @property
    def held(self) -> int:
        """Readings held in memory, all meters."""
        return sum(s.hi - s.lo for s in self.series.values())


class _Series:
    """One meter's readings with ts >= coverage, sorted, unique: ts[lo:hi], val[lo:hi] of
    buffers with room to append (in-order arrival costs a copy of the batch only)."""

    __slots__ = ("ts", "val", "lo", "hi", "coverage")

    def __init__(self, coverage: int):
        self.ts, self.val = np.empty(1024, np.int64), np.empty(1024, np.float64)
        self.lo = self.hi = 0
        self.coverage = coverage

    def view(self) -> tuple[np.ndarray, np.ndarray]:
        return self.ts[self.lo:self.hi], self.val[self.lo:self.hi]

    def reach(self, D: int) -> int:
        """From this time on the meter's as-of is known from memory, or known to be more than
        D old: its first reading held, or coverage + D when that comes first."""
        first = int(self.ts[self.lo]) if self.hi > self.lo else I8_MAX
        return min(first, _clip(self.coverage + D))

    @property
    def newest(self) -> int:
        return int(self.ts[self.hi - 1]) if self.hi > self.lo else I8_MIN

    def between(self, t0: int, t1: int) -> tuple[np.ndarray, np.ndarray]:
        """Copies of the readings held with t0 <= ts <= t1."""
        t, v = self.view()
        i, j = np.searchsorted(t, _clip(t0), "left"), np.searchsorted(t, _clip(t1), "right")
        return t[i:j].copy(), v[i:j].copy()

    def merge(self, t: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Add sorted unique readings; -> the ts of those that changed memory (new ts, or a
        higher value at a ts held)."""
        if not len(t):
            return t
        if self.hi == self.lo or t[0] > self.ts[self.hi - 1]:
            self._append(t, v)
            return t
        held_t, held_v = self.view()
        p = int(np.searchsorted(held_t, t[0], "left"))
        tail_t, tail_v = held_t[p:], held_v[p:]
        j = np.searchsorted(tail_t, t, "left")
        jc = np.minimum(j, len(tail_t) - 1)
        same = tail_t[jc] == t
        higher = same & (v > tail_v[jc])
        tail_v[jc[higher]] = v[higher]
        new = ~same
        if new.any():
            merged_t = np.insert(tail_t, j[new], t[new])
            merged_v = np.insert(tail_v, j[new], v[new])
            self.hi = self.lo + p
            self._append(merged_t, merged_v)
        return t[new | higher]

    def _append(self, t: np.ndarray, v: np.ndarray) -> None:
        n, held = len(t), self.hi - self.lo
        if self.hi + n > len(self.ts):
            if held + n <= len(self.ts) * 3 // 4:  # room enough once moved to the front
                t_held, v_held = self.view()
                self.ts[:held], self.val[:held] = t_held, v_held  # NumPy copies overlaps safely
            else:
                self._realloc(held + n)
            self.lo, self.hi = 0, held
        self.ts[self.hi:self.hi + n], self.val[self.hi:self.hi + n] = t, v
        self.hi += n

    def _realloc(self, need: int) -> None:
        cap = max(1024, need + need // 2)
        ts, val = np.empty(cap, np.int64), np.empty(cap, np.float64)
        held = self.hi - self.lo
        ts[:held], val[:held] = self.view()
        self.ts, self.val, self.lo, self.hi = ts, val, 0, held

    def drop_before(self, t0: int) -> None:
        self.lo += int(np.searchsorted(self.view()[0], t0, "left"))

    def trim(self, keep_us: int, max_n: int) -> None:
        """Drop readings older than newest - keep_us, but keep the latest reading at or before
        that cutoff (the as-of partner of the times after it); then keep at most max_n.
        Coverage moves up to the oldest reading kept."""
        t = self.view()[0]
        n = len(t)
        if not n:
            return
        cutoff = int(t[-1]) - keep_us
        start = max(int(np.searchsorted(t, cutoff, "right")) - 1, n - max_n, 0)
        if start:
            self.lo += start
            self.coverage = int(self.ts[self.lo])
        if len(self.ts) > 4096 and (n - start) * 4 < len(self.ts):
            self._realloc(n - start)  # give back what a burst made us allocate


def _stream_points(sv: _Series, sa: _Series, cv, ev, ca, ea, D: int, in_order: bool):
    """Points of one circuit at every t of T in the affected ranges [cv, ev) of the changed
    readings of v and [ca, ea) of a, from memory. in_order: the changed readings of each meter
    are all newer than those it held before."""
    vt, vv = sv.view()
    at, av = sa.view()
    low = min(int(x[0]) for x in (cv, ca) if len(x))
    # nothing before the earliest change - D can decide a point in its range (see module doc)
    i, j = int(np.searchsorted(vt, low - D, "left")), int(np.searchsorted(at, low - D, "left"))
    vt, vv, at, av = vt[i:], vv[i:], at[j:], av[j:]
    if in_order:  # V(t) or A(t) is a new reading for every t >= low, and for no t before
        i, j = int(np.searchsorted(vt, low, "left")), int(np.searchsorted(at, low, "left"))
        return _asof(vt, vv, at, av, _sorted_unique(np.concatenate((vt[i:], at[j:]))), D)
    # a meter's own timestamps in its ranges are just the changed ones (a range ends at the
    # meter's next reading); the partner's may be several
    t = _sorted_unique(np.concatenate((cv, ca, _within(at, cv, ev), _within(vt, ca, ea))))
    return _asof(vt, vv, at, av, t, D)


def _sorted_unique(t: np.ndarray) -> np.ndarray:
    """np.unique for int64 (which hashes in NumPy 2.x, several times slower here)."""
    t.sort()
    keep = np.empty(len(t), bool)
    keep[:1] = True
    np.not_equal(t[1:], t[:-1], out=keep[1:])
    return t[keep]


def _affected_end(t: np.ndarray, s: np.ndarray, D: int) -> np.ndarray:
    """For readings at s among the sorted t: the end (exclusive) of the range whose points
    they decide, min(next reading after s, s + D + 1)."""
    i = np.searchsorted(t, s, "right")
    nxt = np.where(i < len(t), t[np.minimum(i, len(t) - 1)], I8_MAX)
    return np.minimum(nxt, s + (D + 1))


def _within(t: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """The values of sorted t inside any of the ranges [starts, ends)."""
    lo, hi = np.searchsorted(t, starts, "left"), np.searchsorted(t, ends, "left")
    n = np.maximum(hi - lo, 0)  # an empty range may end before it starts
    total = int(n.sum())
    if not total:
        return _I8
    return t[np.repeat(lo - (np.cumsum(n) - n), n) + np.arange(total)]


def _asof(vt, vv, at, av, t: np.ndarray, D: int):
    """For sorted unique readings and candidate times t (each a timestamp of v or a): the
    times that make a point, with their volts and amps."""
    i = np.searchsorted(vt, t, "right") - 1
    j = np.searchsorted(at, t, "right") - 1
    both = (i >= 0) & (j >= 0)
    if not both.all():
        t, i, j = t[both], i[both], j[both]
    near = t - np.minimum(vt[i], at[j]) <= D
    return t[near], vv[i[near]], av[j[near]]


def _dedupe(ts: np.ndarray, val: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted by ts, one reading per ts: the highest value (the tie rule)."""
    if len(ts) < 2 or (ts[1:] > ts[:-1]).all():
        return ts, val
    order = np.argsort(ts)
    if (np.diff(ts[order]) > 0).all():  # no duplicates: a plain sort (lexsort is slower)
        return ts[order], val[order]
    order = np.lexsort((val, ts))
    ts, val = ts[order], val[order]
    last = np.r_[ts[1:] != ts[:-1], True]
    return ts[last], val[last]


def _columns(ts, val, what: str) -> tuple[np.ndarray, np.ndarray]:
    ts, val = np.asarray(ts, np.int64), np.asarray(val, np.float64)
    if ts.ndim != 1 or ts.shape != val.shape:
        raise ValueError(f"{what}: ts_us and value must be 1-d columns of equal length")
    if not np.isfinite(val).all():
        raise ValueError(f"{what}: values must be finite (no NaN or infinity)")
    return ts, val


def _group(meter: np.ndarray) -> list[tuple[bytes, np.ndarray]]:
    """(id, row indices) for each distinct id of a bytes column. Ids of up to 8 bytes are
    grouped as 64-bit integers (much cheaper to sort than strings); longer ones by a 64-bit
    hash, checked exactly against the ids."""
    n, width = len(meter), meter.dtype.itemsize
    if not n:
        return []
    meter = np.ascontiguousarray(meter)
    words = np.zeros((n, -(-width // 8) * 8), np.uint8)
    words[:, :width] = meter.view(np.uint8).reshape(n, width)
    words = words.view(np.uint64)
    if words.shape[1] == 1:
        key = words[:, 0]
    else:
        with np.errstate(over="ignore"):
            key = (words * _HASH_MULT[: words.shape[1]]).sum(axis=1, dtype=np.uint64)
    order = np.argsort(key, kind="stable")
    k = key[order]
    bounds = np.r_[0, np.flatnonzero(k[1:] != k[:-1]) + 1, n]
    groups = [(bytes(meter[order[b]]), order[b:e]) for b, e in zip(bounds[:-1], bounds[1:],
                                                                   strict=True)]
    if words.shape[1] > 1 and not all((meter[i] == m).all() for m, i in groups):
        names, inverse = np.unique(meter, return_inverse=True)  # a hash collision
        order = np.argsort(inverse.ravel(), kind="stable")
        bounds = np.searchsorted(inverse.ravel()[order], np.arange(len(names) + 1))
        groups = [(bytes(names[g]), order[bounds[g]:bounds[g + 1]]) for g in range(len(names))]
    return groups


_HASH_MULT = (np.arange(1, 65, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)) | np.uint64(1)


def _clip(x: int) -> int:
    return min(max(x, I8_MIN), I8_MAX)


def _bytes(texts: list) -> np.ndarray:
    return np.array([t if isinstance(t, bytes) else t.encode() for t in texts], dtype="S") \
        if texts else np.empty(0, "S1")
