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
BUSY_AFTER_INTERVALS = 2.0  # a main loop not come round for this many stats intervals is busy


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
        self._next_tick = 0.0
        self._loop_at = time.monotonic()  # when the main loop last called tick()
        self._subscribed: list[str] = []  # as the main loop last saw it
        self._stats_thread: threading.Thread | None = None
        self._stats_stop = threading.Event()
        self._stats_pub: Publisher | None = None  # the stats thread's own socket
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
        pub = self._new_publisher()
        self._sockets.append(pub)
        return pub

    def _new_publisher(self) -> Publisher:
        return Publisher(self.ctx, self.cfg.bus["publish"], self.src, self.cfg.bus["hwm"],
                         cfg=self.cfg)

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
        """Call often from the main loop. At most once per interval: the heartbeat file (it
        says the main loop comes round) and the topics subscribed. The first call starts the
        stats thread, which sends this process's stats every interval on a socket of its own,
        so a main loop busy for a while (a long catch-up or read) is reported busy, with for
        how long, rather than silent."""
        self._loop_at = time.monotonic()
        now = time.time()
        if now < self._next_tick:
            return
        self._next_tick = now + self.cfg.runtime["stats_interval_s"]
        tmp = self.heartbeat_file.with_name(f".{self.heartbeat_file.name}.{os.getpid()}.tmp")
        tmp.write_text(self.problem or "")  # `wattflow health` says what is wrong, if anything
        tmp.replace(self.heartbeat_file)
        subscribed: set[bytes] = set()
        for pub in self._sockets:  # (sockets are not shared between threads: read them here)
            if isinstance(pub, Publisher):
                pub.poll_subscriptions()
                subscribed |= pub.subscribed
        # topics someone listens to (through the broker): who downstream is connected
        self._subscribed = sorted(t.decode(errors="replace") for t in subscribed)
        if self._stats_thread is None:
            self._stats_pub = self._new_publisher()  # (not in _sockets: the thread's alone)
            self._stats_thread = threading.Thread(target=self._send_stats, name="stats",
                                                  daemon=True)
            self._stats_thread.start()

    def _send_stats(self) -> None:
        interval = self.cfg.runtime["stats_interval_s"]
        while True:
            try:
                self._stats_pub.poll_subscriptions()  # (its own: so they do not pile up)
                self._stats_pub.send(topics.STATS, self.stats(), block=False)
            except Exception:  # never let the reports stop; say why, once a while
                log.exception("stats not sent")
            if self._stats_stop.wait(interval):
                return

    def stats(self, now: float | None = None) -> dict[str, Any]:
        """This process's report. Safe from the stats thread while the main loop runs: it
        copies what the main loop changes and touches none of the main loop's sockets."""
        subs = [s for s in list(self._sockets) if isinstance(s, Subscriber)]
        gaps, repeats = sum(s.gaps for s in subs), sum(s.repeats for s in subs)
        report = {
            "service": self.name,
            "id": self.src,
            "pid": os.getpid(),
            "uptime_s": round((now or time.time()) - self._started, 1),
            "restarts": self.restarts,
            "counters": dict(self.counters, gaps=gaps, repeats=repeats,
                             bad_messages=sum(s.bad for s in subs)),
            "gauges": _copy(self.gauges),
            "subscribed": self._subscribed,
        }
        busy = time.monotonic() - self._loop_at
        if busy > BUSY_AFTER_INTERVALS * self.cfg.runtime["stats_interval_s"]:
            report["busy_s"] = round(busy, 1)  # the main loop has not come round for this long
        return report

    def close(self) -> None:
        self._stats_stop.set()
        if self._stats_thread is not None:
            self._stats_thread.join()
        self._loop_at = time.monotonic()
        if self._stats_pub is not None:  # the last stats: this instance stops in order
            self._stats_pub.send(topics.STATS, dict(self.stats(), stopped=True), block=False)
            self._stats_pub.close()
        for sock in self._sockets:
            sock.close()
        self.ctx.term()
        self.heartbeat_file.unlink(missing_ok=True)


def _copy(value: Any) -> Any:
    """A copy of nested dicts and lists another thread may change meanwhile (tried again when
    a dict changed size while being copied)."""
    for _ in range(100):
        try:
            return _copied(value)
        except RuntimeError:  # "dictionary changed size during iteration"
            continue
    return {"stats": "gauges changing too fast to copy"}


def _copied(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copied(v) for k, v in list(value.items())}
    if isinstance(value, (list, tuple)):
        return [_copied(v) for v in list(value)]
    return value
