"""History on the database interface (SQLite or PostgreSQL alike): series downsampled to a
bounded number of buckets (min and max kept, so peaks survive), energy over any range, and the
time arguments the dashboard and ``wattflow export`` take.

Series. A range is cut into buckets of a "nice" step (0.5 s, 5 s, 2 min, ...) aligned to 1970,
so two requests with the same step line up bucket for bucket (the page fetches a window once,
then only its tail). Steps under a minute aggregate the stored rows in the database
(``buckets``); steps of whole minutes combine the per-minute rollups, and for power the minutes
not rolled up yet (on SQLite, minutes waiting for a recompute; on PostgreSQL, the recent
ones: a minute is rolled up once it has been left alone 10 s) from the rows. Each bucket
says whether a gap precedes it: its first point lies more than ``GAP_US`` after the previous
bucket's last one (the gap energy is not counted across).

Energy. A circuit's power is held from each point to the next point, unless that is more than
``GAP_US`` away (then nothing until the next point); the energy of ``[a, b)`` is the integral
of that step function over ``[a, b)`` (``energy_reference`` says it in plain Python).
``energy_wh`` computes the same from the settled per-minute rollups for whole minutes inside the
range and from the rows for the rest (``held_wh``), plus the part of a hold that crosses ``a``
and minus the part that runs past ``b``.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from zoneinfo import ZoneInfo

import numpy as np

from shared.db import ENERGY_GAP_US, HOUR_US, MINUTE_US

GAP_US = ENERGY_GAP_US
SECOND_US = 1_000_000
DAY_US = 24 * HOUR_US
NICE_STEPS_US = tuple(int(s * SECOND_US) for s in (
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30,
    60, 120, 300, 600, 900, 1800, 3600, 2 * 3600, 3 * 3600, 6 * 3600, 12 * 3600, 86400))
SERIES_COLUMNS = ("t", "n", "min", "max", "mean", "gap")


# ---- steps and series ----------------------------------------------------------------------

def choose_step(span_us: int, max_points: int) -> int:
    """The smallest nice step that cuts ``span_us`` into at most ``max_points`` buckets,
    however the range lies on the bucket grid."""
    least = max(1, -(-max(span_us, 1) // max(1, max_points - 2)))
    for step in NICE_STEPS_US:
        if step >= least:
            return step
    return -(-least // DAY_US) * DAY_US


def bucket_count(t0_us: int, t1_us: int, step_us: int) -> int:
    return t1_us // step_us - t0_us // step_us + 1


def series(db, kind: str, names: list[str], t0_us: int, t1_us: int,
           step_us: int) -> dict[str, dict[str, np.ndarray]]:
    """Per name, the buckets of ``step_us`` from the one holding ``t0`` to the one holding
    ``t1`` that hold data: columns t (bucket start, µs), n, min, max, mean, gap (True: a gap
    over GAP_US precedes the bucket's first point, or nothing came before it)."""
    start = t0_us - t0_us % step_us
    look = start - max(GAP_US, step_us)  # the bucket before: does a gap precede the first?
    if step_us % MINUTE_US == 0:
        cols = _rollup_buckets(db, kind, names, look, t1_us, step_us)
    else:
        cols = db.buckets(kind, names, max(0, look), t1_us, step_us)
    out = {}
    for name in names:
        sel = cols["name"] == name.encode()
        t, first, last = cols["t"][sel], cols["first"][sel], cols["last"][sel]
        gap = np.ones(len(t), bool)
        gap[1:] = first[1:] - last[:-1] > GAP_US
        keep = t >= start
        n = cols["n"][sel][keep]
        out[name] = {"t": t[keep], "n": n, "min": cols["min"][sel][keep],
                     "max": cols["max"][sel][keep], "mean": cols["sum"][sel][keep] / n,
                     "gap": gap[keep]}
    return out


def _rollup_buckets(db, kind: str, names: list[str], t0_us: int, t1_us: int,
                    step_us: int) -> dict[str, np.ndarray]:
    """``db.buckets`` for whole-minute steps, from the rollups (and for power, the rows of the
    minutes that have no rollup yet)."""
    width, res = ((HOUR_US, "1h") if kind == "readings" and step_us % HOUR_US == 0
                  else (MINUTE_US, "1m"))
    lo = max(0, t0_us - t0_us % width)
    r = db.rollup(kind, res, names, lo, t1_us)
    parts = [{"name": r["name"], "t": r["t"], "n": r["n"], "sum": r["sum"], "min": r["min"],
              "max": r["max"], "first": r["t"], "last": r["t"] + width - 1}]
    if kind == "power":  # readings' rollups are written with the rows; power's settle later
        for name in names:
            have = r["t"][r["name"] == name.encode()]
            for a, b in missing_runs(have, lo, t1_us - t1_us % MINUTE_US, MINUTE_US):
                parts.append(db.buckets(kind, [name], max(a, t0_us),
                                        min(b + MINUTE_US - 1, t1_us), step_us))
    cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return _regroup(cols, step_us)


def missing_runs(have: np.ndarray, first_us: int, last_us: int,
                 width: int) -> list[tuple[int, int]]:
    """Runs (first, last bucket start) of the buckets of ``width`` from ``first_us`` to
    ``last_us`` (both bucket starts) that are not in ``have``."""
    if last_us < first_us:
        return []
    every = np.arange(first_us, last_us + 1, width, dtype=np.int64)
    have = np.sort(np.asarray(have, np.int64))
    at = np.minimum(np.searchsorted(have, every), max(0, len(have) - 1))
    gone = every[~((have[at] == every) if len(have) else np.zeros(len(every), bool))]
    if not len(gone):
        return []
    breaks = np.flatnonzero(np.diff(gone) != width)
    starts = np.concatenate(([0], breaks + 1))
    ends = np.concatenate((breaks, [len(gone) - 1]))
    return list(zip(gone[starts].tolist(), gone[ends].tolist(), strict=True))


def _regroup(cols: dict[str, np.ndarray], step_us: int) -> dict[str, np.ndarray]:
    """Buckets of a finer grid (rollup rows, row buckets) folded into buckets of ``step_us``."""
    if not len(cols["t"]):
        return cols
    b = cols["t"] - cols["t"] % step_us
    names, key = np.unique(cols["name"], return_inverse=True)
    order = np.lexsort((b, key))
    k, b = key[order], b[order]
    start = np.flatnonzero(np.concatenate(([True], (k[1:] != k[:-1]) | (b[1:] != b[:-1]))))

    def fold(col: str, how) -> np.ndarray:
        return how.reduceat(cols[col][order], start)

    return {"name": names[k[start]], "t": b[start], "n": fold("n", np.add),
            "sum": fold("sum", np.add), "min": fold("min", np.minimum),
            "max": fold("max", np.maximum), "first": fold("first", np.minimum),
            "last": fold("last", np.maximum)}


def buckets_reference(ts: np.ndarray, values: np.ndarray, step_us: int) -> list[tuple]:
    """``db.buckets`` for one name in plain Python: (t, n, sum, min, max, first, last)."""
    out: dict[int, list] = {}
    for t, v in zip(ts.tolist(), values.tolist(), strict=True):
        b = out.setdefault(t - t % step_us, [0, 0.0, v, v, t, t])
        b[0] += 1
        b[1] += v
        b[2], b[3] = min(b[2], v), max(b[3], v)
        b[4], b[5] = min(b[4], t), max(b[5], t)
    return [(t, *b) for t, b in sorted(out.items())]


# ---- energy --------------------------------------------------------------------------------

def energy_reference(ts: np.ndarray, watts: np.ndarray, a_us: int, b_us: int) -> float:
    """The definition, in plain Python: Wh of [a, b) with each point's watts held until the
    next point, unless that is more than GAP_US away. ``ts`` sorted, one circuit."""
    total = 0.0
    t, w = ts.tolist(), watts.tolist()
    for i in range(len(t) - 1):
        if t[i + 1] - t[i] <= GAP_US:
            lo, hi = max(t[i], a_us), min(t[i + 1], b_us)
            if hi > lo:
                total += w[i] * (hi - lo)
    return total / 3.6e9


def energy_wh(db, circuits: list[str], a_us: int, b_us: int) -> dict[str, float]:
    """Wh of each circuit over [a, b) (see the module docstring): settled minute rollups for
    whole minutes inside, ``held_wh`` of the rows for the rest, then the holds that cross the
    two ends."""
    out = {}
    m0 = -(-a_us // MINUTE_US) * MINUTE_US
    m1 = b_us - b_us % MINUTE_US
    for name in circuits:
        if b_us <= a_us:
            out[name] = 0.0
            continue
        total, segments = 0.0, [(a_us, b_us)]
        if m1 > m0:
            r = db.rollup("power", "1m", [name], m0, m1 - MINUTE_US)
            total += float(r["wh"].sum())
            segments = [(a_us, m0), (m1, b_us)] + [
                (s, e + MINUTE_US) for s, e in missing_runs(r["t"], m0, m1 - MINUTE_US,
                                                            MINUTE_US)]
        for s, e in segments:
            if e > s:
                total += db.held_wh([name], s, e)[name]
        out[name] = total + _crossing_wh(db, name, a_us) - _crossing_wh(db, name, b_us)
    return out


def _crossing_wh(db, name: str, x_us: int) -> float:
    """Wh after ``x`` of the hold of the last point before ``x`` (when its next point lies
    after x and within GAP_US)."""
    p = db.power([name], x_us - GAP_US, x_us + GAP_US)
    ts = p["ts_us"]
    i = int(np.searchsorted(ts, x_us)) - 1  # the last point before x
    if i < 0 or i + 1 >= len(ts) or ts[i + 1] <= x_us or ts[i + 1] - ts[i] > GAP_US:
        return 0.0
    return float(p["watts"][i]) * (int(ts[i + 1]) - x_us) / 3.6e9


# ---- time arguments ------------------------------------------------------------------------

class BadTime(ValueError):
    """A time argument that cannot be read; the message says what is accepted."""


_RELATIVE = re.compile(r"^-?(\d+(?:\.\d+)?)\s*(s|m|min|h|d)$")  # before now
_UNITS_US = {"s": SECOND_US, "m": MINUTE_US, "min": MINUTE_US, "h": HOUR_US, "d": DAY_US}
TIME_HELP = ("a date and time (2026-11-27 14:00, 2026-11-27T14:00:00.5; without a zone: in "
             "dashboard.timezone), a date (from its midnight), now, a time that long before "
             "now (15m, 2h, 1d, 90s; also -15m), or @SECONDS since 1970")


def parse_time(text: str, tz: ZoneInfo, now_us: int) -> int:
    """Microseconds since 1970 (UTC) for a time argument (see TIME_HELP)."""
    s = str(text).strip()
    if s == "now":
        return now_us
    if m := _RELATIVE.match(s):
        return now_us - int(Decimal(m[1]) * _UNITS_US[m[2]])
    if s.startswith("@"):
        try:
            return int(Decimal(s[1:]) * SECOND_US)
        except InvalidOperation:
            raise BadTime(f"bad time {text!r}: expected {TIME_HELP}") from None
    try:
        when = datetime.fromisoformat(s.replace(" ", "T", 1) if " " in s else s)
    except ValueError:
        raise BadTime(f"bad time {text!r}: expected {TIME_HELP}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=tz)
    return to_us(when)


def to_us(when: datetime) -> int:
    delta = when.astimezone(UTC) - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * SECOND_US + delta.microseconds


def local_midnight_us(now_us: int, tz: ZoneInfo) -> int:
    """The start of the local day (in ``tz``) that ``now_us`` falls in."""
    day: date = datetime.fromtimestamp(now_us // SECOND_US, tz).date()
    return to_us(datetime(day.year, day.month, day.day, tzinfo=tz))


def utc_text(ts_us: np.ndarray) -> np.ndarray:
    """``YYYY-MM-DD HH:MM:SS.ffffff`` (UTC, the meters' clock) for each time, vectorised."""
    text = np.datetime_as_string(np.asarray(ts_us, np.int64).astype("datetime64[us]"), unit="us")
    return np.char.replace(text, "T", " ")


def iso_local(ts_us: int, tz: ZoneInfo) -> str:
    return (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=int(ts_us))).astimezone(
        tz).isoformat()
