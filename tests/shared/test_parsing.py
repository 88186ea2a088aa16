"""Parsing and validation: edge cases, timestamps, and parse_block == parse_line on random input."""

from __future__ import annotations

import calendar
import random
from collections import Counter

import pytest

from shared import config, parsing
from shared.parsing import MeterTable, Reject, parse_block, parse_line, to_us

TABLE = MeterTable(config.load(env={}).meters)
TS = "2024.04.27 14:23:55.123456"
TS_US = to_us(2024, 4, 27, 14, 23, 55, 123456)


def reason(line: bytes) -> str | None:
    result = parse_line(line, TABLE)
    return result.reason if isinstance(result, Reject) else None


def ok(line: bytes) -> tuple[int, int, float]:
    result = parse_line(line, TABLE)
    assert not isinstance(result, Reject), result
    return result


@pytest.mark.parametrize("line, expected", [
    (b"", parsing.MALFORMED),
    (b"   ", parsing.MALFORMED),
    (b"10.0.0.1\t" + TS.encode(), parsing.MALFORMED),
    (b"10.0.0.1\t" + TS.encode() + b"\t1\t2", parsing.MALFORMED),
    (b"10.0.0.1 " + TS.encode() + b" 1", parsing.MALFORMED),
    (b"10.0.0.1\t2024-04-27 14:23:55.123456\t1", parsing.TIMESTAMP),
    (b"10.0.0.1\t2024.04.27T14:23:55.123456\t1", parsing.TIMESTAMP),
    (b"10.0.0.1\t2024.04.27 14:23:55\t1", parsing.TIMESTAMP),
    (b"10.0.0.1\t2024.04.27 14:23:55.1234567\t1", parsing.TIMESTAMP),
    (b"10.0.0.1\t2024.O4.27 14:23:55.123456\t1", parsing.TIMESTAMP),
    (b"10.0.0.1\t2024.02.30 14:23:55.123456\t1", parsing.TIMESTAMP),
    (b"10.0.0.1\t2023.02.29 14:23:55.123456\t1", parsing.TIMESTAMP),
    (b"10.0.0.1\t1900.02.29 14:23:55.123456\t1", parsing.TIMESTAMP),
    (b"10.0.0.1\t2024.13.01 14:23:55.123456\t1", parsing.TIMESTAMP),
    (b"10.0.0.1\t2024.04.31 14:23:55.123456\t1", parsing.TIMESTAMP),
    (b"10.0.0.1\t2024.04.27 24:00:00.000000\t1", parsing.TIMESTAMP),
    (b"10.0.0.1\t2024.04.27 23:60:00.000000\t1", parsing.TIMESTAMP),
    (b"10.0.0.1\t2024.04.27 23:59:60.000000\t1", parsing.TIMESTAMP),
    (b"10.0.0.1\t1969.12.31 23:59:59.999999\t1", parsing.TIMESTAMP),
    (b"10.0.0.1\t" + TS.encode() + b"\tNaN", parsing.VALUE),
    (b"10.0.0.1\t" + TS.encode() + b"\tnan", parsing.VALUE),
    (b"10.0.0.1\t" + TS.encode() + b"\tinf", parsing.VALUE),
    (b"10.0.0.1\t" + TS.encode() + b"\t-inf", parsing.VALUE),
    (b"10.0.0.1\t" + TS.encode() + b"\t1e999", parsing.VALUE),
    (b"10.0.0.1\t" + TS.encode() + b"\t", parsing.VALUE),
    (b"10.0.0.1\t" + TS.encode() + b"\tabc", parsing.VALUE),
    (b"10.0.0.1\t" + TS.encode() + b"\t1e", parsing.VALUE),
    (b"10.0.0.1\t" + TS.encode() + b"\t1.2.3", parsing.VALUE),
    (b"10.0.0.1\t" + TS.encode() + b"\t1_0", parsing.VALUE),
    (b"10.0.0.1\t" + TS.encode() + b"\t0x10", parsing.VALUE),
    (b"10.0.0.9\t" + TS.encode() + b"\t1", parsing.UNKNOWN_METER),
    (b"\t" + TS.encode() + b"\t1", parsing.UNKNOWN_METER),
    (b"x" * 60 + b"\t" + TS.encode() + b"\t1", parsing.UNKNOWN_METER),
    (b"10.0.0.2\t" + TS.encode() + b"\t0.3 V", parsing.WRONG_UNIT),
    (b"10.0.0.1\t" + TS.encode() + b"\t30A", parsing.WRONG_UNIT),
    (b"10.0.0.1\t" + TS.encode() + b"\t30 kW", parsing.WRONG_UNIT),
    (b"10.0.0.1\t" + TS.encode() + b"\t110.000001", parsing.OUT_OF_RANGE),
    (b"10.0.0.1\t" + TS.encode() + b"\t-0.000001", parsing.OUT_OF_RANGE),
    (b"10.0.0.3\t" + TS.encode() + b"\t0.199999", parsing.OUT_OF_RANGE),
    (b"10.0.0.5\t" + TS.encode() + b"\t10.5", parsing.OUT_OF_RANGE),
    (b"10.0.0.1\t" + TS.encode() + b"\t\xff", parsing.ENCODING),
    (b"\xc3\x28\t" + TS.encode() + b"\t1", parsing.ENCODING),
])
def test_bad_lines_get_their_reason(line, expected):
    assert reason(line) == expected
    result = parse_line(line, TABLE)
    assert result.message  # a sentence for people


@pytest.mark.parametrize("meter, value", [
    ("10.0.0.1", "0"), ("10.0.0.1", "110"), ("10.0.0.1", "110.0"),  # both ends are in range
    ("10.0.0.2", "0.5"), ("10.0.0.3", "0.2"), ("10.0.0.4", "1"), ("10.0.0.4", "5"),
    ("10.0.0.5", "3"), ("10.0.0.5", "1e1"), ("10.0.0.1", "+55.5"), ("10.0.0.1", ".5"),
    ("10.0.0.1", "-0"), ("10.0.0.1", "5."),
])
def test_range_ends_and_number_forms_are_accepted(meter, value):
    idx, ts, parsed = ok(f"{meter}\t{TS}\t{value}".encode())
    assert TABLE.meters[idx].ip == meter and ts == TS_US and parsed == float(value)


@pytest.mark.parametrize("value, number", [
    ("0.5 A", 0.5), ("0.5A", 0.5), ("0.5 А", 0.5), ("0.5а", 0.5), (" 0.5 ", 0.5),
])
def test_matching_unit_suffix_is_accepted_latin_or_cyrillic(value, number):
    idx, _, parsed = ok(f"10.0.0.3\t{TS}\t{value}".encode())
    assert TABLE.meters[idx].ip == "10.0.0.3" and parsed == number


def test_cyrillic_volt_suffix():
    assert ok(f"10.0.0.1\t{TS}\t230 В".replace("230", "100").encode())[2] == 100.0


def test_crlf_and_short_fractions():
    assert ok(f"10.0.0.1\t{TS}\t1\r".encode())[1] == TS_US
    assert ok(b"10.0.0.1\t2024.04.27 14:23:55.1\t1")[1] == to_us(2024, 4, 27, 14, 23, 55, 100000)
    block = f"10.0.0.1\t{TS}\t1\r\n10.0.0.2\t{TS}\t0.1\n".encode()
    parsed = parse_block(block, TABLE)
    assert parsed.count == 2 and not parsed.rejects


@pytest.mark.parametrize("day", [
    (2024, 2, 29), (2000, 2, 29), (2023, 2, 28), (2100, 2, 28), (1970, 1, 1), (2099, 12, 31),
])
def test_real_dates_including_leap_days(day):
    y, m, d = day
    _, ts, _ = ok(f"10.0.0.1\t{y:04d}.{m:02d}.{d:02d} 00:00:00.000000\t1".encode())
    assert ts == calendar.timegm((y, m, d, 0, 0, 0)) * 1_000_000


def test_timestamp_microseconds_match_calendar_on_random_dates():
    rng = random.Random(7)
    for _ in range(2000):
        y, mo = rng.randint(1970, 2100), rng.randint(1, 12)
        d = rng.randint(1, calendar.monthrange(y, mo)[1])
        h, mi, s = rng.randint(0, 23), rng.randint(0, 59), rng.randint(0, 59)
        us = rng.randint(0, 999999)
        expected = calendar.timegm((y, mo, d, h, mi, s)) * 1_000_000 + us
        assert to_us(y, mo, d, h, mi, s, us) == expected
        text = f"{y:04d}.{mo:02d}.{d:02d} {h:02d}:{mi:02d}:{s:02d}.{us:06d}"
        assert parsing.format_us(expected) == text
        parsed = parse_block(f"10.0.0.1\t{text}\t1\n".encode(), TABLE)
        assert parsed.ts_us.tolist() == [expected]


def random_line(rng: random.Random) -> bytes:
    if rng.random() < 0.4:  # a valid line, for the fast path
        m = rng.choice(TABLE.meters)
        us = to_us(2024, rng.randint(1, 12), rng.randint(1, 28), 12, 0, 0, rng.randint(0, 999999))
        value = round(rng.uniform(m.range_start, m.range_stop), rng.randint(0, 6))
        return f"{m.ip}\t{parsing.format_us(us)}\t{value}".encode()
    meters = [m.ip for m in TABLE.meters]
    meter = rng.choice(meters + ["10.0.0.77", "", "x" * 50])
    y, mo, d = rng.randint(1969, 2030), rng.randint(0, 13), rng.randint(0, 32)
    ts = f"{y:04d}.{mo:02d}.{d:02d} {rng.randint(0, 25):02d}:{rng.randint(0, 61):02d}:" \
         f"{rng.randint(0, 61):02d}.{rng.randint(0, 999999):06d}"
    if rng.random() < 0.5:  # mostly valid dates
        day = f"2024.0{rng.randint(1, 9)}.{rng.randint(1, 28):02d}"
        ts = f"{day} 12:00:00.{rng.randint(0, 999999):06d}"
    value = rng.choice([
        f"{rng.uniform(-1, 120):.4f}", f"{rng.uniform(0, 1):.6f}", str(rng.randint(0, 10)),
        "nan", "inf", "-inf", "abc", "", "1e", "1e2", f"{rng.uniform(0, 5):.3f} A",
        f"{rng.uniform(0, 110):.1f}V", "5 В", "0.3 А", "1.2.3", "+.5", "7.", "1e-3",
    ])
    fields = [meter, ts, value]
    shape = rng.random()
    if shape < 0.05:
        fields = fields[:2]
    elif shape < 0.1:
        fields.append("extra")
    line = "\t".join(fields).encode()
    if rng.random() < 0.03:
        line += b"\xff"
    if rng.random() < 0.05:
        line += b"\r"
    if rng.random() < 0.01:
        line = b""
    return line


def test_parse_block_agrees_with_parse_line_on_random_lines():
    rng = random.Random(12345)
    for _ in range(20):
        lines = [random_line(rng) for _ in range(500)]
        block = b"\n".join(lines) + b"\n"
        got = parse_block(block, TABLE)
        good, bad = Counter(), Counter()
        for line in lines:
            result = parse_line(line, TABLE)
            if isinstance(result, Reject):
                bad[(line.rstrip(b"\r"), result.reason)] += 1
            else:
                good[result] += 1
        fast_good = Counter(zip(got.meter.tolist(), got.ts_us.tolist(), got.value.tolist(),
                                strict=True))
        assert fast_good == good
        assert Counter((line, r.reason) for line, r in got.rejects) == bad
        assert sum(good.values()) > 50 and sum(bad.values()) > 50  # both paths exercised
        # every row and every reject knows the line it came from
        for m, ts, v, i in zip(got.meter.tolist(), got.ts_us.tolist(), got.value.tolist(),
                               got.line.tolist(), strict=True):
            assert parse_line(lines[i], TABLE) == (m, ts, v)
        for (line, _), i in zip(got.rejects, got.reject_lines, strict=True):
            assert lines[i].rstrip(b"\r") == line


def test_parse_block_empty_and_missing_final_newline():
    assert parse_block(b"", TABLE).count == 0
    parsed = parse_block(f"10.0.0.1\t{TS}\t1".encode(), TABLE)
    assert parsed.count == 1 and parsed.value.tolist() == [1.0]
