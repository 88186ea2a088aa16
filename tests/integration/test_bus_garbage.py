"""Garbage on the bus, with real processes: a stranger's ZeroMQ socket publishes malformed
messages of every kind on every topic, and raw sockets write junk at the broker's endpoints.
Every service stays up, counts each bad message (``bad_messages`` on ``stats``), logs them
without a flood, and meter lines sent afterwards are all stored."""

from __future__ import annotations

import random
import re
import socket
import time

import msgpack
import numpy as np
import pytest
import zmq

from shared import messages, topics
from tests.integration.lines import RANGES, T0, in_range, line
from tests.integration.stack import wait_for

WATCHED = {  # topic -> the services that subscribe to it
    topics.POWER: ("plotter",), topics.READING: ("power",), topics.ACK: ("ingest", "power"),
    topics.STATS: ("power",),  # (power's peers: the replicas that split the circuits)
}
QUEUED = {  # topic -> the services that pull it from the work queue
    topics.RAW: ("storage",), topics.POWER: ("storage",),
}


def packed(data, **fields) -> bytes:
    obj = {"v": 1, "src": "stranger", "seq": 0, "t": 0.0, "data": data}
    obj.update(fields)
    return msgpack.packb(obj, default=messages._default, use_bin_type=True)


def array(dtype, count, payload: bytes) -> msgpack.ExtType:
    return msgpack.ExtType(1, msgpack.packb([dtype, count]) + payload)


def well_formed(topic: bytes) -> dict:
    """A valid ``data`` of the topic (sent only with something else wrong)."""
    s = lambda *items: np.array(items, "S")  # noqa: E731
    return {
        topics.RAW: {"peer": ["x:1"], "t_recv": np.ones(1), "data": [line("10.0.0.1", T0, 1)]},
        topics.READING: {"meter": s(b"10.0.0.1"), "unit": s(b"V"),
                         "ts_us": np.array([T0]), "value": np.ones(1), "t_recv": np.ones(1)},
        topics.POWER: {"circuit": s(b"c"), "ts_us": np.array([T0]), "watts": np.ones(1),
                       "volts": np.ones(1), "amps": np.ones(1), "v_meter": s(b"10.0.0.1"),
                       "a_meter": s(b"10.0.0.2"), "t_recv": np.ones(1)},
        topics.REJECTED: {"line": [b"x"], "reason": ["bad_value"], "message": ["m"],
                          "peer": ["x:1"], "t_recv": np.ones(1)},
        topics.ACK: {"source": ["ingest-x"], "seq": [0]},
        topics.STATS: {"service": "x", "id": "x", "pid": 1, "uptime_s": 1, "counters": {},
                       "gauges": {}, "subscribed": []},
    }[topic]


def garbage(topic: bytes, rng: random.Random) -> list[list[bytes]]:
    """Multipart messages on ``topic`` that no service may take, and none may die of."""
    good = well_formed(topic)
    body = packed(good)
    out = [
        [topic], [topic, body, b"a third frame"], [topic, b""], [topic, b"\xc1"],
        [topic, body[: len(body) // 2]], [topic, body + b"\x00"],
        [topic, rng.randbytes(1 << 20)], [topic, b"\x91" * 100_000],
        [topic + b"x", body], [topic, packed(good, seq="1")], [topic, packed(good, v=True)],
        [topic, packed(good, src=5)], [topic, packed(good, t=None)], [topic, packed(5)],
        [topic, packed(good, seq=2**64 - 1)], [topic, packed([good])],
        [topic, packed({k: v for k, v in list(good.items())[1:]})],  # a column missing
    ]
    wrong = [[None], np.ones(3), array("|O", 1, b"\0" * 8), array([["a", "<i8"]], 1, b"\0" * 8),
             array("<f8", -1, b"\0" * 8), array("<f8", 2**62, b"\0" * 8),
             array("<f8", 2**64 - 1, b""), array("|S99999999", 1, b"x"), msgpack.ExtType(9, b"")]
    if topic != topics.STATS:  # (a stats map may hold these: pid, service, gauges)
        wrong += [5, "x", {"a": 1}]
    for key in good:  # each field: wrong type, wrong length, bad arrays
        out += [[topic, packed(dict(good, **{key: bad}))] for bad in wrong]
    if topic == topics.RAW:  # fields that would reach SQLite or the line mapping
        out += [[topic, packed(dict(good, base=2**64 - 1), seq=2**64 - 1)],
                [topic, packed(dict(good, data=[b"10.0.0.1\tx\t1"]))],  # no newline
                [topic, packed(dict(good, rejected={"line": [b"x"], "reason": ["r"],
                                                    "message": [1], "peer": ["p"],
                                                    "t_recv": np.ones(1)}))]]
    if topic in (topics.READING, topics.POWER):  # names consumers decode, times they draw
        name = "meter" if topic == topics.READING else "circuit"
        out.append([topic, packed(dict(good, **{name: np.array([b"\xff\xfe"])}))])
        out.append([topic, packed(dict(good, ts_us=np.array([2**62])))])
    return out


def zmtp_junk(path: str, rng: random.Random) -> None:
    """Raw bytes at a broker endpoint (ipc): noise; a ZMTP greeting then noise; a greeting, a
    READY of a PUB socket, and a frame header declaring 2**62 bytes."""
    greeting = b"\xff" + b"\0" * 8 + b"\x7f\x03\x00" + b"NULL".ljust(20, b"\0") + b"\0" * 32
    body = b"\x05READY\x0bSocket-Type" + (3).to_bytes(4, "big") + b"PUB"
    ready = b"\x04" + bytes([len(body)]) + body
    for junk in (rng.randbytes(4096), greeting + rng.randbytes(512),
                 greeting + ready + b"\x02" + (2**62).to_bytes(8, "big") + b"abc"):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(path)
            try:
                sock.sendall(junk)
                sock.recv(4096)  # the broker's greeting, or nothing when it hangs up
            except OSError:
                pass


def malformed_log_lines(stack, name: str) -> int:
    return len(re.findall(r"malformed message", stack.log(name)))


@pytest.fixture
def stranger(stack):
    """A stranger's socket on the broker's publisher side: an XPUB, so it sees the services'
    subscriptions arrive (and nothing it sends is dropped unseen for want of them)."""
    sock = stack.ctx.socket(zmq.XPUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.connect(stack.config["bus"]["publish"])
    try:
        yield sock
    finally:
        sock.close()  # (before the stack's context is ended)


@pytest.fixture
def stranger_pusher(stack):
    """A stranger's socket on the work queue's way in (where ingest and power push)."""
    sock = stack.ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(stack.config["bus"]["push"])
    try:
        yield sock
    finally:
        sock.close()


def test_every_service_survives_garbage_on_every_topic(stack, stranger, stranger_pusher):
    rng = random.Random(14)
    rejected_sub = stack.subscribe(topics.REJECTED)  # a `wattflow tap rejected`, as it were
    everything = {*WATCHED, topics.REJECTED}
    subscribed: set[bytes] = set()

    def all_subscribed() -> bool:
        while stranger.poll(0):
            frame = stranger.recv()
            if frame[:1] == b"\x01":
                subscribed.add(frame[1:])
        return subscribed >= everything

    wait_for(all_subscribed, 20, lambda: f"subscriptions (seen {sorted(subscribed)})")
    for name in ("xsub", "xpub"):
        zmtp_junk(stack.config["broker"][f"{name}_bind"].removeprefix("ipc://"), rng)

    started = time.monotonic()
    sent = {topic: garbage(topic, rng) for topic in everything}
    for frames_list in sent.values():
        for frames in frames_list:
            stranger.send_multipart(frames)
    queued = {topic: garbage(topic, rng) for topic in QUEUED}
    for frames_list in queued.values():
        for frames in frames_list:
            stranger_pusher.send_multipart(frames)
    bad_for = {name: 0 for where in (WATCHED, QUEUED) for names in where.values()
               for name in names}
    for where, what in ((WATCHED, sent), (QUEUED, queued)):
        for topic, names in where.items():
            for name in names:
                bad_for[name] += len(what[topic])

    def bad_counted() -> bool:
        stack.check_alive()
        return all(stack.counters(name).get("bad_messages") == n for name, n in bad_for.items())

    wait_for(bad_counted, 60, lambda: f"bad_messages {bad_for}: " + str(
        {n: stack.counters(n).get("bad_messages") for n in bad_for}))
    wait_for(lambda: stack.stats() and stack.stats_sub.bad == len(sent[topics.STATS])
             and rejected_sub.recv_batch(10, 1000) == [] and
             rejected_sub.bad == len(sent[topics.REJECTED]), 30,
             lambda: f"the test's own subscribers' counts ({stack.stats_sub.bad}, "
                     f"{rejected_sub.bad})")

    # real meter lines afterwards: all stored; power and the charts work too
    payload = b"".join(line(m, T0 + k * 1000, in_range(m, k)) for k in range(200)
                       for m in RANGES)
    stack.send(payload + b"10.0.0.1\t2024.04.27 12:00:00.000000\t5\x00\n")
    total = 200 * len(RANGES) + 1
    wait_for(lambda: stack.settled(total), 60, stack.describe)
    assert stack.count("readings") == total - 1
    assert stack.query("SELECT reason FROM rejected") == [("bad_value",)]
    wait_for(lambda: stack.count("power") > 0, 30, "power points stored")
    stack.check_alive()
    stats = stack.stats()
    assert all(stats[name]["uptime_s"] > 0 for name in ("ingest", "storage", "power",
                                                        "plotter"))

    # counted and logged, but no log line per message: one per 5 s at most, each subscriber
    elapsed = time.monotonic() - started
    for name, n in bad_for.items():
        logged = malformed_log_lines(stack, name)
        assert 1 <= logged <= 2 + elapsed / 5 < n, (name, logged, n, stack.log(name))
