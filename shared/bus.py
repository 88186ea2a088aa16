"""The one place where ZeroMQ sockets are made.

The broker binds an XSUB socket (publishers connect) and an XPUB socket (subscribers connect);
every service connects to those two endpoints. Publishers use XPUB sockets so they *see*
subscriptions arriving through the broker and can hold data until someone listens for it.

Beside the pub/sub bus the broker runs a work queue: a PULL socket that senders of numbered
batches (ingest, power) PUSH into, and a PUSH socket that storage replicas PULL from, so each
batch goes to one replica (round robin among those with room), not to all.

Every socket goes through one of two calls before it binds or connects: ``secure_bind`` for a
socket the broker binds, ``secure_connect`` for a client socket. Each names the *role* the
client's key needs on that socket (``shared.auth.ROLES``: publish, subscribe, pull). With
``bus.curve`` off (the default) both do nothing; with it on, the bound socket is a CURVE server
that lets in only keys allowed that role (the broker's ZAP handler, ``shared.auth``), and the
client socket a CURVE client with this process's key pair.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from shared import auth, messages
from shared.config import Config

log = logging.getLogger(__name__)
LINGER_MS = 2000
BAD_LOG_EVERY_S = 5.0  # a flood of bad messages logs one line per this many seconds


def secure_bind(sock: zmq.Socket, cfg: Config, role: str) -> None:
    """Before ``sock.bind``: with ``bus.curve`` on, only clients whose key is allowed ``role``
    get through (the binding process must run ``shared.auth.start_authenticator``)."""
    if not cfg.bus["curve"]:
        return
    folder = auth.allowed_dir(cfg, role)
    if not folder.is_dir():
        raise auth.KeyProblem(f"bus.allowed_keys_dir: no folder {folder} for the keys allowed "
                              f"to {role} (make it with `wattflow keys`)")
    sock.curve_publickey, sock.curve_secretkey = auth.key_pair(cfg, "broker_key_pair")
    sock.curve_server = True
    sock.zap_domain = role.encode()
    sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)  # no ZAP handler answering: nobody gets in


def secure_connect(sock: zmq.Socket, cfg: Config, role: str) -> None:
    """Before ``sock.connect``: with ``bus.curve`` on, talk CURVE to the broker with this
    process's key pair (which the broker must allow ``role``)."""
    if role not in auth.ROLES:
        raise ValueError(f"unknown role {role!r}")
    if not cfg.bus["curve"]:
        return
    sock.curve_serverkey = auth.public_key(cfg, "broker_public_key")
    sock.curve_publickey, sock.curve_secretkey = auth.key_pair(cfg, "client_key_pair")
    _say_when_refused(sock, cfg, role)


HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                    | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


def _say_when_refused(sock: zmq.Socket, cfg: Config, role: str) -> None:
    """Log (once per socket) when the broker turns this client away: otherwise a key it does
    not allow would just mean silence. A thread reads the socket's monitor (a socket of its
    own) until the socket closes."""
    mon = sock.get_monitor_socket(HANDSHAKE_FAILED | zmq.EVENT_MONITOR_STOPPED)

    def watch() -> None:
        try:
            while True:
                event = recv_monitor_message(mon)
                if event["event"] == zmq.EVENT_MONITOR_STOPPED:
                    return
                where = event["endpoint"].decode(errors="replace")
                if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                    log.error("the broker at %s refused our key for %s: put the public key of "
                              "%s into its allowed/%s/", where, role,
                              auth.key_path(cfg, "client_key_pair"), auth.ROLES[role])
                else:
                    log.error("CURVE handshake with the broker at %s failed (%s): is %s its "
                              "public key, and CURVE on there?", where, role,
                              auth.key_path(cfg, "broker_public_key"))
                break
            while recv_monitor_message(mon)["event"] != zmq.EVENT_MONITOR_STOPPED:
                pass  # said once; wait for the socket to close
        except zmq.ZMQError:  # the context is ending
            pass
        finally:
            mon.close(linger=0)

    threading.Thread(target=watch, name=f"bus-{role}-monitor", daemon=True).start()


def _or_close(sock: zmq.Socket, setup, *args) -> None:
    """Run ``setup(sock, *args)``; if it fails, close the socket (else ``ctx.term`` would wait
    for it forever) and let the error go on."""
    try:
        setup(sock, *args)
    except BaseException:
        sock.close(linger=0)
        raise


class Publisher:
    """Sends ``[topic, body]`` with a per-topic sequence number; tracks live subscriptions.
    With ``cfg``, the socket goes through ``secure_connect`` (role ``publish``)."""

    def __init__(self, ctx: zmq.Context, endpoint: str, src: str, hwm: int = 10000,
                 cfg: Config | None = None):
        self.src = src
        self.sock = ctx.socket(zmq.XPUB)
        self.sock.setsockopt(zmq.SNDHWM, hwm)
        self.sock.setsockopt(zmq.LINGER, LINGER_MS)
        self.sock.setsockopt(zmq.XPUB_NODROP, 1)  # a full queue refuses (EAGAIN), never drops
        if cfg is not None:
            _or_close(self.sock, secure_connect, cfg, "publish")
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

    def send_seq(self, topic: bytes, seq: int, data: Any, block: bool = False,
                 src: str | None = None) -> bool:
        """Send a batch under a given sequence number (first time or again); False if full."""
        body = messages.encode(src or self.src, seq, time.time(), data)
        try:
            self.sock.send_multipart([topic, body], flags=0 if block else zmq.DONTWAIT)
        except zmq.Again:
            return False
        return True

    def close(self) -> None:
        self.sock.close()


class Pusher:
    """Hands numbered batches to the work queue (the broker's PULL side): each batch goes to
    one of the storage replicas pulling from it, not to all. With ``cfg``, the socket goes
    through ``secure_connect`` (role ``publish``)."""

    def __init__(self, ctx: zmq.Context, endpoint: str, src: str, hwm: int = 10000,
                 cfg: Config | None = None):
        self.src = src
        self.sock = ctx.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.SNDHWM, hwm)
        self.sock.setsockopt(zmq.LINGER, LINGER_MS)
        if cfg is not None:
            _or_close(self.sock, secure_connect, cfg, "publish")
        self.sock.connect(endpoint)

    def send_seq(self, topic: bytes, seq: int, data: Any, src: str | None = None) -> bool:
        """Send a batch under its number (first time or again) in stream ``src`` (default:
        this sender's own); False if the queue is full."""
        body = messages.encode(src or self.src, seq, time.time(), data)
        try:
            self.sock.send_multipart([topic, body], flags=zmq.DONTWAIT)
        except zmq.Again:
            return False
        return True

    def close(self) -> None:
        self.sock.close()


class Subscriber:
    """Receives and decodes messages; counts sequence gaps per (sender, topic). With
    ``pull``, a PULL socket on the work queue instead (a share of the batches: no gaps).
    With ``cfg``, the socket goes through ``secure_connect`` (role ``subscribe``, or
    ``pull``)."""

    def __init__(self, ctx: zmq.Context, endpoint: str, topics: list[bytes], hwm: int = 10000,
                 cfg: Config | None = None, pull: bool = False):
        self.pull = pull
        self.sock = ctx.socket(zmq.PULL if pull else zmq.SUB)
        self.sock.setsockopt(zmq.RCVHWM, hwm)
        self.sock.setsockopt(zmq.LINGER, 0)
        for topic in () if pull else topics:
            self.sock.setsockopt(zmq.SUBSCRIBE, topic)
        if cfg is not None:
            _or_close(self.sock, secure_connect, cfg, "pull" if pull else "subscribe")
        self.sock.connect(endpoint)
        self.last_seq: dict[tuple[str, bytes], int] = {}
        self._next_gap_log = 0.0
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
        if self.pull:
            return msg
        key = (msg.src, msg.topic)
        last = self.last_seq.get(key)
        if last is not None and msg.seq != last + 1:
            if msg.seq > last + 1:
                self.gaps += msg.seq - last - 1
                now = time.monotonic()
                if now >= self._next_gap_log:  # one line a while: a sender can fake many
                    self._next_gap_log = now + BAD_LOG_EVERY_S
                    log.warning("gap on %s from %s: missed seq %d..%d (%d missed in all)",
                                msg.topic.decode(), msg.src, last + 1, msg.seq - 1, self.gaps)
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

