"""A Runtime's stats on real ZeroMQ sockets: sent by a thread of their own, so a main loop busy
for a while is reported busy (with for how long) rather than silent, and the report is copied
safely while the main loop changes its gauges."""

from __future__ import annotations

import logging
import socket
import sys

import zmq

from services import status
from shared import config, messages, topics
from shared.service import Runtime
from tests.integration.stack import wait_for

INTERVAL_S = 0.1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Listener:
    """A SUB socket bound where the Runtime publishes (in place of the broker)."""

    def __init__(self):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SUBSCRIBE, topics.STATS)
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.sock.bind(self.endpoint)

    def next(self, timeout_s: float = 10.0) -> dict:
        assert self.sock.poll(int(timeout_s * 1000)), "no stats within the deadline"
        topic, body = self.sock.recv_multipart()
        return messages.decode(topic, body).data

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


def runtime(tmp_path, endpoint: str) -> Runtime:
    cfg = config.load(env={"WATTFLOW_BUS_PUBLISH": endpoint,
                           "WATTFLOW_RUNTIME_STATS_INTERVAL_S": str(INTERVAL_S),
                           "WATTFLOW_RUNTIME_RUN_DIR": str(tmp_path / "run")})
    return Runtime("power", cfg)


def test_a_busy_main_loop_is_reported_busy_not_silent(tmp_path):
    listener = Listener()
    rt = runtime(tmp_path, listener.endpoint)
    try:
        rt.tick()
        first = listener.next()
        assert first["service"] == "power" and "busy_s" not in first
        # the main loop now does not come round (a long catch-up): the reports go on, and
        # say for how long it has been busy
        seen: list[dict] = []
        wait_for(lambda: seen.append(listener.next()) or seen[-1].get("busy_s", 0) >= 1.0, 20,
                 lambda: f"a report busy for a second: {seen[-1:]}")
        busy = [s["busy_s"] for s in seen if "busy_s" in s]
        assert busy == sorted(busy), busy  # it grows while the loop is away
        line = status.render({rt.src: seen[-1]}, {})
        assert f"! {rt.src}: busy: its main loop has not come round for" in line
        rt.tick()  # back: the next reports are not busy
        wait_for(lambda: "busy_s" not in listener.next(), 20, "a report not busy")
    finally:
        rt.close()
    # its last word says it stopped in order
    wait_for(lambda: listener.next().get("stopped"), 20, "the stopped report")
    listener.close()


def test_gauges_changed_by_the_main_loop_while_reports_are_copied(tmp_path, caplog):
    # threads switch every microsecond (not every 5 ms), so a report built by iterating the
    # gauges while the main loop changes them does fail here (it was tried)
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    listener = Listener()
    rt = runtime(tmp_path, listener.endpoint)
    rt.cfg.runtime["stats_interval_s"] = 0.0  # the stats thread reports as fast as it can
    try:
        with caplog.at_level(logging.ERROR, logger="shared.service"):
            rt.tick()
            for i in range(100_000):  # keys come and go, nested ones too
                rt.gauges[f"k{i % 50}"] = {"n": i, f"x{i % 7}": [i]}
                rt.gauges.pop(f"k{(i + 25) % 50}", None)
                rt.counters[f"c{i % 30}"] += 1
            reports = [listener.next() for _ in range(20)]
        assert not [r for r in caplog.records if "stats not sent" in r.getMessage()]
        assert all(r["service"] == "power" for r in reports)
    finally:
        sys.setswitchinterval(old)
        rt.close()
        listener.close()
