import msgpack
import numpy as np
import pytest

from shared import messages
from shared.messages import MessageError


def test_round_trip_keeps_values_and_dtypes():
    data = {
        "i": np.array([1, -2, 2**40], dtype=np.int64),
        "f": np.array([0.5, -1e300, 3.25], dtype=np.float64),
        "s": np.array([b"10.0.0.1", b"x", b""], dtype="S15"),
        "empty": np.empty(0, dtype=np.int64),
        "bytes": [b"a\tb\n", b"\xff"],
        "text": ["x", "\u0412"],
        "nested": {"n": 1, "f": 2.5, "none": None},
    }
    body = messages.encode("src-1", 7, 123.5, data)
    msg = messages.decode(b"raw", body)
    assert (msg.topic, msg.src, msg.seq, msg.t) == (b"raw", "src-1", 7, 123.5)
    for key in ("i", "f", "s", "empty"):
        assert msg.data[key].dtype == data[key].dtype
        assert msg.data[key].tolist() == data[key].tolist()
    assert msg.data["bytes"] == data["bytes"]
    assert msg.data["text"] == data["text"]
    assert msg.data["nested"] == data["nested"]


def test_big_endian_arrays_arrive_little_endian_with_same_values():
    arr = np.array([1.5, 2.5], dtype=">f8")
    msg = messages.decode(b"t", messages.encode("s", 0, 0.0, {"a": arr}))
    assert msg.data["a"].tolist() == [1.5, 2.5]


@pytest.mark.parametrize("body", [
    b"", b"\xc1", b"not msgpack at all \xff\xfe",
    msgpack.packb([1, 2, 3]),
    msgpack.packb({"v": 99, "src": "x", "seq": 0, "t": 0, "data": {}}),
    msgpack.packb({"v": 1, "src": "x", "t": 0, "data": {}}),
])
def test_garbage_raises_message_error(body):
    with pytest.raises(MessageError):
        messages.decode(b"raw", body)


def test_to_jsonable():
    data = {"s": np.array([b"a", b"\xff"], dtype="S2"), "v": np.array([1.0, 2.0]),
            "b": [b"x\n"]}
    assert messages.to_jsonable(data) == {"s": ["a", "\\xff"], "v": [1.0, 2.0], "b": ["x\n"]}
