"""The bus broker, the one stable point: XSUB (publishers connect), XPUB (subscribers connect).

With ``bus.curve`` on it also runs the ZAP authenticator (shared/auth.py): the XSUB lets in only
keys allowed to publish, the XPUB only keys allowed to subscribe. Failed handshakes on either
(no CURVE, a wrong server key, a refused key, or bytes that are not ZeroMQ at all) are counted.
"""

from __future__ import annotations

import logging
import threading

import zmq
from zmq.utils.monitor import recv_monitor_message

from shared import auth
from shared.bus import HANDSHAKE_FAILED, secure_bind
from shared.config import Config
from shared.service import CannotStart, Runtime, broker_port, tcp_endpoint

log = logging.getLogger("broker")
# the sockets the broker binds: config key, and the role a client's key needs there
BOUND = (("xsub_bind", "publish"), ("xpub_bind", "subscribe"))


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
    gate = None
    try:
        gate = auth.start_authenticator(rt.ctx, cfg, rt.counters)  # before anyone can connect
        for sock, (key, role) in zip((xsub, xpub), BOUND, strict=True):
            bind(sock, cfg, key, role)
        rt.publisher()  # our stats go through the bus too: a missing client key shows now
    except (CannotStart, auth.KeyProblem):
        for sock in (xsub, xpub):
            sock.close(linger=0)
        if gate is not None:
            gate.stop()
        rt.close()
        raise
    # before the proxy thread owns the sockets (a socket is not for two threads at once)
    monitors = {role: sock.get_monitor_socket(HANDSHAKE_FAILED)
                for sock, (_, role) in zip((xsub, xpub), BOUND, strict=True)}
    for role in monitors:
        rt.counters[f"handshakes_failed.{role}"] = 0
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
    log.info("broker up: publishers -> %s, subscribers -> %s (CURVE %s)", cfg.broker["xsub_bind"],
             cfg.broker["xpub_bind"], "on" if gate else "off")
    poller = zmq.Poller()
    for mon in monitors.values():
        poller.register(mon, zmq.POLLIN)
    while not rt.stopping.is_set():
        for mon, _ in poller.poll(200):
            role = next(r for r, m in monitors.items() if m is mon)
            recv_monitor_message(mon)
            rt.counters[f"handshakes_failed.{role}"] += 1
        rt.tick()  # heartbeat file, and stats through the bus like any service
    control.send(b"TERMINATE")
    thread.join(timeout=5)
    for sock in (xsub, xpub):
        sock.disable_monitor()
    for sock in (*monitors.values(), control, xsub, xpub):
        sock.close(linger=0)
    if gate is not None:
        gate.stop()
    rt.close()
    log.info("broker stopped")
    return 0


def bind(sock: zmq.Socket, cfg: Config, key: str, role: str) -> None:
    secure_bind(sock, cfg, role)
    try:
        sock.bind(cfg.broker[key])
    except zmq.ZMQError as exc:
        where = tcp_endpoint(cfg.broker[key])
        if where is None:
            raise CannotStart(
                f"broker cannot bind {cfg.broker[key]} (broker.{key}): {exc}") from exc
        raise CannotStart(broker_port(key, *where).explain(str(exc))) from exc
