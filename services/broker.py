"""The bus broker, the one stable point: XSUB (publishers connect) and XPUB (subscribers
connect) for pub/sub, and a work queue: PULL (senders of numbered batches push into it) and
PUSH (storage replicas pull from it, one batch each).

With ``bus.curve`` on it also runs the ZAP authenticator (shared/auth.py): the XSUB and the
work queue's PULL let in only keys allowed to publish, the XPUB only keys allowed to subscribe,
the work queue's PUSH only keys allowed to pull. Failed handshakes on any of them (no CURVE, a
wrong server key, a refused key, or bytes that are not ZeroMQ at all) are counted.
"""

from __future__ import annotations

import logging
import threading
import time

import zmq
from zmq.utils.monitor import recv_monitor_message

from shared import auth, topics
from shared.bus import HANDSHAKE_FAILED, Subscriber, secure_bind
from shared.config import Config
from shared.service import CannotStart, Runtime, broker_port, tcp_endpoint

log = logging.getLogger("broker")
# the biggest message frame the broker takes: a raw batch is at most batch_lines x max_line
# (5,000 x 1 KiB by default); a peer declaring more is disconnected, not buffered
MAX_MESSAGE_BYTES = 64 << 20
# the sockets the broker binds: config key, socket type, and the role a client's key needs
BOUND = (("xsub_bind", zmq.XSUB, "publish"), ("xpub_bind", zmq.XPUB, "subscribe"),
         ("work_in_bind", zmq.PULL, "publish"), ("work_out_bind", zmq.PUSH, "pull"))


def run(cfg: Config) -> int:
    rt = Runtime("broker", cfg)
    rt.install_signals()
    sockets = {key: rt.ctx.socket(kind) for key, kind, _ in BOUND}
    # A subscriber whose queue is full (hwm batches behind) loses messages here rather than
    # stalling every other subscriber: a slow `wattflow tap` must not stop the pipeline. The
    # batches that must arrive travel on the work queue instead (PULL from their senders,
    # PUSH to one storage replica each), which waits when full and never drops; what a dying
    # replica held is sent again by its sender (no ack).
    for key, sock in sockets.items():
        hwm = cfg.bus["work_hwm" if key.startswith("work") else "hwm"]
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.RCVHWM, hwm)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)  # a client sending more is cut off
    gate = None
    try:
        gate = auth.start_authenticator(rt.ctx, cfg, rt.counters)  # before anyone can connect
        for key, _, role in BOUND:
            bind(sockets[key], cfg, key, role)
        rt.publisher()  # a missing client key shows now, not at the first stats
    except (CannotStart, auth.KeyProblem):
        for sock in sockets.values():
            sock.close(linger=0)
        if gate is not None:
            gate.stop()
        rt.close()
        raise
    # before the proxy threads own the sockets (a socket is not for two threads at once)
    monitors = {key: (role, sockets[key].get_monitor_socket(HANDSHAKE_FAILED))
                for key, _, role in BOUND}
    for role, _ in monitors.values():
        rt.counters[f"handshakes_failed.{role}"] = 0
    failed: list[str] = []  # proxies that stopped on an error (the broker then stops too)
    proxies = [_start_proxy(rt, sockets["xsub_bind"], sockets["xpub_bind"], "pubsub", failed),
               _start_proxy(rt, sockets["work_in_bind"], sockets["work_out_bind"], "work",
                            failed)]
    log.info("broker up: publishers -> %s, subscribers -> %s; work queue: senders -> %s, "
             "storage replicas -> %s (CURVE %s)", cfg.broker["xsub_bind"],
             cfg.broker["xpub_bind"], cfg.broker["work_in_bind"], cfg.broker["work_out_bind"],
             "on" if gate else "off")
    roster = Roster(rt)
    poller = zmq.Poller()
    for _, mon in monitors.values():
        poller.register(mon, zmq.POLLIN)
    while not rt.stopping.is_set():
        for mon, _ in poller.poll(200):
            role = next(r for r, m in monitors.values() if m is mon)
            recv_monitor_message(mon)
            rt.counters[f"handshakes_failed.{role}"] += 1
        roster.update()
        rt.tick()  # heartbeat file, and stats through the bus like any service
    roster.close()
    for control, thread in proxies:
        if thread.is_alive():
            try:
                control.send(b"TERMINATE", zmq.DONTWAIT)
            except zmq.Again:  # its end of the pair is gone: the thread is ending anyway
                pass
        thread.join(timeout=5)
        control.close(linger=0)
    for sock in sockets.values():
        sock.disable_monitor()
    for sock in (*(m for _, m in monitors.values()), *sockets.values()):
        sock.close(linger=0)
    if gate is not None:
        gate.stop()
    rt.close()
    if failed:
        log.error("broker stopped: %s failed", " and ".join(failed))
        return 1
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


def _start_proxy(rt: Runtime, front: zmq.Socket, back: zmq.Socket, name: str,
                 failed: list[str]):
    """``zmq.proxy_steerable(front, back)`` on a thread; the returned PAIR socket stops it.

    libzmq's proxy gives up with EAGAIN when a receive it was told would succeed finds nothing,
    and with CURVE that happens on a PULL socket (the work queue's front): the ZAP user id of a
    new connection is queued as a "credential" ahead of its first message, so the socket polls
    readable as soon as that first message's first frame is in while the rest is still on its
    way (a batch of 100 KB and more over several reads); the receive skips the credential,
    finds no whole message, and the proxy returns -1 (EAGAIN). Nothing was taken off a queue
    then, so the proxy is started again (counted in ``proxy_restarts.<name>``). Any other error
    stops the broker (the proxy's name added to ``failed``, exit 1) rather than leave it up
    with a queue nobody forwards."""
    control_addr = f"inproc://broker-{name}-{id(rt)}"
    control = rt.ctx.socket(zmq.PAIR)
    control.bind(control_addr)
    rt.counters[f"proxy_restarts.{name}"] = 0

    def proxy() -> None:
        peer = rt.ctx.socket(zmq.PAIR)
        peer.connect(control_addr)
        try:
            while True:
                try:
                    zmq.proxy_steerable(front, back, None, peer)
                    return  # TERMINATE
                except zmq.Again:
                    rt.counters[f"proxy_restarts.{name}"] += 1
        except zmq.ContextTerminated:
            pass
        except Exception:
            log.exception("the %s proxy failed: stopping the broker", name)
            failed.append(f"the {name} proxy")
            rt.stopping.set()
        finally:
            peer.close(linger=0)

    thread = threading.Thread(target=proxy, name=f"proxy-{name}", daemon=True)
    thread.start()
    return control, thread


class Roster:
    """Every service instance that reports on ``stats``, and when it last did: published in the
    broker's own stats (gauge ``members``), so a one-shot ``wattflow status`` can name a replica
    that stopped reporting (killed, frozen, cut off) and not only the ones it hears. An
    instance that stopped in order says so in its last stats and leaves the roster; one that
    just went quiet is named for two minutes. (Stats come from a thread of their own: a
    process whose main loop hangs keeps reporting, with ``busy_s``, and is not quiet.)"""

    FORGET_S = 120.0

    def __init__(self, rt: Runtime):
        self.rt = rt
        self.sub = Subscriber(rt.ctx, rt.cfg.bus["subscribe"], [topics.STATS], cfg=rt.cfg)
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
