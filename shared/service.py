"""What every service process shares: logging, signals, heartbeat file, counters on ``stats``."""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from shared import topics
from shared.bus import Publisher, Pusher, Subscriber
from shared.config import Config

log = logging.getLogger(__name__)
# exit code of a service that cannot start for a reason a restart will not mend (a port taken,
# a folder it may not write): `wattflow up` stops instead of restarting it (sysexits EX_CONFIG)
EXIT_CANNOT_START = 78


class CannotStart(Exception):
    """A service cannot start; the message says what to change."""


@dataclass(frozen=True)
class Port:
    """A TCP port the stack binds, with the config key that sets it."""

    what: str  # e.g. "ingest (meters' TCP port)"
    host: str
    port: int
    key: str  # config key, e.g. ingest.port
    also: str = ""  # what must change with it

    def explain(self, reason: str) -> str:
        env = "WATTFLOW_" + self.key.replace(".", "_").upper()
        return (f"{self.what} cannot bind {self.host or '*'}:{self.port}: {reason}. "
                f"Another program has that port; choose another with {self.key} in the config "
                f"or {env}=...{self.also}")


def tcp_endpoint(endpoint: str) -> tuple[str, int] | None:
    """(host, port) of a ``tcp://host:port`` ZeroMQ endpoint (``*`` -> all), else None."""
    if not endpoint.startswith("tcp://"):
        return None
    host, _, port = endpoint[len("tcp://"):].rpartition(":")
    if not port.isdigit():
        return None
    return ("" if host == "*" else host.strip("[]")), int(port)


def bound_ports(cfg: Config) -> list[Port]:
    """Every TCP port the stack's services bind."""
    ports = []
    for key in ("xsub_bind", "xpub_bind", "work_in_bind", "work_out_bind"):
        where = tcp_endpoint(cfg.broker[key])
        if where:
            ports.append(broker_port(key, *where))
    ports.append(Port("ingest (the meters' TCP port)", cfg.ingest["host"], cfg.ingest["port"],
                      key="ingest.port"))
    return ports


def broker_port(key: str, host: str, port: int) -> Port:
    match = {"xsub_bind": "bus.publish", "xpub_bind": "bus.subscribe",
             "work_in_bind": "bus.push", "work_out_bind": "bus.pull"}[key]
    return Port(f"broker ({key})", host, port, f"broker.{key}",
                also=f" (and {match} to match, where the services connect)")


def port_taken(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be bound now (as the services bind it), or None if it can."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=level,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        force=True,
    )


class Runtime:
    """One per process: the zmq context, stop flag, counters and periodic stats/heartbeat."""

    def __init__(self, name: str, cfg: Config, instance: str | None = None):
        self.name = name
        self.cfg = cfg
        # unique per run: a restarted container has the same host name and often the same pid
        run = uuid.uuid4().hex[:6]
        self.src = instance or f"{name}-{socket.gethostname()}-{os.getpid()}-{run}"
        self.ctx = zmq.Context()
        self.stopping = threading.Event()
        self.counters: Counter[str] = Counter()
        self.gauges: dict[str, Any] = {}
        self._sockets: list[Publisher | Pusher | Subscriber] = []
        self._stats_pub: Publisher | None = None
        self._next_tick = 0.0
        self._started = time.time()
        self.restarts = int(os.environ.get("WATTFLOW_RESTARTS", "0") or 0)  # from `wattflow up`
        self.problem: str | None = None  # alive but not doing its job, and why
        run_dir = Path(cfg.runtime["run_dir"])
        run_dir.mkdir(parents=True, exist_ok=True)
        self.heartbeat_file = run_dir / f"{name}.heartbeat"

    def install_signals(self) -> None:
        def handle(signum: int, _frame: Any) -> None:
            if self.stopping.is_set():  # a second signal: stop now
                log.warning("second %s: exiting at once", signal.Signals(signum).name)
                os._exit(1)
            log.info("%s received: finishing what is in flight", signal.Signals(signum).name)
            self.stopping.set()

        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)

    def publisher(self) -> Publisher:
        pub = Publisher(self.ctx, self.cfg.bus["publish"], self.src, self.cfg.bus["hwm"],
                        cfg=self.cfg)
        self._sockets.append(pub)
        if self._stats_pub is None:
            self._stats_pub = pub
        return pub

    def subscriber(self, wanted: list[bytes]) -> Subscriber:
        sub = Subscriber(self.ctx, self.cfg.bus["subscribe"], wanted, self.cfg.bus["hwm"],
                         cfg=self.cfg)
        self._sockets.append(sub)
        return sub

    def pusher(self) -> Pusher:
        """Numbered batches into the work queue (one storage replica takes each)."""
        push = Pusher(self.ctx, self.cfg.bus["push"], self.src, self.cfg.bus["work_hwm"],
                      cfg=self.cfg)
        self._sockets.append(push)
        return push

    def puller(self) -> Subscriber:
        """A share of the work queue's batches. Few wait here (``bus.pull_hwm``): the rest
        stay at the broker for other replicas, and a replica that dies takes few with it."""
        pull = Subscriber(self.ctx, self.cfg.bus["pull"], [], self.cfg.bus["pull_hwm"],
                          cfg=self.cfg, pull=True)
        self._sockets.append(pull)
        return pull

    def tick(self) -> None:
        """Call often from the main loop: at most once per interval, heartbeat and stats."""
        now = time.time()
        if now < self._next_tick:
            return
        self._next_tick = now + self.cfg.runtime["stats_interval_s"]
        tmp = self.heartbeat_file.with_name(f".{self.heartbeat_file.name}.{os.getpid()}.tmp")
        tmp.write_text(self.problem or "")  # `wattflow health` says what is wrong, if anything
        tmp.replace(self.heartbeat_file)
        stats_pub = self._stats_pub or self.publisher()  # a service that only listens reports too
        stats_pub.send(topics.STATS, self.stats(now), block=False)

    def stats(self, now: float | None = None) -> dict[str, Any]:
        subs = [s for s in self._sockets if isinstance(s, Subscriber)]
        gaps, repeats = sum(s.gaps for s in subs), sum(s.repeats for s in subs)
        subscribed: set[bytes] = set()
        for pub in self._sockets:
            if isinstance(pub, Publisher):
                pub.poll_subscriptions()
                subscribed |= pub.subscribed
        return {
            "service": self.name,
            "id": self.src,
            "pid": os.getpid(),
            "uptime_s": round((now or time.time()) - self._started, 1),
            "restarts": self.restarts,
            "counters": dict(self.counters, gaps=gaps, repeats=repeats,
                             bad_messages=sum(s.bad for s in subs)),
            "gauges": self.gauges,
            # topics someone listens to (through the broker): who downstream is connected
            "subscribed": sorted(t.decode(errors="replace") for t in subscribed),
        }

    def close(self) -> None:
        if self._stats_pub is not None:  # the last stats: this instance stops in order
            self._stats_pub.send(topics.STATS, dict(self.stats(), stopped=True), block=False)
        for sock in self._sockets:
            sock.close()
        self.ctx.term()
        self.heartbeat_file.unlink(missing_ok=True)
