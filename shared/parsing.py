"""Parse and validate meter lines: ``IP<TAB>YYYY.MM.DD HH:MM:SS.ffffff<TAB>VALUE``.

Two implementations that must agree on every input, whatever a line's neighbours (tests
compare them on arbitrary bytes):

* ``parse_line`` is the reference, and the definition: one line, plain code, the reason when a
  line is bad.
* ``parse_block`` is what services run: a whole receive buffer at once with NumPy (no Python
  object per line). It accepts only lines its checks prove valid, with the reading
  ``parse_line`` gives them; every other line is handed to ``parse_line``.

The rules, checked in this order (the first that fails names the reason):

1. A line is the bytes before a ``\\n``; one ``\\r`` right before it is dropped (CRLF).
2. ``bad_encoding``: the line is not valid UTF-8.
3. ``malformed``: the line is blank (nothing but spaces and TABs), or it is not exactly three
   fields between TABs: METER, TIME, VALUE.
4. ``unknown_meter``: METER is not, byte for byte, a configured meter id (nothing trimmed).
5. ``bad_timestamp``: TIME is not ``YYYY.MM.DD HH:MM:SS.f`` (1 to 6 fraction digits) made of
   ASCII digits 0-9, or not a real date (Feb 29 only in leap years), or before 1970, or
   hours > 23, minutes or seconds > 59.
6. ``bad_value``: VALUE is not ``[spaces] NUMBER [spaces] [UNIT] [spaces]``. Spaces are ASCII
   spaces (0x20) only. NUMBER is an optional ``+``/``-``, then ASCII digits 0-9 with at most
   one ``.`` (at least one digit), then optionally ``e``/``E``, an optional sign and digits;
   it must be finite as a float64 (``1e999`` is not). UNIT is a run of letters; a lone ``e``
   or ``E`` is an exponent without digits, not a unit. Anything else in VALUE makes it
   ``bad_value``: other whitespace (TAB can only separate fields), control bytes such as NUL
   or a second ``\\r``, DEL, non-ASCII digits (``١٥``, ``１５``), signs or points elsewhere.
7. ``wrong_unit``: UNIT is not the meter's unit: ``V`` or ``VOLT`` for volts, ``A`` or ``AMP``
   for amperes (ASCII letters, any case), or Cyrillic ``В``/``в``, ``А``/``а``.
8. ``out_of_range``: NUMBER is outside the meter's ``[range_start, range_stop]`` (both ends
   are in range).

Timestamps carry no zone; they are stored as integer microseconds since 1970-01-01 00:00 of the
meter's clock (read as UTC), so time differences are exact.
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
TRUNCATED = "truncated"  # decided by ingest: a last line cut off by a connection's abrupt end
REASONS = (MALFORMED, ENCODING, TIMESTAMP, VALUE, UNKNOWN_METER, WRONG_UNIT, OUT_OF_RANGE, TOO_LONG,
           TRUNCATED)

# ASCII digits only: without re.ASCII, \d (like int() and float()) takes any Unicode digit
_TS_RE = re.compile(r"(\d{4})\.(\d\d)\.(\d\d) (\d\d):(\d\d):(\d\d)\.(\d{1,6})", re.ASCII)
_NUMBER = r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
_VALUE_RE = re.compile(rf" *({_NUMBER}) *(\w*) *")  # \w*: a unit only if it is all letters
_NUMBER_B = re.compile(_NUMBER.encode())  # the same NUMBER, for parse_block's unusual values
_CYRILLIC_UNITS = {"В": "V", "в": "V", "А": "A", "а": "A"}


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
        # ids that fit the fast path, as IP_WIDTH bytes (zero padded) seen as 64-bit words, and
        # a hash of those words, sorted, for a vectorised exact lookup (see _fast_meter)
        # (printable ASCII only: the fast path never sees a line with other bytes, and its
        # zero padding must not stand for a byte an id could hold)
        fits = [i for i, m in enumerate(self.meters)
                if 0 < len(m.ip) <= IP_WIDTH and m.ip.isascii() and m.ip.isprintable()]
        words = np.zeros((len(fits), IP_WIDTH), np.uint8)
        for row, i in enumerate(fits):
            ip = self.meters[i].ip.encode()
            words[row, : len(ip)] = np.frombuffer(ip, np.uint8)
        hashes = _hash_words(words.view(np.uint64))
        order = np.argsort(hashes, kind="stable")
        self.words = words.view(np.uint64)[order]
        self.hash_sorted = hashes[order]
        self.hash_meter = np.array(fits, np.int64)[order]
        self.hash_unique = len(np.unique(hashes)) == len(hashes)


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
    """Reference parser: (meter index, ts_us, value) or the reason the line is bad; the rules
    are in the module's docstring."""
    if line.endswith(b"\r"):
        line = line[:-1]
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Reject(ENCODING, f"line is not valid UTF-8 (byte {exc.start})")
    if not text.strip(" \t"):
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
    if not (1 <= mo <= 12 and 1 <= d <= _DAYS_IN_MONTH[mo] + (mo == 2 and calendar.isleap(y))):
        return Reject(TIMESTAMP, f"time {text!r} is not a real date")
    if y < 1970 or h > 23 or mi > 59 or s > 59:
        return Reject(TIMESTAMP, f"time {text!r} is out of range")
    return to_us(y, mo, d, h, mi, s, int(match.group(7).ljust(6, "0")))


def _parse_value(text: str, meter: Meter) -> float | Reject:
    match = _VALUE_RE.fullmatch(text)
    number, unit = match.groups() if match else ("", "")
    if match is None or (unit and not unit.isalpha()) or unit in ("e", "E"):
        return Reject(VALUE, f"value {text[:40]!r} is not a number (ASCII digits) with an "
                             "optional unit")
    value = float(number)
    if not math.isfinite(value):
        return Reject(VALUE, f"value {number[:40]!r} is not a finite number")
    if unit:
        named = UNITS.get(unit.upper()) if unit.isascii() else _CYRILLIC_UNITS.get(unit)
        if named != meter.unit:
            return Reject(WRONG_UNIT, f"meter {meter.ip} measures {meter.unit}, line says {unit!r}")
    if not meter.range_start <= value <= meter.range_stop:
        return Reject(
            OUT_OF_RANGE,
            f"value {number} {meter.unit} is outside meter {meter.ip}'s range "
            f"[{meter.range_start:g}, {meter.range_stop:g}]",
        )
    return value


_EMPTY_I4 = np.empty(0, np.int32)
_EMPTY_I8 = np.empty(0, np.int64)
_EMPTY_F8 = np.empty(0, np.float64)
_NUMBER_CHARS = np.zeros(256, dtype=bool)
_NUMBER_CHARS[list(b"0123456789.eE+-")] = True
_NUMBER_CHARS[0] = True  # padding (a fast-path line holds no NUL)
_PAD = max(TS_LEN, IP_WIDTH, VALUE_WIDTH)  # zero bytes after a block, so fixed-width rows fit
# a timestamp's bytes minus this are 0..9 at digits and 0 at separators when well formed
_TS_TEMPLATE = np.frombuffer(b"0000.00.00 00:00:00.000000", np.uint8)
_TS_LIMIT = np.where(_TS_TEMPLATE == ord("0"), 9, 0).astype(np.uint8)
_EXACT_DIGITS = 15  # an integer of 15 digits is below 2**53: exact as a float64
_PLAIN_WIDTH = _EXACT_DIGITS + 1  # the longest plain decimal: 15 digits and a point
_POW10_INT = 10 ** np.arange(_EXACT_DIGITS + 1, dtype=np.int64)
_POW10_F = 10.0 ** np.arange(_EXACT_DIGITS + 2)
_HASH_MULT = (np.arange(IP_WIDTH // 8, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
              + np.uint64(0x632BE59BD9B4E019)) | np.uint64(1)


def _hash_words(words: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return (words * _HASH_MULT[: words.shape[1]]).sum(axis=1, dtype=np.uint64)


def parse_block(block: bytes, table: MeterTable) -> Parsed:
    """Parse and validate every line of ``block``; the same verdict as ``parse_line`` for every
    line. Only lines of printable ASCII (and their two TABs and CRLF end) can take the fast
    path; its zero padding then never stands for a byte of a line."""
    if not block:
        return Parsed(_EMPTY_I4, _EMPTY_I8, _EMPTY_F8)
    if not block.endswith(b"\n"):
        block += b"\n"
    size = len(block)
    padded = np.zeros(size + _PAD, np.uint8)  # fixed-width rows past the end read zeros
    padded[:size] = np.frombuffer(block, dtype=np.uint8)
    a = padded[:size]
    # every byte outside printable ASCII (0x20..0x7e), in one pass: the newlines and TABs, and
    # what sends a line the slow way (control bytes such as NUL, DEL, bytes of UTF-8 sequences)
    special = np.flatnonzero(np.subtract(a, 32, dtype=np.uint8) > 94)
    byte = a[special]
    is_nl, is_tab = byte == 10, byte == 9
    nl, tabs = special[is_nl], special[is_tab]
    odd = special[~(is_nl | is_tab)]
    n = len(nl)
    starts = np.empty(n, np.int64)
    starts[0] = 0
    starts[1:] = nl[:-1] + 1
    ends = nl.copy()
    has_cr = (ends > starts) & (a[ends - 1] == 13)
    ends[has_cr] -= 1

    slow = np.zeros(n, dtype=bool)  # lines the fast checks could not pass
    if len(odd):
        odd = odd[(padded[odd] != 13) | (padded[odd + 1] != 10)]  # a CRLF end is no odd byte
        slow[np.searchsorted(nl, odd)] = True
    if not len(table.meters):
        slow[:] = True
    if (len(tabs) == 2 * n and (tabs[0::2] >= starts).all() and (tabs[1::2] < nl).all()):
        # the usual block: two tabs on every line (each line holds the two tabs at its
        # position, and there are no more)
        cand = np.flatnonzero(~slow) if slow.any() else np.arange(n)
        t1 = tabs[2 * cand]
        t2 = tabs[2 * cand + 1]
    else:
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
    if not shape_ok.all():
        slow[cand[~shape_ok]] = True
        cand, t1, t2 = cand[shape_ok], t1[shape_ok], t2[shape_ok]
        ip_len, val_len = ip_len[shape_ok], val_len[shape_ok]

    ts_us, ok = _fast_ts(padded, t1 + 1)
    meter, meter_ok = _fast_meter(padded, starts[cand], ip_len, table)
    ok &= meter_ok
    value, value_ok = _fast_value(block, padded, t2 + 1, val_len)
    ok &= value_ok
    midx = np.where(meter_ok, meter, 0)
    ok &= (value >= table.lo[midx]) & (value <= table.hi[midx])
    if ok.all():
        good_meter, good_ts, good_value, good_line = meter.astype(np.int32), ts_us, value, cand
    else:
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
                rejects.append((line[:-1] if line.endswith(b"\r") else line, result))
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


def _rows(padded: np.ndarray, start: np.ndarray, width: int) -> np.ndarray:
    """Rows of ``width`` bytes at ``start`` (a copy; ``padded`` ends in ``_PAD`` zeros): a
    read-only sliding-window view of ``padded`` indexed by row."""
    windows = np.ndarray((len(padded) - width + 1, width), np.uint8, padded, 0,
                         (1, 1))
    windows.flags.writeable = False
    return windows[start]


def _gather(padded: np.ndarray, start: np.ndarray, length: np.ndarray, width: int) -> np.ndarray:
    """Rows of ``width`` bytes at ``start``, zero past each row's ``length``."""
    rows = _rows(padded, start, width)
    rows *= np.arange(width) < length[:, None]
    return rows


def _fast_ts(padded: np.ndarray, start: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    m = _rows(padded, start, TS_LEN)
    m -= _TS_TEMPLATE  # digits 0..9, separators 0; anything else wraps above
    ok = (m <= _TS_LIMIT).all(axis=1)
    m = m.astype(np.int32)
    y = m[:, 0] * 1000 + m[:, 1] * 100 + m[:, 2] * 10 + m[:, 3]
    mo = m[:, 5] * 10 + m[:, 6]
    d = m[:, 8] * 10 + m[:, 9]
    h = m[:, 11] * 10 + m[:, 12]
    mi = m[:, 14] * 10 + m[:, 15]
    s = m[:, 17] * 10 + m[:, 18]
    frac = (m[:, 20] * 100000 + m[:, 21] * 10000 + m[:, 22] * 1000 + m[:, 23] * 100
            + m[:, 24] * 10 + m[:, 25])
    ok &= (mo >= 1) & (mo <= 12) & (y >= 1970) & (h <= 23) & (mi <= 59) & (s <= 59) & (d >= 1)
    mo_safe = np.where(ok, mo, 1)
    leap = (y % 4 == 0) & ((y % 100 != 0) | (y % 400 == 0))
    dim = _DAYS_IN_MONTH[mo_safe] + ((mo_safe == 2) & leap)
    ok &= d <= dim
    days = _days_from_civil(y.astype(np.int64), mo_safe, d)
    secs = days * 86400 + (h * 3600 + mi * 60 + s)
    return secs * 1_000_000 + frac, ok


def _fast_meter(padded, start, length, table: MeterTable) -> tuple[np.ndarray, np.ndarray]:
    """Meter index of each id (-1 when not configured): the ids' bytes as 64-bit words are
    hashed, looked up among the configured ids' hashes, and compared word for word."""
    # only as many words as the longest id here needs (zero words add nothing to a hash)
    width = -(-int(length.max(initial=1)) // 8) * 8
    words = _gather(padded, start, length, width).view(np.uint64)
    if not len(table.hash_sorted) or not table.hash_unique:
        return _meter_by_unique(_widen(words), table)
    h = _hash_words(words)
    pos = np.minimum(np.searchsorted(table.hash_sorted, h), len(table.hash_sorted) - 1)
    meter = table.hash_meter[pos]
    ok = table.hash_sorted[pos] == h
    known = table.words[pos]
    ok &= (words == known[:, : width // 8]).all(axis=1)
    if width < IP_WIDTH:  # a configured id longer than every id here matches none of them
        ok &= (known[:, width // 8 :] == 0).all(axis=1)
    return np.where(ok, meter, -1), ok


def _widen(words: np.ndarray) -> np.ndarray:
    wide = np.zeros((len(words), IP_WIDTH // 8), np.uint64)
    wide[:, : words.shape[1]] = words
    return wide


def _meter_by_unique(words: np.ndarray, table: MeterTable) -> tuple[np.ndarray, np.ndarray]:
    ips = np.ascontiguousarray(words).view(f"S{IP_WIDTH}").ravel()
    uniq, inverse = np.unique(ips, return_inverse=True)
    lookup = np.array([table.index_b.get(u, -1) for u in uniq.tolist()], dtype=np.int64)
    meter = lookup[inverse.ravel()] if len(uniq) else np.empty(0, np.int64)
    return meter, meter >= 0


def _fast_value(block: bytes, padded, start, length) -> tuple[np.ndarray, np.ndarray]:
    """Each value as a float64, and whether it is a NUMBER alone (NaN where not, or unsure).
    The usual value, a plain decimal (230.5, 7, .5, 7.) of at most 15 digits, is computed here
    for all rows at once; other texts made of number characters (signs, exponents, more
    digits) are checked against NUMBER and converted with float() one by one."""
    # Right-aligned rows of the last `width` bytes of each value (a value has at least 29
    # bytes of its line before it, so ``start + length - width`` stays inside the block).
    width = min(int(length.max(initial=1)), _PLAIN_WIDTH)
    cols = np.arange(width)
    rows = _rows(padded, start + length - width, width)
    rows *= cols >= (width - length)[:, None]
    # A plain decimal's digits as one integer of at most 15 digits over a power of ten: both
    # are exact in a float64, so the quotient is correctly rounded: exactly what float() gives.
    d = rows - np.uint8(48)
    is_digit = d < 10
    is_point = rows == 46
    n_digits = is_digit.sum(axis=1)
    n_points = is_point.sum(axis=1)
    plain = ((n_digits + n_points == length) & (n_points <= 1) & (n_digits > 0)
             & (n_digits <= _EXACT_DIGITS))  # (so every byte of the value is in the row)
    point = np.where(n_points > 0, is_point.argmax(axis=1), width)
    digits = np.where(is_digit, d, 0).astype(np.int64)
    weights = _POW10_INT[width - 1 - cols]
    left = cols < point[:, None]
    whole = (digits * left) @ weights  # digits before the point, one place too high
    frac = (digits * ~left) @ weights
    mant = np.where(n_points > 0, whole // 10 + frac, whole)
    value = mant / _POW10_F[np.where(n_points > 0, width - 1 - point, 0)]
    other = np.flatnonzero(~plain)
    if len(other):
        value[other] = np.nan
        other = other[_NUMBER_CHARS[rows[other]].all(axis=1)]  # worth a closer look
        for i, s, n in zip(other.tolist(), start[other].tolist(), length[other].tolist(),
                           strict=True):
            text = block[s : s + n]
            if _NUMBER_B.fullmatch(text):
                value[i] = float(text)
    return value, np.isfinite(value)
