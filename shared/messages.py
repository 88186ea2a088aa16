"""The one message schema: encode and decode bus bodies. No other module calls msgpack.

A message is two frames, ``[topic, body]``. The body is a msgpack map::

    {"v": 1, "src": "storage-host-123", "seq": 42, "t": 1700000000.123, "data": {...}}

``v`` is the schema version, ``src`` the sender's id, ``seq`` the sender's per-topic sequence
number (0, 1, 2, ... without gaps), ``t`` the send time (Unix seconds). For record topics ``data``
holds one *batch* of records as columns: a dict of equally long columns. A column is a list or a
NumPy array; arrays travel as raw little-endian bytes (msgpack extension type 1), so a batch of
100,000 readings costs a few memory copies and no per-reading Python objects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

VERSION = 1
_EXT_NDARRAY = 1


class MessageError(ValueError):
    """A body that is not a valid wattflow message."""


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        arr = np.ascontiguousarray(obj)
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        header = msgpack.packb((arr.dtype.str, arr.shape[0] if arr.ndim else 0))
        return msgpack.ExtType(_EXT_NDARRAY, header + arr.tobytes())
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot encode {type(obj).__name__}")


def _ext_hook(code: int, payload: bytes) -> Any:
    if code != _EXT_NDARRAY:
        return msgpack.ExtType(code, payload)
    unpacker = msgpack.Unpacker()
    unpacker.feed(payload)
    dtype, n = unpacker.unpack()
    offset = unpacker.tell()
    return np.frombuffer(payload, dtype=np.dtype(dtype), count=n, offset=offset)


@dataclass(frozen=True, slots=True)
class Message:
    topic: bytes
    src: str
    seq: int
    t: float
    data: Any


def encode(src: str, seq: int, t: float, data: Any) -> bytes:
    return msgpack.packb(
        {"v": VERSION, "src": src, "seq": seq, "t": t, "data": data},
        default=_default,
        use_bin_type=True,
    )


def decode(topic: bytes, body: bytes) -> Message:
    try:
        obj = msgpack.unpackb(body, ext_hook=_ext_hook, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several types for garbage
        raise MessageError(f"undecodable body on {topic!r}: {exc}") from exc
    if not isinstance(obj, dict) or obj.get("v") != VERSION:
        raise MessageError(f"unsupported message on {topic!r}: version {obj!r:.40}")
    try:
        return Message(topic, obj["src"], obj["seq"], obj["t"], obj["data"])
    except KeyError as exc:
        raise MessageError(f"message on {topic!r} lacks {exc}") from exc


def to_jsonable(obj: Any) -> Any:
    """Plain-JSON form of a decoded body part, for `wattflow tap`."""
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind == "S":
            return [b.decode("utf-8", "backslashreplace") for b in obj.tolist()]
        return obj.tolist()
    if isinstance(obj, bytes):
        return obj.decode("utf-8", "backslashreplace")
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    return obj
