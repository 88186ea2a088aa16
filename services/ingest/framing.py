"""Framing of one connection's bytes into lines (pure logic: no sockets, no clock).

A line ends with ``\\n``; a ``\\r`` right before it is not part of the line. A line longer than
``max_line`` bytes is rejected (``line_too_long``, with its whole length and its first bytes);
the connection stays usable. The verdicts depend only on the bytes, never on how the network
split them: a line whose ``\\r`` ends one segment and whose ``\\n`` starts the next is framed
like one that arrived whole, and an over-long line is reported once, when it ends, with its
exact length.

When the connection ends, an unterminated last line counts as a line only if the peer closed
in order (EOF); on an idle timeout, a reset or ingest's shutdown it is rejected as ``truncated``
(it may be the start of a longer line: ``10`` of ``105.5``).
"""

from __future__ import annotations

import numpy as np

from shared.parsing import TOO_LONG, TRUNCATED

REJECT_KEEP = 200  # bytes of a rejected line kept in its rejection


class Framer:
    def __init__(self, max_line: int):
        self.max_line = max_line
        self.tail = b""  # an unfinished line, at most max_line + 1 bytes
        self.long: bytes | None = None  # the first bytes of an over-long line still running
        self.long_len = 0  # its bytes so far
        self.long_last = 0  # its last byte so far (a \r there may belong to a CRLF)

    def feed(self, data: bytes) -> tuple[bytes, list[tuple[bytes, str, str, int]]]:
        """Bytes received -> (complete lines, each ``\\n``-terminated; rejections as
        (line's first bytes, reason, message, ordinal)); the ordinal is the rejected line's
        place among all lines this call ended (accepted or not), for senders that number
        their lines (the acknowledged mode)."""
        rejects: list[tuple[bytes, str, str, int]] = []
        if self.long is not None:
            cut = data.find(b"\n")
            if cut < 0:
                self._grow_long(data)
                return b"", rejects
            self._grow_long(data[:cut])
            rejects.append((*self._end_long(), 0))
            data = data[cut + 1 :]
        buf = self.tail + data if self.tail else data
        cut = buf.rfind(b"\n")
        complete, self.tail = (buf[: cut + 1], buf[cut + 1 :]) if cut >= 0 else (b"", buf)
        if len(self.tail) > self.max_line + self.tail.endswith(b"\r"):  # surely too long now
            self.long, self.long_len, self.long_last = b"", 0, 0
            self._grow_long(self.tail)
            self.tail = b""
        if len(complete) > self.max_line:
            complete = self._drop_long_lines(complete, rejects, first=len(rejects))
        return complete, rejects

    def end(self, orderly: bool, why: str = "") -> tuple[bytes, list[tuple[bytes, str, str, int]]]:
        """The connection is over: an orderly EOF completes an unterminated last line; any
        other end rejects it as truncated (``why``: what ended it)."""
        rejects: list[tuple[bytes, str, str, int]] = []
        if self.long is not None:
            rejects.append((*self._end_long(), 0))
            return b"", rejects
        tail, self.tail = self.tail, b""
        if not tail:
            return b"", rejects
        if orderly:
            return tail + b"\n", rejects
        rejects.append((tail[:REJECT_KEEP], TRUNCATED,
                        f"connection ended ({why or 'not by the meter'}) before this line's "
                        f"newline: a cut-off line is not stored as a reading", 0))
        return b"", rejects

    def _grow_long(self, part: bytes) -> None:
        if part:
            if len(self.long) < REJECT_KEEP:
                self.long += part[: REJECT_KEEP - len(self.long)]
            self.long_len += len(part)
            self.long_last = part[-1]

    def _end_long(self) -> tuple[bytes, str, str]:
        length = self.long_len - (self.long_last == 13)
        line, self.long = self.long, None
        return line, TOO_LONG, self._too_long_message(length)

    def _too_long_message(self, length: int) -> str:
        return f"line of {length} bytes is longer than ingest.max_line ({self.max_line})"

    def _drop_long_lines(self, block: bytes, rejects: list, first: int) -> bytes:
        a = np.frombuffer(block, np.uint8)
        ends = np.flatnonzero(a == 10)
        starts = np.concatenate(([0], ends[:-1] + 1))
        lengths = ends - starts - (a[np.maximum(ends - 1, 0)] == 13) * (ends > starts)
        too_long = np.flatnonzero(lengths > self.max_line)
        if not len(too_long):
            return block
        keep, pos = [], 0
        for i in too_long.tolist():
            keep.append(block[pos : starts[i]])
            rejects.append((block[starts[i] : min(ends[i], starts[i] + REJECT_KEEP)], TOO_LONG,
                            self._too_long_message(int(lengths[i])), first + i))
            pos = ends[i] + 1
        keep.append(block[pos:])
        return b"".join(keep)
