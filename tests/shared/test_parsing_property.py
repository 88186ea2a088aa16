"""parse_block == parse_line on arbitrary bytes, line by line, whatever a line's neighbours.

Blocks are made of lines drawn from: valid lines in many forms (units, spaces, signs,
exponents, 15/16/17-digit values, values and meter ids around the fast path's widths), the
same lines mutated (a byte of any value 0..255 inserted or put in place of another, non-ASCII
digits and Unicode spaces inserted as UTF-8, bytes deleted, lines cut short), and random
bytes; in random order, batching, CRLF or LF ends, with or without a final newline. Every
line must get the verdict ``parse_line`` gives it (the same reading, or the same rejection
with the same line number and line bytes), alone and in its block.

``HYPOTHESIS_EXAMPLES=50000 ./run-tests tests/shared/test_parsing_property.py`` runs it long
(tests/shared/examples.py).
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from shared import config, parsing
from shared.config import Meter
from shared.parsing import IP_WIDTH, VALUE_WIDTH, MeterTable, Reject, parse_block, parse_line
from tests.shared.examples import PROPERTY


def _long_id(n: int) -> str:
    return (f"id{n}-" + "x" * n)[:n]


METERS = [
    *config.load(env={}).meters,  # 10.0.0.1 .. 10.0.0.5
    Meter("10.0.0.10", "V", 0.0, 300.0),  # 10.0.0.1 is a prefix of it
    Meter("wide", "V", -1e300, 1e300),  # nearly every number is in range: signs, exponents
    Meter("neg", "A", -1000.0, -0.5),
    Meter("счётчик-1", "V", 0.0, 500.0),  # not ASCII: never the fast path
    Meter("m~!@#$%^&*()", "A", 0.0, 100.0),
    Meter("a b", "A", 0.0, 100.0),  # (config refuses spaces in ids; the parsers need not)
    *(Meter(_long_id(n), "A" if n % 2 else "V", 0.0, 1e6)
      for n in (1, 7, 8, 9, 15, 16, 17, IP_WIDTH - 1, IP_WIDTH, IP_WIDTH + 1, 64)),
]
TABLE = MeterTable(METERS)
UNIT_TEXTS = {"V": ["V", "v", "volt", "VOLT", "Volt", "В", "в"],
              "A": ["A", "a", "amp", "AMP", "Amp", "А", "а"]}
# inserted as UTF-8: digits of other scripts, Unicode spaces, look-alikes, combining marks
ODD_CHARS = ("٠١٥٩۵०५０１５９⁵₅²½Ⅴᲀ\u00a0\u2003\u3000\u0085\u1680\u200b\ufeff\u2028"
             "\u0301еЕоОе\x7f\x1c\x1f\x0b\x0c")
widths = st.sampled_from([1, 2, 14, 15, 16, 17, 30, VALUE_WIDTH - 1, VALUE_WIDTH,
                          VALUE_WIDTH + 1, 40])


@st.composite
def timestamps(draw) -> str:
    y = draw(st.integers(1970, 2100))
    mo = draw(st.integers(1, 12))
    d = draw(st.integers(1, 28)) if draw(st.booleans()) else draw(st.integers(1, 31))
    h, mi, s = draw(st.integers(0, 23)), draw(st.integers(0, 59)), draw(st.integers(0, 59))
    frac = draw(st.text("0123456789", min_size=6, max_size=6))  # the usual: the fast path's
    if draw(st.integers(0, 4)) == 0:
        frac = frac[: draw(st.integers(1, 6))]
    if draw(st.integers(0, 9)) == 0:  # sometimes out of range, or the wrong frac width
        h, frac = draw(st.integers(0, 99)), draw(st.text("0123456789", max_size=8))
    return f"{y:04d}.{mo:02d}.{d:02d} {h:02d}:{mi:02d}:{s:02d}.{frac}"


@st.composite
def numbers(draw, meter: Meter) -> str:
    """A NUMBER, mostly in the meter's range, written in one of many ways."""
    lo, hi = max(meter.range_start, -1e12), min(meter.range_stop, 1e12)
    x = draw(st.floats(lo, hi, allow_nan=False))
    form = draw(st.integers(0, 9))
    if form == 0:
        text = repr(x)
    elif form == 1:
        text = f"{x:.{draw(st.integers(0, 17))}f}"
    elif form == 2:
        text = f"{x:{draw(st.sampled_from(['e', 'E']))}}"
    elif form == 3:  # padded to a width around the fast path's edges
        text = f"{x:.3f}"
        width = draw(widths)
        if draw(st.booleans()):
            text = text.rjust(width, "0") if x >= 0 else text
        else:
            text = text.ljust(width, "0") if "." in text else text
    elif form == 4:  # 15, 16, 17 significant digits
        text = f"{x:.{draw(st.integers(13, 18))}g}"
    elif form == 5:  # any NUMBER at all, mostly out of range
        text = draw(st.from_regex(parsing._NUMBER, fullmatch=True))
    elif form == 6:
        text = draw(st.sampled_from(["0", "-0", "+0", ".5", "5.", "0.", ".0", "-.5", "+5.",
                                     "1e0", "1E+0", "5e-1", "1e", "1e+", "e5", ".", "+", "-",
                                     "--5", "+-5", "1..5", "1.5.", "1e5.5", "1_0", "0x10",
                                     "inf", "nan", "Infinity", "1e999", "-1e999", "1e-999"]))
    else:
        text = f"{x:.{draw(st.integers(0, 6))}f}"
    if x >= 0 and draw(st.integers(0, 5)) == 0:
        text = "+" + text
    return text


@st.composite
def valid_lines(draw) -> bytes:
    meter = draw(st.sampled_from(METERS))
    value = draw(numbers(meter))
    if draw(st.integers(0, 3)) == 0:  # a unit, with or without spaces
        unit = draw(st.sampled_from(UNIT_TEXTS[meter.unit] + ["kW", "VA", "e", "x"]))
        value = value + " " * draw(st.integers(0, 2)) + unit
    if draw(st.integers(0, 4)) == 0:
        value = " " * draw(st.integers(0, 2)) + value + " " * draw(st.integers(0, 2))
    return f"{meter.ip}\t{draw(timestamps())}\t{value}".encode()


@st.composite
def mutated(draw, line: bytes) -> bytes:
    for _ in range(draw(st.integers(1, 3))):
        pos = draw(st.integers(0, len(line)))
        kind = draw(st.integers(0, 6))
        if kind == 0:  # insert any byte
            line = line[:pos] + bytes([draw(st.integers(0, 255))]) + line[pos:]
        elif kind == 1:  # replace a byte with any byte
            line = line[:pos] + bytes([draw(st.integers(0, 255))]) + line[pos + 1:]
        elif kind == 2:  # the usual suspects: NUL, CR, TAB, space, high bytes
            b = draw(st.sampled_from([b"\x00", b"\x00\x00", b"\r", b"\t", b" ", b"\x80",
                                      b"\xff", b"\xc3", b"\x7f"]))
            line = line[:pos] + b + line[pos + draw(st.integers(0, 1)):]
        elif kind == 3:  # a non-ASCII digit, space or look-alike, as UTF-8
            ch = draw(st.sampled_from(ODD_CHARS) | st.characters(exclude_characters="\n"))
            line = line[:pos] + ch.encode("utf-8", "surrogatepass") + line[pos:]
        elif kind == 4:  # cut short
            line = line[:pos]
        elif kind == 5:  # delete a few bytes
            line = line[:pos] + line[pos + draw(st.integers(1, 3)):]
        else:  # at the end: what a torn or padded buffer looks like
            line = line + draw(st.sampled_from([b"\x00", b"\x00\x00", b"\r", b"\r\r", b" ",
                                                b"\t", b"0", b"5"]))
    return line.replace(b"\n", b"")


lines = st.one_of(
    valid_lines(),
    valid_lines().flatmap(mutated),
    st.binary(max_size=90).map(lambda b: b.replace(b"\n", b"")),
)


def expected(line: bytes):
    result = parse_line(line, TABLE)
    if isinstance(result, Reject):
        return result, line[:-1] if line.endswith(b"\r") else line
    m, ts, value = result
    return m, ts, value.hex()  # hex: -0.0 and 0.0 differ


def verdicts(block: bytes, count: int) -> list:
    """What parse_block says about each of the block's ``count`` lines, in line order."""
    got = parse_block(block, TABLE)
    assert got.meter.dtype == "int32" and got.ts_us.dtype == "int64"
    assert got.value.dtype == "float64" and got.line.dtype == "int64"
    out: list = [None] * count
    for m, ts, value, i in zip(got.meter.tolist(), got.ts_us.tolist(), got.value.tolist(),
                               got.line.tolist(), strict=True):
        assert out[i] is None
        out[i] = (m, ts, value.hex())
    for (line, reject), i in zip(got.rejects, got.reject_lines, strict=True):
        assert out[i] is None
        out[i] = (reject, line)
    assert None not in out
    return out


@PROPERTY
@given(st.lists(lines, min_size=1, max_size=40), st.booleans(), st.booleans())
def test_parse_block_gives_every_line_the_reference_verdict(block_lines, crlf, final_newline):
    if crlf:
        block_lines = [line + b"\r" for line in block_lines]
    block = b"\n".join(block_lines) + (b"\n" if final_newline else b"")
    if not final_newline and block_lines[-1] == b"":  # no line after the last newline
        block_lines = block_lines[:-1]
    want = [expected(line) for line in block_lines]
    assert verdicts(block, len(block_lines)) == want
    if block_lines:  # other neighbours, in another order
        backwards = b"\n".join(reversed(block_lines)) + b"\n"
        assert verdicts(backwards, len(block_lines)) == want[::-1]
    for line, verdict in zip(block_lines, want, strict=True):  # alone, the same verdict
        assert verdicts(line + b"\n", 1) == [verdict]
