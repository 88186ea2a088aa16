"""The bus broker, the one stable point: XSUB (publishers connect), XPUB (subscribers connect)."""

from __future__ import annotations

import logging
import threading
import time

import zmq

from shared import topics
from shared.bus import Subscriber
from shared.config import Config
from shared.service import CannotStart, Runtime, broker_port, tcp_endpoint

log = logging.getLogger("broker")


def run(cfg: Config) -> int:
    rt = Runtime("broker", cfg)
    rt.install_signals()
    xsub, xpub = rt.ctx.socket(zmq.XSUB), rt.ctx.socket(zmq.XPUB)
    pull, push = rt.ctx.socket(zmq.PULL), rt.ctx.socket(zmq.PUSH)
    sockets = {"xsub_bind": xsub, "xpub_bind": xpub, "work_in_bind": pull,
               "work_out_bind": push}
    # A subscriber whose queue is full (hwm batches behind) loses messages here rather than
    # stalling every other subscriber: a slow `wattflow tap` must not stop the pipeline. The
    # batches that must arrive travel on the work queue instead (PULL from their senders,
    # PUSH to one storage replica each), which waits when full and never drops; what a dying
    # replica held is sent again by its sender (no ack).
    for sock in sockets.values():
        sock.setsockopt(zmq.SNDHWM, cfg.bus["hwm"])
        sock.setsockopt(zmq.RCVHWM, cfg.bus["hwm"])
        sock.setsockopt(zmq.LINGER, 0)
    for key, sock in sockets.items():
        try:
            sock.bind(cfg.broker[key])
        except zmq.ZMQError as exc:
            for s in sockets.values():
                s.close(linger=0)
            rt.close()
            where = tcp_endpoint(cfg.broker[key])
            if where is None:
                raise CannotStart(
                    f"broker cannot bind {cfg.broker[key]} (broker.{key}): {exc}") from exc
            raise CannotStart(broker_port(key, *where).explain(str(exc))) from exc
    proxies = [_start_proxy(rt, xsub, xpub, "pubsub"), _start_proxy(rt, pull, push, "work")]
    log.info("broker up: publishers -> %s, subscribers -> %s; work queue: senders -> %s, "
             "storage replicas -> %s", cfg.broker["xsub_bind"], cfg.broker["xpub_bind"],
             cfg.broker["work_in_bind"], cfg.broker["work_out_bind"])
    roster = Roster(rt)
    while not rt.stopping.wait(0.2):
        roster.update()
        rt.tick()  # heartbeat file, and stats through the bus like any service
    roster.close()
    for control, thread in proxies:
        control.send(b"TERMINATE")
        thread.join(timeout=5)
        control.close(linger=0)
    for sock in sockets.values():
        sock.close(linger=0)
    rt.close()
    log.info("broker stopped")
    return 0


def _start_proxy(rt: Runtime, front: zmq.Socket, back: zmq.Socket, name: str):
    """``zmq.proxy_steerable(front, back)`` on a thread; the returned PAIR socket stops it."""
    control_addr = f"inproc://broker-{name}-{id(rt)}"
    control = rt.ctx.socket(zmq.PAIR)
    control.bind(control_addr)

    def proxy() -> None:
        peer = rt.ctx.socket(zmq.PAIR)
        peer.connect(control_addr)
        try:
            zmq.proxy_steerable(front, back, None, peer)
        except zmq.ContextTerminated:
            pass
        finally:
            peer.close(linger=0)

    thread = threading.Thread(target=proxy, name=f"proxy-{name}", daemon=True)
    thread.start()
    return control, thread


class Roster:
    """Every service instance that reports on ``stats``, and when it last did: published in the
    broker's own stats (gauge ``members``), so a one-shot ``wattflow status`` can name a replica
    that stopped reporting (killed, hung) and not only the ones it hears. An instance that
    stops in order says so in its last stats and leaves the roster."""

    FORGET_S = 120.0  # a silent instance is named this long, then forgotten

    def __init__(self, rt: Runtime):
        self.rt = rt
        self.sub = Subscriber(rt.ctx, rt.cfg.bus["subscribe"], [topics.STATS])
        self.seen: dict[str, tuple[str, float]] = {}  # instance -> (service, last seen)

    def update(self) -> None:
        now = time.time()
        for msg in self.sub.recv_batch(0, 10_000):
            data = msg.data if isinstance(msg.data, dict) else {}
            if data.get("stopped"):
                self.seen.pop(msg.src, None)
            else:
                self.seen[msg.src] = (str(data.get("service", "?")), now)
        self.seen = {k: v for k, v in self.seen.items() if now - v[1] < self.FORGET_S}
        self.rt.gauges["members"] = {k: {"service": s, "age_s": round(now - t, 1)}
                                     for k, (s, t) in self.seen.items()}

    def close(self) -> None:
        self.sub.close()
