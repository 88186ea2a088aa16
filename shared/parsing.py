"""Parse and validate meter lines: ``IP<TAB>YYYY.MM.DD HH:MM:SS.ffffff<TAB>VALUE``.

Two implementations that must agree (tests check it on random input):

* ``parse_line`` is the reference: one line, clear code, the reason when a line is bad.
* ``parse_block`` is what services run: a whole receive buffer at once with NumPy (no Python
  object per line), and only the lines its checks cannot pass are handed to ``parse_line``.

Timestamps carry no zone; they are stored as integer microseconds since 1970-01-01 00:00 of the
meter's clock (read as UTC), so time differences are exact. VALUE may carry the meter's unit
(``230.5``, ``230.5 V``, ``230.5В``); a unit that differs from the configured one is rejected.
"""

from __future__ import annotations

import calendar
import datetime
import math
import re
from dataclasses import dataclass, field

import numpy as np

from shared.config import UNITS, Meter

TS_LEN = 26  # len("2024.04.27 14:23:55.123456")
IP_WIDTH = 48  # widest meter id the fast path handles; wider ids go the slow way
VALUE_WIDTH = 32

# reason codes: stable strings that counters, the rejected topic and the database use
MALFORMED = "malformed"
ENCODING = "bad_encoding"
TIMESTAMP = "bad_timestamp"
VALUE = "bad_value"
UNKNOWN_METER = "unknown_meter"
WRONG_UNIT = "wrong_unit"
OUT_OF_RANGE = "out_of_range"
TOO_LONG = "line_too_long"  # decided by ingest, which never forwards such a line whole
REASONS = (MALFORMED, ENCODING, TIMESTAMP, VALUE, UNKNOWN_METER, WRONG_UNIT, OUT_OF_RANGE, TOO_LONG)

_TS_RE = re.compile(r"(\d{4})\.(\d\d)\.(\d\d) (\d\d):(\d\d):(\d\d)\.(\d{1,6})")
_VALUE_RE = re.compile(r"\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*([^\W\d_]*)\s*")


class MeterTable:
    """Configured meters as arrays, for vectorised lookups by index."""

    def __init__(self, meters: tuple[Meter, ...] | list[Meter]):
        self.meters = tuple(meters)
        self.index = {m.ip: i for i, m in enumerate(self.meters)}
        self.index_b = {m.ip.encode(): i for i, m in enumerate(self.meters)}
        self.names = np.array([m.ip.encode() for m in self.meters], dtype="S")
        self.units = np.array([m.unit.encode() for m in self.meters], dtype="S1")
        self.lo = np.array([m.range_start for m in self.meters], dtype=np.float64)
        self.hi = np.array([m.range_stop for m in self.meters], dtype=np.float64)


@dataclass(frozen=True, slots=True)
class Reject:
    reason: str
    message: str


@dataclass
class Parsed:
    """Result of one block: good readings as columns, bad lines with their reasons."""

    meter: np.ndarray  # int32 index into MeterTable.meters
    ts_us: np.ndarray  # int64 microseconds
    value: np.ndarray  # float64
    rejects: list[tuple[bytes, Reject]] = field(default_factory=list)
    line: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))  # of each reading
    reject_lines: list[int] = field(default_factory=list)  # line number of each reject

    @property
    def count(self) -> int:
        return len(self.meter)


def to_us(year: int, month: int, day: int, h: int, m: int, s: int, us: int) -> int:
    days = _days_from_civil(year, month, day)
    return ((days * 86400 + h * 3600 + m * 60 + s) * 1_000_000) + us


def format_us(ts_us: int) -> str:
    """Inverse of the timestamp parse, in the meters' own format."""
    when = _EPOCH + datetime.timedelta(microseconds=int(ts_us))
    return when.strftime("%Y.%m.%d %H:%M:%S.%f")


def _days_from_civil(y, m, d):
    """Days since 1970-01-01 (Howard Hinnant's algorithm); works on ints and on NumPy arrays."""
    y = y - (m <= 2)
    era = y // 400
    yoe = y - era * 400
    mp = (m + 9) % 12
    doy = (153 * mp + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


_EPOCH = datetime.datetime(1970, 1, 1)
_DAYS_IN_MONTH = np.array([0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31], dtype=np.int64)


def parse_line(line: bytes, table: MeterTable) -> tuple[int, int, float] | Reject:
    """Reference parser: (meter index, ts_us, value) or the reason the line is bad."""
    if line.endswith(b"\r"):
        line = line[:-1]
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Reject(ENCODING, f"line is not valid UTF-8 (byte {exc.start})")
    if not text.strip():
        return Reject(MALFORMED, "empty line")
    fields = text.split("\t")
    if len(fields) != 3:
        return Reject(
            MALFORMED, f"expected 3 tab-separated fields (meter, time, value), got {len(fields)}"
        )
    ip, ts_text, value_text = fields
    meter_idx = table.index.get(ip)
    if meter_idx is None:
        return Reject(UNKNOWN_METER, f"meter {ip[:64]!r} is not configured")
    ts = _parse_ts(ts_text)
    if isinstance(ts, Reject):
        return ts
    value = _parse_value(value_text, table.meters[meter_idx])
    if isinstance(value, Reject):
        return value
    return meter_idx, ts, value


def _parse_ts(text: str) -> int | Reject:
    match = _TS_RE.fullmatch(text)
    if match is None:
        return Reject(TIMESTAMP, f"time {text[:40]!r} is not YYYY.MM.DD HH:MM:SS.ffffff")
    y, mo, d, h, mi, s = (int(g) for g in match.groups()[:6])
    frac = match.group(7)
    if not (1 <= mo <= 12 and 1 <= d <= calendar.monthrange(y, mo)[1] if 1 <= mo <= 12 else False):
        return Reject(TIMESTAMP, f"time {text!r} is not a real date")
    if y < 1970 or h > 23 or mi > 59 or s > 59:
        return Reject(TIMESTAMP, f"time {text!r} is out of range")
    return to_us(y, mo, d, h, mi, s, int(frac.ljust(6, "0")))


def _parse_value(text: str, meter: Meter) -> float | Reject:
    match = _VALUE_RE.fullmatch(text)
    if match is None:
        try:
            num = float(text)
        except ValueError:
            return Reject(VALUE, f"value {text[:40]!r} is not a number")
        if not math.isfinite(num):
            return Reject(VALUE, f"value {text.strip()!r} is not a finite number")
        return Reject(VALUE, f"value {text[:40]!r} is not a plain decimal number")
    value, unit = float(match.group(1)), match.group(2)
    if not math.isfinite(value):
        return Reject(VALUE, f"value {text.strip()!r} is not a finite number")
    if unit in ("e", "E"):  # "1e": an exponent with no digits, not a unit
        return Reject(VALUE, f"value {text[:40]!r} is not a number")
    if unit:
        norm = UNITS.get(unit.upper())
        if norm != meter.unit:
            return Reject(WRONG_UNIT, f"meter {meter.ip} measures {meter.unit}, line says {unit!r}")
    if not meter.range_start <= value <= meter.range_stop:
        return Reject(
            OUT_OF_RANGE,
            f"value {match.group(1)} {meter.unit} is outside meter {meter.ip}'s range "
            f"[{meter.range_start:g}, {meter.range_stop:g}]",
        )
    return value


_EMPTY_I4 = np.empty(0, np.int32)
_EMPTY_I8 = np.empty(0, np.int64)
_EMPTY_F8 = np.empty(0, np.float64)
_VALUE_CHARS = np.zeros(256, dtype=bool)
_VALUE_CHARS[list(b"0123456789.eE+-")] = True
_VALUE_CHARS[0] = True  # padding
_TS_DIGITS = np.array([i for i in range(TS_LEN) if i not in (4, 7, 10, 13, 16, 19)])
_TS_SEPS = np.array([4, 7, 10, 13, 16, 19])
_TS_SEP_CHARS = np.frombuffer(b".. ::.", dtype=np.uint8)


def parse_block(block: bytes, table: MeterTable) -> Parsed:
    """Parse and validate every line of ``block``; same result as ``parse_line`` per line."""
    if not block:
        return Parsed(_EMPTY_I4, _EMPTY_I8, _EMPTY_F8)
    if not block.endswith(b"\n"):
        block += b"\n"
    a = np.frombuffer(block, dtype=np.uint8)
    nl = np.flatnonzero(a == 10)
    n = len(nl)
    starts = np.empty(n, np.int64)
    starts[0] = 0
    starts[1:] = nl[:-1] + 1
    ends = nl.copy()
    has_cr = (ends > starts) & (a[ends - 1] == 13)
    ends[has_cr] -= 1

    slow = np.zeros(n, dtype=bool)  # lines the fast checks could not pass
    high = np.flatnonzero(a >= 128)
    if len(high):
        slow[np.searchsorted(nl, high)] = True
    tabs = np.flatnonzero(a == 9)
    tab_line = np.searchsorted(nl, tabs)
    tab_count = np.bincount(tab_line, minlength=n)
    slow |= tab_count != 2
    first_tab = np.cumsum(tab_count) - tab_count
    cand = np.flatnonzero(~slow)
    t1 = tabs[first_tab[cand]]
    t2 = tabs[first_tab[cand] + 1]
    ip_len = t1 - starts[cand]
    val_len = ends[cand] - t2 - 1
    shape_ok = (
        (t2 - t1 - 1 == TS_LEN)
        & (ip_len > 0)
        & (ip_len <= IP_WIDTH)
        & (val_len > 0)
        & (val_len <= VALUE_WIDTH)
    )
    slow[cand[~shape_ok]] = True
    cand, t1, t2 = cand[shape_ok], t1[shape_ok], t2[shape_ok]
    ip_len, val_len = ip_len[shape_ok], val_len[shape_ok]

    ok = np.ones(len(cand), dtype=bool)
    ts_us, ts_ok = _fast_ts(a, t1 + 1)
    ok &= ts_ok
    meter, meter_ok = _fast_meter(a, starts[cand], ip_len, table)
    ok &= meter_ok
    value, value_ok = _fast_value(a, t2 + 1, val_len)
    ok &= value_ok
    midx = np.where(meter_ok, meter, 0)
    ok &= (value >= table.lo[midx]) & (value <= table.hi[midx])
    slow[cand[~ok]] = True

    good_meter = meter[ok].astype(np.int32)
    good_ts = ts_us[ok]
    good_value = value[ok]
    good_line = cand[ok]
    rejects: list[tuple[bytes, Reject]] = []
    reject_lines: list[int] = []
    slow_idx = np.flatnonzero(slow)
    if len(slow_idx):
        extra_m, extra_t, extra_v, extra_l = [], [], [], []
        for i in slow_idx.tolist():
            line = block[starts[i] : nl[i]]
            result = parse_line(line, table)
            if isinstance(result, Reject):
                rejects.append((line.rstrip(b"\r"), result))
                reject_lines.append(i)
            else:
                extra_m.append(result[0])
                extra_t.append(result[1])
                extra_v.append(result[2])
                extra_l.append(i)
        if extra_m:
            good_meter = np.concatenate([good_meter, np.array(extra_m, np.int32)])
            good_ts = np.concatenate([good_ts, np.array(extra_t, np.int64)])
            good_value = np.concatenate([good_value, np.array(extra_v, np.float64)])
            good_line = np.concatenate([good_line, np.array(extra_l, np.int64)])
    return Parsed(good_meter, good_ts, good_value, rejects, good_line, reject_lines)


def _gather(a: np.ndarray, start: np.ndarray, length: np.ndarray, width: int) -> np.ndarray:
    """Rows of ``width`` bytes from ``a`` at ``start``, zero past each row's ``length``."""
    cols = np.arange(width)
    idx = start[:, None] + cols
    np.minimum(idx, len(a) - 1, out=idx)
    rows = a[idx]
    rows[cols >= length[:, None]] = 0
    return rows


def _fast_ts(a: np.ndarray, start: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    m = a[start[:, None] + np.arange(TS_LEN)].astype(np.int64) - 48
    digits = m[:, _TS_DIGITS]
    ok = ((digits >= 0) & (digits <= 9)).all(axis=1)
    ok &= (m[:, _TS_SEPS] + 48 == _TS_SEP_CHARS).all(axis=1)
    y = m[:, 0] * 1000 + m[:, 1] * 100 + m[:, 2] * 10 + m[:, 3]
    mo = m[:, 5] * 10 + m[:, 6]
    d = m[:, 8] * 10 + m[:, 9]
    h = m[:, 11] * 10 + m[:, 12]
    mi = m[:, 14] * 10 + m[:, 15]
    s = m[:, 17] * 10 + m[:, 18]
    frac = m[:, 20:26] @ np.array([100000, 10000, 1000, 100, 10, 1], dtype=np.int64)
    ok &= (mo >= 1) & (mo <= 12) & (y >= 1970) & (h <= 23) & (mi <= 59) & (s <= 59) & (d >= 1)
    mo_safe = np.where(ok, mo, 1)
    leap = (y % 4 == 0) & ((y % 100 != 0) | (y % 400 == 0))
    dim = _DAYS_IN_MONTH[mo_safe] + ((mo_safe == 2) & leap)
    ok &= d <= dim
    days = _days_from_civil(y, mo_safe, d)
    return ((days * 86400 + h * 3600 + mi * 60 + s) * 1_000_000 + frac), ok


def _fast_meter(a, start, length, table: MeterTable) -> tuple[np.ndarray, np.ndarray]:
    rows = _gather(a, start, length, IP_WIDTH)
    ips = rows.view(f"S{IP_WIDTH}").ravel()
    uniq, inverse = np.unique(ips, return_inverse=True)
    lookup = np.array([table.index_b.get(u, -1) for u in uniq.tolist()], dtype=np.int64)
    meter = lookup[inverse.ravel()] if len(uniq) else np.empty(0, np.int64)
    return meter, meter >= 0


def _fast_value(a, start, length) -> tuple[np.ndarray, np.ndarray]:
    rows = _gather(a, start, length, VALUE_WIDTH)
    ok = _VALUE_CHARS[rows].all(axis=1)
    texts = rows.view(f"S{VALUE_WIDTH}").ravel()
    texts = np.where(ok, texts, b"0")
    try:
        value = texts.astype(np.float64)
    except ValueError:  # some odd text like "1e" or "1.2.3": find them one by one
        value = np.array([_float_or_nan(t) for t in texts.tolist()], dtype=np.float64)
    ok &= np.isfinite(value)
    return value, ok


def _float_or_nan(text: bytes) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan
