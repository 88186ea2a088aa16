"""Framing of a connection's bytes: the verdicts depend on the bytes alone, never on how the
network split them, and a connection's abrupt end never completes a cut-off line."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from services.ingest.framing import REJECT_KEEP, Framer

MAX = 32


def frame(segments: list[bytes], orderly: bool = True, max_line: int = MAX):
    """(lines accepted, rejections, every line in order: accepted ones, or a rejection's
    reason) of a connection that sent ``segments`` and then ended."""
    f = Framer(max_line)
    lines, rejects, order = [], [], []
    for seg in segments:
        block, rej = f.feed(seg)
        got = block.split(b"\n")[:-1]
        for *r, ordinal in rej:  # the ordinals put the rejections back in their places
            got.insert(ordinal, tuple(r))
        lines += [x for x in got if isinstance(x, bytes)]
        rejects += [x for x in got if isinstance(x, tuple)]
        order.extend(x if isinstance(x, bytes) else x[1] for x in got)
    block, rej = f.end(orderly, "test")
    lines += block.split(b"\n")[:-1]
    rejects += [tuple(r[:3]) for r in rej]
    order.extend(block.split(b"\n")[:-1] + [r[1] for r in rej])
    return lines, rejects, order


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    cuts = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


line_bytes = st.lists(st.sampled_from([b"a", b"7", b"\t", b"\r", b"\n", b"\r\n", b" ", b"\0",
                                       b"\xff", b"x" * 10, b"y" * MAX]), max_size=60)


@settings(max_examples=400, deadline=None)
@given(parts=line_bytes, cuts=st.lists(st.integers(0, 10_000), max_size=12),
       orderly=st.booleans())
def test_the_same_bytes_frame_the_same_however_they_are_split(parts, cuts, orderly):
    data = b"".join(parts)
    assert frame(split_at(data, cuts), orderly) == frame([data], orderly)


def test_crlf_line_of_exactly_max_line_bytes_whatever_the_segments():
    line = b"x" * MAX + b"\r\n"
    for cut in range(len(line) + 1):
        assert frame([line[:cut], line[cut:]])[:2] == ([b"x" * MAX + b"\r"], [])


def test_over_long_line_reported_once_with_its_length_and_first_bytes():
    long = b"z" * 300
    for segments in ([long + b"\nok\n"], [long[:40], long[40:250], long[250:] + b"\r", b"\nok\n"]):
        lines, rejects, order = frame(segments)
        assert lines == [b"ok"] and order == ["line_too_long", b"ok"]
        assert len(rejects) == 1
        prefix, reason, message = rejects[0]
        assert reason == "line_too_long" and prefix == long[:REJECT_KEEP]
        assert message == f"line of 300 bytes is longer than ingest.max_line ({MAX})"


def test_orderly_eof_completes_the_last_line_abrupt_end_rejects_it():
    assert frame([b"a\nlast"], orderly=True)[:2] == ([b"a", b"last"], [])
    lines, rejects, _ = frame([b"a\n10.0.0.1\tts\t10"], orderly=False)
    assert lines == [b"a"]
    assert [(r[0], r[1]) for r in rejects] == [(b"10.0.0.1\tts\t10", "truncated")]
    assert "test" in rejects[0][2]


def test_nothing_pending_at_the_end_is_nothing_to_reject():
    assert frame([b"a\n", b"b\n"], orderly=False)[:2] == ([b"a", b"b"], [])


def test_ordinals_place_rejections_among_the_lines():
    long = b"z" * 40
    _, _, order = frame([b"a\n" + long, b"\nb\n" + long + b"\nc\n" + long], orderly=False)
    assert order == [b"a", "line_too_long", b"b", "line_too_long", b"c", "line_too_long"]
