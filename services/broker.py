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
    xsub = rt.ctx.socket(zmq.XSUB)
    xpub = rt.ctx.socket(zmq.XPUB)
    # A subscriber whose queue is full (hwm batches behind) loses messages here rather than
    # stalling every other subscriber: a slow `wattflow tap` must not stop the pipeline. The
    # raw stream is protected end to end instead (ingest resends what storage has not acked).
    for sock in (xsub, xpub):
        sock.setsockopt(zmq.SNDHWM, cfg.bus["hwm"])
        sock.setsockopt(zmq.RCVHWM, cfg.bus["hwm"])
        sock.setsockopt(zmq.LINGER, 0)
    for sock, key in ((xsub, "xsub_bind"), (xpub, "xpub_bind")):
        try:
            sock.bind(cfg.broker[key])
        except zmq.ZMQError as exc:
            xsub.close(linger=0)
            xpub.close(linger=0)
            rt.close()
            where = tcp_endpoint(cfg.broker[key])
            if where is None:
                raise CannotStart(
                    f"broker cannot bind {cfg.broker[key]} (broker.{key}): {exc}") from exc
            raise CannotStart(broker_port(key, *where).explain(str(exc))) from exc
    control_addr = f"inproc://broker-control-{id(rt)}"
    control = rt.ctx.socket(zmq.PAIR)
    control.bind(control_addr)

    def proxy() -> None:
        peer = rt.ctx.socket(zmq.PAIR)
        peer.connect(control_addr)
        try:
            zmq.proxy_steerable(xsub, xpub, None, peer)
        except zmq.ContextTerminated:
            pass
        finally:
            peer.close(linger=0)

    thread = threading.Thread(target=proxy, name="proxy", daemon=True)
    thread.start()
    log.info("broker up: publishers -> %s, subscribers -> %s", cfg.broker["xsub_bind"],
             cfg.broker["xpub_bind"])
    while not rt.stopping.wait(0.2):
        rt.tick()  # heartbeat file, and stats through the bus like any service
    control.send(b"TERMINATE")
    thread.join(timeout=5)
    for sock in (control, xsub, xpub):
        sock.close(linger=0)
    rt.close()
    log.info("broker stopped")
    return 0
