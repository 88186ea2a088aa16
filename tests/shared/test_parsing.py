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
                bad[(line[:-1] if line.endswith(b"\r") else line, result.reason)] += 1
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
            assert lines[i] in (line, line + b"\r")


def test_parse_block_empty_and_missing_final_newline():
    assert parse_block(b"", TABLE).count == 0
    parsed = parse_block(f"10.0.0.1\t{TS}\t1".encode(), TABLE)
    assert parsed.count == 1 and parsed.value.tolist() == [1.0]


# --- issue #10 items 1 and 2: what an outside tester found, and more of the same kind ---

WIDE = MeterTable([*TABLE.meters, config.Meter("wide", "V", -1e300, 1e300),
                   config.Meter("x" * parsing.IP_WIDTH, "A", 0, 10),
                   config.Meter("y" * (parsing.IP_WIDTH + 1), "A", 0, 10)])
LONG_VALUE = b"wide\t" + TS.encode() + b"\t" + b"1" * 20  # a neighbour 20 bytes wide
LONG_ID = b"x" * parsing.IP_WIDTH + b"\t" + TS.encode() + b"\t1"  # an id as wide as can be
NEIGHBOURS = [b"10.0.0.1\t" + TS.encode() + b"\t5", b"10.0.0.1\t" + TS.encode() + b"\t33.938237",
              LONG_VALUE, LONG_ID, b"garbage"]


def verdict(line: bytes, table: MeterTable = WIDE):
    """parse_line's verdict, checked to be parse_block's too: alone and beside each kind of
    neighbour, before and after it."""
    want = parse_line(line, table)
    blocks = [[line]] + [[n, line] for n in NEIGHBOURS] + [[line, n] for n in NEIGHBOURS]
    for block in blocks:
        got = parse_block(b"\n".join(block) + b"\n", table)
        i = block.index(line)
        if isinstance(want, Reject):
            assert (line[:-1] if line.endswith(b"\r") else line, want) in got.rejects, block
            assert i in got.reject_lines
        else:
            row = got.line.tolist().index(i)
            assert (got.meter[row], got.ts_us[row], got.value[row]) == want, block
            assert str(got.value[row]) == str(want[2])  # -0.0 stays -0.0
    return want.reason if isinstance(want, Reject) else want


@pytest.mark.parametrize("line, expected", [
    (b"10.0.0.1\x00\t" + TS.encode() + b"\t6", parsing.UNKNOWN_METER),
    (b"10.0.0.1\x00\x00\t" + TS.encode() + b"\t6", parsing.UNKNOWN_METER),
    (b"\x0010.0.0.1\t" + TS.encode() + b"\t6", parsing.UNKNOWN_METER),
    (b"10.0.0.1\t" + TS.encode() + b"\t5\x00", parsing.VALUE),
    (b"10.0.0.1\t" + TS.encode() + b"\t5\x00\x00", parsing.VALUE),
    (b"10.0.0.1\t" + TS.encode() + b"\t\x005", parsing.VALUE),
    (b"10.0.0.1\t" + TS.encode() + b"\t5\x005", parsing.VALUE),
    (b"10.0.0.1\t" + TS.encode() + b"\x00\t5", parsing.TIMESTAMP),
    (b"10.0.0.1\t" + TS.encode()[:-1] + b"\x00\t5", parsing.TIMESTAMP),
    (b"x" * (parsing.IP_WIDTH - 1) + b"\x00\t" + TS.encode() + b"\t1", parsing.UNKNOWN_METER),
    (b"wide\t" + TS.encode() + b"\t" + b"1" * 20 + b"\x00", parsing.VALUE),
    (b"10.0.0.1\t" + TS.encode() + b"\t5\r\r", parsing.VALUE),  # only one CR ends a line
    (b"10.0.0.1\t" + TS.encode() + b"\t5\r\x00", parsing.VALUE),
    (b"10.0.0.1\t" + TS.encode() + b"\t5\x7f", parsing.VALUE),
    (b"10.0.0.1\t" + TS.encode() + b"\t5\x1b", parsing.VALUE),
])
def test_nul_and_control_bytes_are_never_padding(line, expected):
    assert verdict(line) == expected


ARABIC_TS = "٢٠٢٤.٠٤.٢٧ ١٤:٢٣:٥٥.١٢٣٤٥٦"  # Arabic-Indic digits


@pytest.mark.parametrize("ts, value, expected", [
    (ARABIC_TS, "5", parsing.TIMESTAMP),
    (TS[:-1] + "٦", "5", parsing.TIMESTAMP),
    ("２０２４.04.27 14:23:55.123456", "5", parsing.TIMESTAMP),  # fullwidth
    (TS, "１５", parsing.VALUE),  # fullwidth 15
    (TS, "٥", parsing.VALUE),
    (TS, "1٥", parsing.VALUE),
    (TS, "1.٥", parsing.VALUE),
    (TS, "5e٢", parsing.VALUE),
    (TS, "۵", parsing.VALUE),  # Extended Arabic-Indic
    (TS, "५", parsing.VALUE),  # Devanagari
    (TS, "5²", parsing.VALUE),  # a superscript is no unit
    (TS, "⁵", parsing.VALUE),
    (TS, "\u00a05", parsing.VALUE),  # no-break space
    (TS, "5\u2003V", parsing.VALUE),  # em space
    (TS, "5\u3000", parsing.VALUE),  # ideographic space
    (TS, "5\x85", parsing.VALUE),  # NEL
    (TS, "5\x0b", parsing.VALUE),
    (TS, "5\x0c", parsing.VALUE),
    (TS, "\x1c5", parsing.VALUE),  # str.strip() removes it, and float() accepts it
    (TS, "5\u200b", parsing.VALUE),  # zero-width space
    (TS, "5ᲀ", parsing.WRONG_UNIT),  # rounded ve, whose upper() is Cyrillic В
    (TS, "5 Ｖ", parsing.WRONG_UNIT),  # fullwidth V: letters, but no unit we know
])
def test_only_ascii_digits_and_spaces(ts, value, expected):
    assert verdict(f"10.0.0.1\t{ts}\t{value}".encode()) == expected


@pytest.mark.parametrize("value", ["5", " 5", "5 ", "  5  ", "5 V", "5V", " 5 v ", "5 volt",
                                   "5 VOLT", "5В", "5 в ", "+5", "-0", "5e0", "50E-1", ".5e1"])
def test_ascii_spaces_around_number_and_unit(value):
    idx, ts, number = verdict(f"10.0.0.1\t{TS}\t{value}".encode())
    assert (idx, ts) == (0, TS_US) and number == float(value.strip(" VvOoLlTtВв"))


@pytest.mark.parametrize("number", [
    "1.23456789012345", "1.234567890123456", "123456789012345", "1234567890123456",
    "12345678901234567", "0.000000000000001", "0.0000000000000001", "9007199254740993",
    "000000000000005.5", "5.5000000000000000000", "1" * 31, "1" * 32, "1" * 33,
    "0" * 30 + ".5", "0" * 31 + "5", "5." + "0" * 30, "+" + "1" * 31, "-1e-5", "1e300",
    "-0.0", "+.5e-0", "1.7976931348623157e299",
])
def test_long_values_signs_exponents_exactly_as_float(number):
    result = verdict(f"wide\t{TS}\t{number}".encode())
    assert result[2] == float(number) and str(result[2]) == str(float(number))


@pytest.mark.parametrize("ip", ["x" * parsing.IP_WIDTH, "y" * (parsing.IP_WIDTH + 1)])
def test_ids_around_the_fast_path_width(ip):
    assert TABLE.meters[0].ip == "10.0.0.1"
    assert WIDE.meters[verdict(f"{ip}\t{TS}\t5".encode())[0]].ip == ip
    assert verdict(f"{ip[:-1]}\t{TS}\t5".encode()) == parsing.UNKNOWN_METER
    assert verdict(f"{ip}x\t{TS}\t5".encode()) == parsing.UNKNOWN_METER


def test_a_line_keeps_its_verdict_whatever_the_width_of_its_neighbours():
    # the old fast path stored "54\x00" as 54 alone, and rejected it beside wider values
    line = b"10.0.0.1\t" + TS.encode() + b"\t54\x00"
    assert parse_block(line + b"\n", TABLE).rejects[0][1].reason == parsing.VALUE
    block = [line, b"10.0.0.1\t" + TS.encode() + b"\t33.938237",
             b"10.0.0.1\t" + TS.encode() + b"\t65.250"]
    got = parse_block(b"\n".join(block) + b"\n", TABLE)
    assert got.reject_lines == [0] and sorted(got.line.tolist()) == [1, 2]


def test_rejected_line_keeps_all_but_its_crlf_end():
    got = parse_block(b"junk\r\r\nmore junk\r\n", TABLE)
    assert [line for line, _ in got.rejects] == [b"junk\r", b"more junk"]


BASES = [f"10.0.0.1\t{TS}\t230.5", f"10.0.0.3\t{TS}\t0.5 A", f"wide\t{TS}\t-1.5e3",
         f"{'x' * parsing.IP_WIDTH}\t{TS}\t7"]


@pytest.mark.parametrize("base", BASES)
def test_every_byte_inserted_or_replaced_anywhere(base):
    """Every single-byte insertion and replacement (0..255) at every position of a valid
    line: parse_block agrees with parse_line on each, in one block of all of them."""
    line = base.encode()
    variants = []
    for pos in range(len(line) + 1):
        for b in range(256):
            if b != 10:
                variants.append(line[:pos] + bytes([b]) + line[pos:])
                variants.append(line[:pos] + bytes([b]) + line[pos + 1:])
    rng = random.Random(base)
    rng.shuffle(variants)
    got = parse_block(b"\n".join(variants) + b"\n", WIDE)
    verdicts = {}
    for m, ts, v, i in zip(got.meter.tolist(), got.ts_us.tolist(), got.value.tolist(),
                           got.line.tolist(), strict=True):
        verdicts[i] = (m, ts, v)
    for (_, r), i in zip(got.rejects, got.reject_lines, strict=True):
        verdicts[i] = r
    assert len(verdicts) == len(variants)
    for i, variant in enumerate(variants):
        assert verdicts[i] == parse_line(variant, WIDE), variant


def test_every_short_value():
    """Every VALUE of up to 3 characters from an alphabet of the interesting ones (and up to
    4 from a smaller one), each in a line of the wide meter: both parsers agree."""
    values = [""]
    for alphabet, longest in (("05.eE+- V\x00\r٥_\x0b", 3), ("05.e+-", 4)):
        level = [""]
        for _ in range(longest):
            level = [v + c for v in level for c in alphabet]
            values += level
    lines = [f"wide\t{TS}\t{v}".encode() for v in values]
    got = parse_block(b"\n".join(lines) + b"\n", WIDE)
    fast = dict(zip(got.line.tolist(), zip(got.meter.tolist(), got.ts_us.tolist(),
                                           got.value.tolist(), strict=True), strict=True))
    fast.update((i, r) for (_, r), i in zip(got.rejects, got.reject_lines, strict=True))
    assert [fast[i] for i in range(len(lines))] == [parse_line(ln, WIDE) for ln in lines]
    assert sum(1 for v in fast.values() if not isinstance(v, Reject)) > 250  # many accepted
