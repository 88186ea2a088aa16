"""The one place where ZeroMQ sockets are made.

The broker binds an XSUB socket (publishers connect) and an XPUB socket (subscribers connect);
every service connects to those two endpoints. Publishers use XPUB sockets so they *see*
subscriptions arriving through the broker and can hold data until someone listens for it.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from typing import Any

import zmq

from shared import messages

log = logging.getLogger(__name__)
LINGER_MS = 2000
BAD_LOG_EVERY_S = 5.0  # a flood of bad messages logs one line per this many seconds


class Publisher:
    """Sends ``[topic, body]`` with a per-topic sequence number; tracks live subscriptions."""

    def __init__(self, ctx: zmq.Context, endpoint: str, src: str, hwm: int = 10000):
        self.src = src
        self.sock = ctx.socket(zmq.XPUB)
        self.sock.setsockopt(zmq.SNDHWM, hwm)
        self.sock.setsockopt(zmq.LINGER, LINGER_MS)
        self.sock.setsockopt(zmq.XPUB_NODROP, 1)  # a full queue refuses (EAGAIN), never drops
        self.sock.connect(endpoint)
        self.seq: dict[bytes, int] = defaultdict(int)
        self.subscribed: set[bytes] = set()

    def poll_subscriptions(self) -> None:
        while self.sock.poll(0):
            frame = self.sock.recv()
            if frame[:1] == b"\x01":
                self.subscribed.add(frame[1:])
            elif frame[:1] == b"\x00":
                self.subscribed.discard(frame[1:])

    def has_subscriber(self, topic: bytes) -> bool:
        self.poll_subscriptions()
        return any(topic.startswith(prefix) for prefix in self.subscribed)

    def send(self, topic: bytes, data: Any, block: bool = True) -> bool:
        """Send one batch; False (nothing sent, sequence unchanged) if not ``block`` and full."""
        if not self.send_seq(topic, self.seq[topic], data, block):
            return False
        self.seq[topic] += 1
        return True

    def take_seq(self, topic: bytes) -> int:
        """Allocate the next sequence number, for senders that keep and resend their batches."""
        seq = self.seq[topic]
        self.seq[topic] += 1
        return seq

    def send_seq(self, topic: bytes, seq: int, data: Any, block: bool = False) -> bool:
        """Send a batch under a given sequence number (first time or again); False if full."""
        body = messages.encode(self.src, seq, time.time(), data)
        try:
            self.sock.send_multipart([topic, body], flags=0 if block else zmq.DONTWAIT)
        except zmq.Again:
            return False
        return True

    def close(self) -> None:
        self.sock.close()


class Subscriber:
    """Receives and decodes messages; counts sequence gaps per (sender, topic)."""

    def __init__(self, ctx: zmq.Context, endpoint: str, topics: list[bytes], hwm: int = 10000):
        self.sock = ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.RCVHWM, hwm)
        self.sock.setsockopt(zmq.LINGER, 0)
        for topic in topics:
            self.sock.setsockopt(zmq.SUBSCRIBE, topic)
        self.sock.connect(endpoint)
        self.last_seq: dict[tuple[str, bytes], int] = {}
        self.gaps = 0  # messages missed between two that arrived
        self.repeats = 0  # sequence numbers seen again (resent batches, restarted senders)
        self.bad = 0  # messages dropped as malformed (wrong frame count, bad body)
        self._bad_unlogged = 0
        self._next_bad_log = 0.0

    def recv(self, timeout_ms: int) -> messages.Message | None:
        """One message, or None after ``timeout_ms`` without one."""
        if not self.sock.poll(timeout_ms):
            return None
        return self._decode(self.sock.recv_multipart())

    def recv_batch(self, timeout_ms: int, max_count: int) -> list[messages.Message]:
        """Wait up to ``timeout_ms`` for a first message, then take what is queued (up to max)."""
        out: list[messages.Message] = []
        if not self.sock.poll(timeout_ms):
            return out
        while len(out) < max_count:
            try:
                frames = self.sock.recv_multipart(zmq.DONTWAIT)
            except zmq.Again:
                break
            msg = self._decode(frames)
            if msg is not None:
                out.append(msg)
        return out

    def _decode(self, frames: list[bytes]) -> messages.Message | None:
        if len(frames) != 2:
            self._drop(f"{len(frames)} frames, not topic and body")
            return None
        try:
            msg = messages.decode(frames[0], frames[1])
        except messages.MessageError as exc:
            self._drop(str(exc))
            return None
        key = (msg.src, msg.topic)
        last = self.last_seq.get(key)
        if last is not None and msg.seq != last + 1:
            if msg.seq > last + 1:
                self.gaps += msg.seq - last - 1
                log.warning(
                    "gap on %s from %s: missed seq %d..%d",
                    msg.topic.decode(),
                    msg.src,
                    last + 1,
                    msg.seq - 1,
                )
            else:
                self.repeats += 1
        self.last_seq[key] = msg.seq
        return msg

    def _drop(self, why: str) -> None:
        """Count a malformed message; log the first, then at most one line per
        ``BAD_LOG_EVERY_S`` with how many came since (anyone on the bus can send a flood)."""
        self.bad += 1
        self._bad_unlogged += 1
        now = time.monotonic()
        if now >= self._next_bad_log:
            log.warning("dropped %d malformed message(s) (%d in all); the last: %s",
                        self._bad_unlogged, self.bad, why)
            self._bad_unlogged = 0
            self._next_bad_log = now + BAD_LOG_EVERY_S

    def close(self) -> None:
        self.sock.close()

