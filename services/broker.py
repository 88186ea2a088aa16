"""The bus broker, the one stable point: XSUB (publishers connect), XPUB (subscribers connect)."""

from __future__ import annotations

import logging
import threading

import zmq

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
    while not rt.stopping.wait(0.2):
        rt.tick()  # heartbeat file, and stats through the bus like any service
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
