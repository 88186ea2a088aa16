"""The message schema: round trips of every topic, and decode on garbage of every kind (explicit
cases, and hypothesis on arbitrary bytes and arbitrary msgpack structures): only MessageError,
and every message decode accepts has the shape README.md's "Messages" documents."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from shared import messages, topics
from shared.messages import MessageError
from tests.shared.examples import PROPERTY

F8, I8 = np.float64, np.int64


def valid_data(topic: bytes, n: int = 3) -> dict | list:
    """A well-formed ``data`` of ``topic`` with ``n`` records, as the services send it."""
    if topic == topics.RAW:
        return {"peer": ["127.0.0.1:5000"] * n, "t_recv": np.arange(n, dtype=F8),
                "data": [b"10.0.0.1\t2024.01.01 00:00:00.000000\t5\n"] * n, "base": 0,
                "sender": ["sim-1"] + [None] * (n - 1),
                "line_no": [np.array([7], I8)] + [None] * (n - 1),
                "rejected": {"line": [b"x" * 20], "reason": ["line_too_long"],
                             "message": ["too long"], "peer": ["127.0.0.1:5000"],
                             "t_recv": np.array([1.5]), "sender": [None], "line_no": [None]}}
    if topic == topics.READING:
        return {"meter": np.array([b"10.0.0.1"] * n, "S"), "unit": np.array([b"V"] * n, "S"),
                "ts_us": np.arange(n, dtype=I8), "value": np.ones(n), "t_recv": np.ones(n)}
    if topic == topics.REJECTED:
        return {"line": [b"bad\xff"] * n, "reason": ["bad_value"] * n, "message": ["no"] * n,
                "peer": ["p"] * n, "t_recv": np.ones(n)}
    if topic == topics.POWER:
        return {"circuit": np.array([b"c1"] * n, "S"), "ts_us": np.arange(n, dtype=I8),
                "watts": np.ones(n), "volts": np.ones(n), "amps": np.ones(n),
                "v_meter": np.array([b"10.0.0.1"] * n, "S"),
                "a_meter": np.array([b"10.0.0.2"] * n, "S"),
                "t_recv": np.ones(n)}
    if topic == topics.ACK:
        return {"source": ["ingest-a"] * n, "seq": list(range(n))}
    assert topic == topics.STATS
    return {"service": "storage", "id": "storage-x", "pid": 7, "uptime_s": 1.5,
            "counters": {"gaps": 0, "x": 2.5}, "gauges": {"db": {"readings": 3}, "ok": True,
                                                          "none": None, "l": [1, "a"]},
            "subscribed": ["raw"]}


ALL_TOPICS = (topics.RAW, topics.READING, topics.REJECTED, topics.POWER, topics.ACK,
              topics.STATS)
# README.md "Messages", written out again here: what every accepted message must look like
DOCUMENTED = {
    b"raw": {"peer": "str", "t_recv": "<f8", "data": "bytes"},
    b"reading": {"meter": "S", "unit": "S", "ts_us": "<i8", "value": "<f8", "t_recv": "<f8"},
    b"rejected": {"line": "bytes", "reason": "str", "message": "str", "peer": "str",
                  "t_recv": "<f8"},
    b"power": {"circuit": "S", "ts_us": "<i8", "watts": "<f8", "volts": "<f8", "amps": "<f8",
               "v_meter": "S", "a_meter": "S", "t_recv": "<f8"},
    b"ack": {"source": "str", "seq": "int"},
}
SCALARS = (type(None), bool, int, float, str, bytes)


def column_ok(col, kind: str) -> bool:
    if kind in ("S", "<i8", "<f8"):
        return (isinstance(col, np.ndarray) and col.ndim == 1
                and (col.dtype.kind == "S" if kind == "S" else col.dtype.str == kind))
    want = {"str": str, "bytes": bytes, "int": int, "num": (int, float)}[kind]
    return type(col) is list and all(isinstance(x, want) and type(x) is not bool for x in col)


def assert_documented_shape(msg: messages.Message) -> None:
    assert msg.topic in ALL_TOPICS
    assert type(msg.src) is str and msg.src
    assert type(msg.seq) is int and 0 <= msg.seq < 2**63
    assert type(msg.t) in (int, float)
    data = msg.data
    assert type(data) is dict
    if msg.topic == topics.STATS:
        for key, kind in (("service", str), ("id", str), ("pid", int), ("counters", dict),
                          ("gauges", dict), ("subscribed", list)):
            assert type(data[key]) is kind
        assert type(data["uptime_s"]) in (int, float)
        assert all(type(v) in (int, float) for v in data["counters"].values())
        assert all(type(t) is str for t in data["subscribed"])
        return
    lengths = set()
    for key, kind in DOCUMENTED[msg.topic].items():
        assert column_ok(data[key], kind), (key, data[key])
        lengths.add(len(data[key]))
    for key, col in data.items():  # further columns: columns all the same
        if key in ("sender", "line_no") and msg.topic == topics.RAW:
            lengths.add(len(col))  # per chunk (the acknowledged mode)
        elif key not in DOCUMENTED[msg.topic] and key not in ("base", "rejected", "progress"):
            assert isinstance(col, np.ndarray) or (
                type(col) is list and all(type(x) in SCALARS for x in col))
            lengths.add(len(col))
    assert len(lengths) == 1
    for col in ("meter", "unit", "circuit", "v_meter", "a_meter"):
        if col in data:
            for item in data[col].tolist():
                item.decode()  # consumers decode these
    if "ts_us" in data:  # a meter's time: 1970 to 9999
        assert all(0 <= ts < 253_402_300_800_000_000 for ts in data["ts_us"].tolist())
    if msg.topic == topics.RAW:
        assert all(chunk.endswith(b"\n") for chunk in data["data"])
        assert type(data.get("base", 0)) is int and 0 <= data.get("base", 0) < 2**63
        if "rejected" in data:
            tl = data["rejected"]
            assert column_ok(tl["line"], "bytes") and column_ok(tl["message"], "str")
            assert column_ok(tl["peer"], "str") and column_ok(tl["reason"], "str")
            assert isinstance(tl["t_recv"], np.ndarray)
            assert len({len(tl[k]) for k in tl}) == 1


def decodes_or_refuses(topic: bytes, body: bytes) -> messages.Message | None:
    """decode's only two outcomes: a documented message, or MessageError (no other error)."""
    try:
        msg = messages.decode(topic, body)
    except MessageError as exc:
        assert "a gap in the checks" not in str(exc)
        return None
    assert_documented_shape(msg)
    return msg


# --- well-formed messages ---

@pytest.mark.parametrize("topic", ALL_TOPICS)
def test_every_topic_round_trips(topic):
    data = valid_data(topic)
    msg = decodes_or_refuses(topic, messages.encode("src-1", 7, 123.5, data))
    assert msg is not None and (msg.topic, msg.src, msg.seq, msg.t) == (topic, "src-1", 7, 123.5)
    assert messages.to_jsonable(msg.data) == messages.to_jsonable(data)
    for key, col in data.items():
        if isinstance(col, np.ndarray):
            assert msg.data[key].dtype == col.dtype


def test_what_ingest_journals_decodes_as_raw():
    """A journal file: raw without ``base`` (added when sent), t 0.0, empty columns, and
    over-long lines only."""
    data = {"peer": [], "t_recv": np.array([], dtype=F8), "data": [],
            "rejected": {"line": [b"x" * 200], "reason": ["line_too_long"],
                         "message": ["line of 2000 bytes"], "peer": ["127.0.0.1:1"],
                         "t_recv": np.array([1700000000.5])}}
    msg = decodes_or_refuses(topics.RAW, messages.encode("ingest-h-1234abcd", 0, 0.0, data))
    assert msg is not None and msg.data["rejected"]["line"] == [b"x" * 200]


def test_big_endian_arrays_arrive_little_endian_with_same_values():
    data = valid_data(topics.READING, 2)
    data["value"] = np.array([1.5, 2.5], dtype=">f8")
    msg = messages.decode(topics.READING, messages.encode("s", 0, 0.0, data))
    assert msg.data["value"].dtype.str == "<f8" and msg.data["value"].tolist() == [1.5, 2.5]


def test_empty_batches_and_further_columns_of_the_same_length():
    data = valid_data(topics.POWER, 0)
    assert decodes_or_refuses(topics.POWER, messages.encode("s", 0, 0.0, data)) is not None
    data = dict(valid_data(topics.READING, 2), quality=[1, None], flags=np.zeros(2, I8))
    assert decodes_or_refuses(topics.READING, messages.encode("s", 0, 0.0, data)) is not None


@pytest.mark.parametrize("arr", [np.zeros((2, 2)), np.zeros(2, np.int32), np.array(["x"]),
                                 np.array([None], dtype=object)])
def test_encode_sends_only_what_decode_takes(arr):
    with pytest.raises(TypeError):
        messages.encode("s", 0, 0.0, {"a": arr})


# --- garbage ---

def body(data=None, topic=topics.READING, **fields) -> bytes:
    obj = {"v": 1, "src": "s", "seq": 0, "t": 0.0,
           "data": valid_data(topic) if data is None else data}
    obj.update(fields)
    return msgpack.packb(obj, default=messages._default, use_bin_type=True)


def ndarray_ext(dtype, n, payload: bytes) -> msgpack.ExtType:
    return msgpack.ExtType(1, msgpack.packb([dtype, n]) + payload)


def reading_with(**columns) -> dict:
    return dict(valid_data(topics.READING, 2), **columns)


GARBAGE = {
    "empty": (topics.RAW, b""),
    "not msgpack": (topics.RAW, b"\xc1"),
    "text": (topics.RAW, b"not msgpack at all \xff\xfe"),
    "truncated": (topics.READING, body()[:-3]),
    "trailing bytes": (topics.READING, body() + b"\x00"),
    "a list": (topics.RAW, msgpack.packb([1, 2, 3])),
    "version 99": (topics.RAW, body(v=99)),
    "version True": (topics.READING, body(v=True)),
    "no seq": (topics.RAW, msgpack.packb({"v": 1, "src": "x", "t": 0, "data": {}})),
    "seq a string": (topics.READING, body(seq="7")),
    "seq a float": (topics.READING, body(seq=7.0)),
    "seq negative": (topics.READING, body(seq=-1)),
    "seq past SQLite's integers": (topics.READING, body(seq=2**63)),
    "src an int": (topics.READING, body(src=5)),
    "src empty": (topics.READING, body(src="")),
    "src huge": (topics.READING, body(src="x" * 5000)),
    "t a string": (topics.READING, body(t="now")),
    "t None": (topics.READING, body(t=None)),
    "int map keys": (topics.READING, msgpack.packb({1: 2})),
    "unknown topic": (b"nonsense", body()),
    "a topic that starts like one": (b"rawx", body(valid_data(topics.RAW), topics.RAW)),
    "raw data an int": (topics.RAW, body(dict(valid_data(topics.RAW), data=5))),
    "raw data a str": (topics.RAW, body(dict(valid_data(topics.RAW), data="x\n"))),
    "raw chunk without newline": (topics.RAW, body(dict(valid_data(topics.RAW, 1),
                                                        data=[b"10.0.0.1\tx\t5"]))),
    "raw chunk empty": (topics.RAW, body(dict(valid_data(topics.RAW, 1), data=[b""]))),
    "raw peer bytes": (topics.RAW, body(dict(valid_data(topics.RAW, 1), peer=[b"p"]))),
    "raw t_recv a list": (topics.RAW, body(dict(valid_data(topics.RAW, 1), t_recv=[1.0]))),
    "raw t_recv int64": (topics.RAW, body(dict(valid_data(topics.RAW, 1),
                                               t_recv=np.zeros(1, I8)))),
    "raw columns unequal": (topics.RAW, body(dict(valid_data(topics.RAW, 2), peer=["p"]))),
    "raw base a str": (topics.RAW, body(dict(valid_data(topics.RAW), base="0"))),
    "raw base huge": (topics.RAW, body(dict(valid_data(topics.RAW), base=2**64 - 1))),
    "raw rejected a list": (topics.RAW, body(dict(valid_data(topics.RAW), rejected=[1]))),
    "raw rejected unequal": (topics.RAW, body(dict(
        valid_data(topics.RAW), rejected={"line": [b"x"], "reason": ["r"], "message": [],
                                          "peer": ["p"], "t_recv": np.ones(1)}))),
    "raw line_no a list of ints": (topics.RAW, body(dict(valid_data(topics.RAW, 1),
                                                         sender=["s"], line_no=[[1]]))),
    "power progress a list": (topics.POWER, body(dict(valid_data(topics.POWER),
                                                      progress=[1]))),
    "raw without data": (topics.RAW, body({"peer": [], "t_recv": np.zeros(0)})),
    "reading columns unequal": (topics.READING, body(reading_with(value=np.ones(3)))),
    "reading value a list": (topics.READING, body(reading_with(value=[1.0, 2.0]))),
    "reading ts_us float": (topics.READING, body(reading_with(ts_us=np.ones(2)))),
    "reading meter int64": (topics.READING, body(reading_with(meter=np.ones(2, I8)))),
    "reading ts_us before 1970": (topics.READING, body(reading_with(ts_us=np.array([0, -1])))),
    "reading ts_us past 9999": (topics.READING, body(reading_with(
        ts_us=np.array([0, messages.TS_END])))),
    "power ts_us past 9999": (topics.POWER, body(dict(valid_data(topics.POWER, 1),
                                                       ts_us=np.array([2**62])), topics.POWER)),
    "reading meter not UTF-8": (topics.READING, body(reading_with(
        meter=np.array([b"\xff", b"ok"])))),
    "reading meter cut UTF-8": (topics.READING, body(reading_with(
        meter=np.array([b"\xc3", b"\xa9"])))),
    "reading without t_recv": (topics.READING, body(
        {k: v for k, v in valid_data(topics.READING).items() if k != "t_recv"})),
    "reading a list": (topics.READING, body([1, 2])),
    "reading further column unequal": (topics.READING, body(reading_with(extra=[1]))),
    "reading further column nested": (topics.READING, body(reading_with(extra=[[1], [2]]))),
    "power circuit not UTF-8": (topics.POWER, body(dict(valid_data(topics.POWER, 1),
                                                         circuit=np.array([b"\xfe"])),
                                                    topics.POWER)),
    "ack seq strings": (topics.ACK, body({"source": ["a"], "seq": ["1"]})),
    "ack seq bool": (topics.ACK, body({"source": ["a"], "seq": [True]})),
    "ack unequal": (topics.ACK, body({"source": ["a", "b"], "seq": [1]})),
    "ack source an int": (topics.ACK, body({"source": 1, "seq": 1})),
    "stats a list": (topics.STATS, body([1])),
    "stats without service": (topics.STATS, body(
        {k: v for k, v in valid_data(topics.STATS).items() if k != "service"})),
    "stats counters a list": (topics.STATS, body(dict(valid_data(topics.STATS), counters=[]))),
    "stats counter a str": (topics.STATS, body(dict(valid_data(topics.STATS),
                                                    counters={"a": "1"}))),
    "stats uptime a dict": (topics.STATS, body(dict(valid_data(topics.STATS), uptime_s={}))),
    "stats subscribed ints": (topics.STATS, body(dict(valid_data(topics.STATS),
                                                      subscribed=[1]))),
    "stats gauge an array": (topics.STATS, body(dict(valid_data(topics.STATS),
                                                     gauges={"a": np.ones(2)}))),
    "stats gauge a timestamp": (topics.STATS, body(dict(
        valid_data(topics.STATS), gauges={"a": msgpack.Timestamp(1, 0)}))),
    "deep nesting": (topics.STATS, b"\x91" * 100_000 + b"\xc0"),
    # the NumPy extension type
    "object dtype": (topics.READING, body(reading_with(value=ndarray_ext("|O", 2, b"\0" * 16)))),
    "object dtype 'O'": (topics.READING, body(reading_with(value=ndarray_ext("O", 2, b"\0" * 16)))),
    "structured dtype": (topics.READING, body(reading_with(
        value=ndarray_ext([["a", "<i8"]], 2, b"\0" * 16)))),
    "structured dtype string": (topics.READING, body(reading_with(
        value=ndarray_ext("i8,i8", 1, b"\0" * 16)))),
    "subarray dtype": (topics.READING, body(reading_with(value=ndarray_ext("(2,)<f8", 1,
                                                                           b"\0" * 16)))),
    "big-endian dtype": (topics.READING, body(reading_with(value=ndarray_ext(">f8", 2,
                                                                             b"\0" * 16)))),
    "unicode dtype": (topics.READING, body(reading_with(meter=ndarray_ext("<U2", 2, b"\0" * 16)))),
    "zero-width bytes dtype": (topics.READING, body(reading_with(meter=ndarray_ext("|S0", 2,
                                                                                   b"")))),
    "datetime dtype": (topics.READING, body(reading_with(ts_us=ndarray_ext("<M8[us]", 2,
                                                                           b"\0" * 16)))),
    "dtype an int": (topics.READING, body(reading_with(value=ndarray_ext(8, 2, b"\0" * 16)))),
    "negative count": (topics.READING, body(reading_with(value=ndarray_ext("<f8", -1,
                                                                           b"\0" * 16)))),
    "enormous count": (topics.READING, body(reading_with(value=ndarray_ext("<f8", 2**62,
                                                                           b"\0" * 16)))),
    "count past 64 bits": (topics.READING, body(reading_with(value=ndarray_ext(
        "<f8", 2**64 - 1, b"\0" * 16)))),
    "count too small for the bytes": (topics.READING, body(reading_with(
        value=ndarray_ext("<f8", 1, b"\0" * 16)))),
    "count a float": (topics.READING, body(reading_with(value=ndarray_ext("<f8", 2.0,
                                                                          b"\0" * 16)))),
    "header not a list": (topics.READING, body(reading_with(
        value=msgpack.ExtType(1, msgpack.packb("<f8") + b"\0" * 16)))),
    "header empty": (topics.READING, body(reading_with(value=msgpack.ExtType(1, b"")))),
    "header huge": (topics.READING, body(reading_with(
        value=msgpack.ExtType(1, msgpack.packb(["<f8", 2, "x" * 1000]))))),
    "unknown extension type": (topics.READING, body(reading_with(
        value=msgpack.ExtType(5, b"\0" * 16)))),
}


@pytest.mark.parametrize("name", GARBAGE)
def test_garbage_is_refused_with_message_error(name):
    topic, garbage = GARBAGE[name]
    with pytest.raises(MessageError) as exc:
        messages.decode(topic, garbage)
    assert "a gap in the checks" not in str(exc.value) and len(str(exc.value)) < 300


# --- hypothesis: arbitrary bytes, arbitrary msgpack structures ---

topic_frames = st.sampled_from(ALL_TOPICS) | st.binary(max_size=12)


@PROPERTY
@given(topic_frames, st.binary(max_size=3000))
def test_arbitrary_bytes(topic, data):
    decodes_or_refuses(topic, data)


@PROPERTY
@given(st.sampled_from(ALL_TOPICS), st.data())
def test_valid_bodies_cut_or_with_a_byte_changed(topic, data):
    good = messages.encode("src", 3, 1.0, valid_data(topic, data.draw(st.integers(0, 4))))
    pos = data.draw(st.integers(0, len(good) - 1))
    mangled = data.draw(st.sampled_from([
        good[:pos],
        good[:pos] + bytes([data.draw(st.integers(0, 255))]) + good[pos + 1:],
        good[:pos] + bytes([data.draw(st.integers(0, 255))]) + good[pos:],
    ]))
    decodes_or_refuses(topic, mangled)


DTYPES = ["<i8", "<f8", "|S1", "|S8", ">i8", "<i4", "|u1", "|b1", "<f2", "|O", "O", "<U1",
          "|S0", "V8", "i8,i8", "(2,)<i8", "<M8[us]", "|S99999999", "", "garbage", "<c16"]
arrays = st.builds(
    lambda dtype, n, extra, fill: ndarray_ext(dtype, n, fill * (max(n, 0) * 8 % 4096 + extra)),
    st.sampled_from(DTYPES) | st.text(max_size=10),
    st.sampled_from([0, 1, 2, 3, -1, -2**63, 2**32, 2**62, 2**64 - 1]) | st.integers(-5, 20),
    st.integers(-8, 8).map(abs), st.sampled_from([b"\0", b"\xff", b"A"]),
)
scalars = (st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats()
           | st.text(max_size=20) | st.binary(max_size=20)
           | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=20))
           | st.builds(msgpack.Timestamp, st.integers(0, 2**34 - 1), st.integers(0, 10**9 - 1))
           | arrays)
structures = st.recursive(
    scalars,
    lambda children: (st.lists(children, max_size=5)
                      | st.dictionaries(st.text(max_size=8) | st.binary(max_size=4), children,
                                        max_size=5)),
    max_leaves=12,
)


@st.composite
def almost_messages(draw) -> tuple[bytes, dict]:
    """Message-shaped maps: every field, and every column of the topic, either well-formed or
    an arbitrary structure; sometimes columns missing or added."""
    topic = draw(st.sampled_from(ALL_TOPICS))
    data = valid_data(topic, draw(st.integers(0, 3)))
    if isinstance(data, dict):
        for key in list(data):
            choice = draw(st.integers(0, 5))
            if choice == 0:
                data[key] = draw(structures)
            elif choice == 1:
                del data[key]
        if draw(st.booleans()):
            data[draw(st.text(max_size=6))] = draw(structures)
    obj = {"v": 1, "src": "s", "seq": 1, "t": 2.0, "data": data}
    for key in list(obj):
        if draw(st.integers(0, 7)) == 0:
            obj[key] = draw(structures)
    if draw(st.integers(0, 9)) == 0:
        obj = draw(structures)
    return topic, obj


@PROPERTY
@given(almost_messages())
def test_arbitrary_msgpack_structures(topic_and_obj):
    topic, obj = topic_and_obj
    try:
        packed = msgpack.packb(obj, default=messages._default, use_bin_type=True)
    except (TypeError, ValueError, OverflowError):  # not a msgpack document (a NumPy dtype)
        assume(False)
    decodes_or_refuses(topic, packed)


@PROPERTY
@given(st.sampled_from(ALL_TOPICS), structures)
def test_arbitrary_msgpack_structures_as_data(topic, data):
    obj = {"v": 1, "src": "s", "seq": 1, "t": 2.0, "data": data}
    decodes_or_refuses(topic, msgpack.packb(obj, use_bin_type=True))


def test_to_jsonable():
    data = {"s": np.array([b"a", b"\xff"], dtype="S2"), "v": np.array([1.0, 2.0]),
            "b": [b"x\n"]}
    assert messages.to_jsonable(data) == {"s": ["a", "\\xff"], "v": [1.0, 2.0], "b": ["x\n"]}
