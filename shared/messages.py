"""The one message schema: encode, decode and check bus bodies. No other module calls msgpack.

A message is two frames, ``[topic, body]``. The body is a msgpack map::

    {"v": 1, "src": "storage-host-123", "seq": 42, "t": 1700000000.123, "data": {...}}

``v`` is the schema version, ``src`` the sender's id, ``seq`` the sender's per-topic sequence
number (0, 1, 2, ... without gaps), ``t`` the send time (Unix seconds). For record topics ``data``
holds one *batch* of records as columns: a dict of equally long columns. A column is a list or a
NumPy array; arrays travel as raw little-endian bytes (msgpack extension type 1), so a batch of
100,000 readings costs a few memory copies and no per-reading Python objects.

Anyone who reaches the bus can put any bytes on it, so ``decode`` returns only messages of the
shape below and raises ``MessageError`` for everything else (and only that): an unknown topic,
bytes that are not msgpack, a missing or mistyped field, columns of unequal length, an array
of a dtype not on the list, an array whose declared count does not match its bytes.

* ``src`` a non-empty str (at most 1,024 characters); ``seq`` an int in [0, 2**63), as SQLite
  keeps it; ``t`` an int or float; ``data`` as its topic says (``SCHEMA``).
* Array columns are 1-D, of dtype ``<i8``, ``<f8`` or ``|S<n>`` (bytes of valid UTF-8: ids
  and names); list columns hold items of one exact type. A meter time (``ts_us``) lies in
  [1970, 10000): what a meter line can say.
* A record topic's ``data`` may carry further columns (a newer sender's): they are kept if
  they are columns of the same length (lists of plain scalars, or arrays as above). A
  consumer that reads one declares it in ``SCHEMA`` first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

VERSION = 1
_EXT_NDARRAY = 1
MAX_SRC = 1024
SEQ_END = 2**63  # sequence numbers are stored as SQLite integers
TS_END = 253_402_300_800_000_000  # 10000-01-01 in microseconds since 1970: past any YYYY
_ARRAY_DTYPES = ("<i8", "<f8")  # and |S<n>
_BYTES_DTYPE = re.compile(r"\|S[1-9][0-9]{0,5}")
_HEADER_MAX = 32  # an array's msgpack header: [dtype, count]

# Column kinds: "i8", "f8", "S" (NumPy arrays), "ts" (i8 in [0, TS_END): a meter's time, which
# the plotter turns into dates); "str", "bytes", "num" (int or float), "seq" (int in
# [0, 2**63)), "line" (bytes ending in a newline): lists of that.
SCHEMA: dict[bytes, dict[str, str]] = {
    # + base; rejected (RAW_REJECTED); sender, line_no (the acknowledged mode): optional
    b"raw": {"peer": "str", "t_recv": "f8", "data": "line"},
    b"reading": {"meter": "S", "unit": "S", "ts_us": "ts", "value": "f8", "t_recv": "f8"},
    b"rejected": {"line": "bytes", "reason": "str", "message": "str", "peer": "str",
                  "t_recv": "f8"},
    b"power": {"circuit": "S", "ts_us": "ts", "watts": "f8", "volts": "f8", "amps": "f8",
               "v_meter": "S", "a_meter": "S", "t_recv": "f8"},
    b"ack": {"source": "str", "seq": "seq"},
}
# raw's optional per-chunk columns: a sender id or None, the lines' numbers or None
RAW_ACKED = {"sender": "str?", "line_no": "i8?"}
# raw's lines ingest's framing rejected (line_too_long, truncated)
RAW_REJECTED = {"line": "bytes", "reason": "str", "message": "str", "peer": "str",
                "t_recv": "f8"}
RAW_REJECTED_ACKED = {"sender": "str?", "line_no": "seq?"}
STATS = {"service": str, "id": str, "pid": int, "uptime_s": (int, float), "counters": dict,
         "gauges": dict, "subscribed": list}


class MessageError(ValueError):
    """A body that is not a valid wattflow message."""


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        arr = np.ascontiguousarray(obj)
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        if arr.ndim != 1 or not (arr.dtype.str in _ARRAY_DTYPES or arr.dtype.kind == "S"):
            raise TypeError(f"cannot encode a {arr.ndim}-D {arr.dtype.str} array (1-D i8, f8 or"
                            " S only)")
        header = msgpack.packb((arr.dtype.str, arr.shape[0]))
        return msgpack.ExtType(_EXT_NDARRAY, header + arr.tobytes())
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot encode {type(obj).__name__}")


def _ext_hook(code: int, payload: bytes) -> Any:
    if code != _EXT_NDARRAY:
        raise MessageError(f"unknown msgpack extension type {code}")
    unpacker = msgpack.Unpacker(max_buffer_size=_HEADER_MAX)
    unpacker.feed(payload[:_HEADER_MAX])
    header = unpacker.unpack()
    if type(header) is not list or len(header) != 2:
        raise MessageError(f"array header {header!r:.40} is not [dtype, count]")
    dtype, n = header
    if type(dtype) is not str or not (dtype in _ARRAY_DTYPES or _BYTES_DTYPE.fullmatch(dtype)):
        raise MessageError(f"array dtype {dtype!r:.40} is not <i8, <f8 or |S<n>")
    offset = unpacker.tell()
    itemsize = np.dtype(dtype).itemsize
    if type(n) is not int or n < 0 or n * itemsize != len(payload) - offset:
        raise MessageError(f"array of {n!r:.24} x {dtype} in {len(payload) - offset} bytes")
    return np.frombuffer(payload, dtype=dtype, count=n, offset=offset)


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
    """The message in ``body``, checked against its topic's schema; else MessageError."""
    name = topic[:40].decode("utf-8", "backslashreplace")
    if topic != b"stats" and topic not in SCHEMA:
        raise MessageError(f"unknown topic {name!r}")
    try:
        obj = msgpack.unpackb(body, ext_hook=_ext_hook, raw=False)
    except Exception as exc:  # msgpack raises several types for garbage
        raise MessageError(f"undecodable body on {name}: {exc!s:.80}") from exc
    if type(obj) is not dict or type(obj.get("v")) is not int or obj["v"] != VERSION:
        version = obj.get("v") if type(obj) is dict else obj
        raise MessageError(f"unsupported message on {name}: version {version!r:.40}")
    missing = {"src", "seq", "t", "data"} - obj.keys()
    if missing:
        raise MessageError(f"message on {name} lacks {', '.join(sorted(missing))}")
    src, seq, t, data = obj["src"], obj["seq"], obj["t"], obj["data"]
    if type(src) is not str or not 0 < len(src) <= MAX_SRC:
        raise MessageError(f"{name}: src {src!r:.40} is not a sender id")
    if type(seq) is not int or not 0 <= seq < SEQ_END:
        raise MessageError(f"{name}: seq {seq!r:.40} is not a sequence number")
    if type(t) not in (int, float):
        raise MessageError(f"{name}: t {t!r:.40} is not a time")
    try:
        if topic == b"stats":
            _check_stats(data)
        else:
            _check_records(name, data, topic)
    except MessageError:
        raise
    except Exception as exc:  # a gap in the checks above: still a bad message, not a crash
        raise MessageError(f"{name}: {type(exc).__name__} in checking data (a gap in the "
                           f"checks): {exc!s:.80}") from exc
    return Message(topic, src, seq, t, data)


def _check_records(name: str, data: Any, topic: bytes) -> None:
    """A record topic's columns; numbered batches on the work queue (raw, power) also carry
    ``base`` (every batch of the stream below it is applied), power its ``progress``
    (circuit -> checkpoint), raw its framing's ``rejected`` lines and the acknowledged mode's
    ``sender`` and ``line_no`` per chunk."""
    if type(data) is not dict:
        raise MessageError(f"{name}: data is {type(data).__name__}, not a map of columns")
    optional = {b"raw": ("base", "rejected"), b"power": ("base", "progress")}.get(topic, ())
    columns = dict(SCHEMA[topic], **(RAW_ACKED if topic == b"raw" and "sender" in data
                                     else {}))
    _columns(name, data, columns, optional=optional)
    if type(data.get("base", 0)) is not int or not 0 <= data.get("base", 0) < SEQ_END:
        raise MessageError(f"{name}: base {data['base']!r:.40} is not a sequence number")
    if "rejected" in data:
        rejected = data["rejected"]
        acked = type(rejected) is dict and "sender" in rejected
        _columns(f"{name}.rejected", rejected,
                 dict(RAW_REJECTED, **(RAW_REJECTED_ACKED if acked else {})))
    if "progress" in data:
        progress = data["progress"]
        if type(progress) is not dict or not all(
                type(k) is str and type(v) is int and -SEQ_END < v < SEQ_END
                for k, v in progress.items()):
            raise MessageError(f"{name}: progress is not a map of circuits to times")


def _columns(name: str, data: Any, columns: dict[str, str], optional: tuple = ()) -> None:
    """``data`` is a map of equally long columns: ``columns``, of their kinds, and maybe more."""
    if type(data) is not dict:
        raise MessageError(f"{name}: data is {type(data).__name__}, not a map of columns")
    missing = columns.keys() - data.keys()
    if missing:
        raise MessageError(f"{name}: lacks column {', '.join(sorted(missing))}")
    length = None
    for key, col in data.items():
        if key in optional:
            continue
        if type(key) is not str:
            raise MessageError(f"{name}: column name {key!r:.40} is not a str")
        n = _column_length(col, columns.get(key, "any"))
        if n is None:
            raise MessageError(f"{name}: column {key!r:.40} is not a column of "
                               f"{columns.get(key, 'plain values')} ({_describe(col)})")
        if length is not None and n != length:
            raise MessageError(f"{name}: column {key!r:.40} has {n} entries, others {length}")
        length = n


def _column_length(col: Any, kind: str) -> int | None:
    """The column's length if it is a column of ``kind``, else None."""
    if isinstance(col, np.ndarray):  # (1-D, of a listed dtype: see _ext_hook)
        if kind == "any" or col.dtype.str == "<" + kind:
            return len(col)
        if kind == "ts" and col.dtype.str == "<i8" and (
                not col.size or (col.min() >= 0 and col.max() < TS_END)):
            return len(col)
        if kind == "S" and col.dtype.kind == "S" and _utf8(col):
            return len(col)
        return None
    if type(col) is not list:
        return None
    if kind == "i8?":  # per chunk: an array of numbers, or None
        ok = all(x is None or (isinstance(x, np.ndarray) and x.dtype.str == "<i8")
                 for x in col)
        return len(col) if ok else None
    if kind.endswith("?"):  # items of the kind, or None
        items = [x for x in col if x is not None]
        return len(col) if _column_length(items, kind[:-1]) is not None else None
    if kind in _LIST_ITEMS and all(type(x) in _LIST_ITEMS[kind] for x in col):
        if kind == "seq" and not all(0 <= x < SEQ_END for x in col):
            return None
        if kind == "line" and not all(x.endswith(b"\n") for x in col):
            return None
        return len(col)
    return None


_SCALARS = (type(None), bool, int, float, str, bytes)
_LIST_ITEMS = {"str": (str,), "bytes": (bytes,), "num": (int, float), "seq": (int,),
               "line": (bytes,), "any": _SCALARS}


def _utf8(col: np.ndarray) -> bool:
    """Every item of an S column is valid UTF-8 (consumers decode ids and names)."""
    if not col.size or col.view(np.uint8).max() < 0x80:  # ASCII, as nearly always
        return True
    try:
        for item in np.unique(col).tolist():
            item.decode()
    except UnicodeDecodeError:
        return False
    return True


def _check_stats(data: Any) -> None:
    """A service's ``stats`` map (shared/service.py Runtime.stats)."""
    if type(data) is not dict:
        raise MessageError(f"stats: data is {type(data).__name__}, not a map")
    for key, kind in STATS.items():
        value = data.get(key)
        if type(value) not in (kind if isinstance(kind, tuple) else (kind,)):
            raise MessageError(f"stats: {key} is {_describe(value)}")
    if not all(type(k) is str and type(v) in (int, float) for k, v in data["counters"].items()):
        raise MessageError("stats: counters is not a map of names to numbers")
    if not all(type(t) is str for t in data["subscribed"]):
        raise MessageError("stats: subscribed is not a list of topics")
    if not _plain(data):
        raise MessageError("stats: holds something other than maps, lists and scalars")


def _plain(obj: Any) -> bool:
    """Only maps with str keys, lists, and scalars, however deep (no arrays, no msgpack
    timestamps): what ``wattflow status`` and ``tap`` can print."""
    todo = [obj]
    while todo:
        item = todo.pop()
        if type(item) is dict:
            if not all(type(k) is str for k in item):
                return False
            todo.extend(item.values())
        elif type(item) is list:
            todo.extend(item)
        elif type(item) not in _SCALARS:
            return False
    return True


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"array of {value.dtype.str}"
    if type(value) is list:
        kinds = sorted({type(x).__name__ for x in value[:100]})
        return f"list of {', '.join(kinds) or 'nothing'}"
    return f"{type(value).__name__} {value!r:.40}"


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
