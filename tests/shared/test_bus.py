"""Subscriber on real ZeroMQ sockets: garbage of every kind is counted in ``bad``, logged without
a flood, never raised, and the good messages around it still arrive with their gaps counted."""

from __future__ import annotations

import logging

import msgpack
import pytest
import zmq

from shared import bus, messages, topics
from tests.integration.stack import wait_for

GOOD = {"source": ["ingest-a"], "seq": [4]}


@pytest.fixture
def pub_sub():
    """A raw XPUB bound on inproc (a stranger's socket) and a Subscriber to ``ack`` on it."""
    ctx = zmq.Context()
    pub = ctx.socket(zmq.XPUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind("inproc://bus")
    sub = bus.Subscriber(ctx, "inproc://bus", [topics.ACK])
    wait_for(lambda: pub.poll(50) and pub.recv() == b"\x01" + topics.ACK, 10, "the subscription")
    try:
        yield pub, sub
    finally:
        sub.close()
        pub.close()
        ctx.term()


def received(sub: bus.Subscriber, want: int) -> list[messages.Message]:
    out: list[messages.Message] = []
    wait_for(lambda: out.extend(sub.recv_batch(50, 100)) or len(out) >= want, 10,
             lambda: f"{want} messages (got {len(out)}, bad {sub.bad})")
    return out


GARBAGE = [
    [topics.ACK],  # no body
    [topics.ACK, messages.encode("s", 0, 0.0, GOOD), b"third frame"],
    [topics.ACK, b""],
    [topics.ACK, b"\xc1\xff garbage"],
    [topics.ACK, msgpack.packb({"v": 1, "src": "s", "seq": "1", "t": 0, "data": GOOD})],
    [topics.ACK, messages.encode("s", 0, 0.0, {"source": ["a"], "seq": ["1"]})],
    [topics.ACK, messages.encode("s", 0, 0.0, {"source": ["a", "b"], "seq": [1]})],
    [topics.ACK + b"x", messages.encode("s", 0, 0.0, GOOD)],  # a topic that only starts alike
    [topics.ACK, msgpack.packb({"v": 1, "src": "s", "seq": 0, "t": 0, "data": {
        "source": msgpack.ExtType(1, msgpack.packb(["|O", 2**62])), "seq": [1]}})],
]


def test_garbage_is_counted_and_good_messages_still_arrive(pub_sub, monkeypatch, caplog):
    pub, sub = pub_sub
    monkeypatch.setattr(bus, "BAD_LOG_EVERY_S", 3600.0)  # so exactly the first is logged
    pub.send_multipart([topics.ACK, messages.encode("me", 0, 0.0, GOOD)])
    for _ in range(20):
        for frames in GARBAGE:
            pub.send_multipart(frames)
    pub.send_multipart([topics.ACK, messages.encode("me", 1, 0.0, GOOD)])
    pub.send_multipart([topics.ACK, messages.encode("me", 5, 0.0, GOOD)])  # 2..4 missed
    with caplog.at_level(logging.WARNING, logger="shared.bus"):
        got = received(sub, 3)
    assert [m.seq for m in got] == [0, 1, 5] and got[0].data == GOOD
    assert sub.bad == 20 * len(GARBAGE) and sub.gaps == 3 and sub.repeats == 0
    dropped = [r for r in caplog.records if "malformed" in r.getMessage()]
    assert len(dropped) == 1 and "1 malformed message" in dropped[0].getMessage()


def test_a_flood_logs_one_line_per_interval_with_the_count(pub_sub, monkeypatch, caplog):
    pub, sub = pub_sub
    clock = [1000.0]
    monkeypatch.setattr(bus.time, "monotonic", lambda: clock[0])
    with caplog.at_level(logging.WARNING, logger="shared.bus"):
        for burst in range(3):
            for _ in range(50):
                pub.send_multipart([topics.ACK, b"junk"])
            pub.send_multipart([topics.ACK, messages.encode("me", burst, 0.0, GOOD)])
            received(sub, 1)
            clock[0] += bus.BAD_LOG_EVERY_S  # the next burst is in the next interval
    lines = [r.getMessage() for r in caplog.records if "malformed" in r.getMessage()]
    assert len(lines) == 3 and sub.bad == 150
    assert "1 malformed message(s) (1 in all)" in lines[0]
    assert "50 malformed message(s) (51 in all)" in lines[1]  # the 49 held back, and 1 more
    assert "50 malformed message(s) (101 in all)" in lines[2]
