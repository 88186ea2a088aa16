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
from pathlib import Path
from typing import Any

import zmq

from shared import topics
from shared.bus import Publisher, Subscriber
from shared.config import Config

log = logging.getLogger(__name__)


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
        self._sockets: list[Publisher | Subscriber] = []
        self._stats_pub: Publisher | None = None
        self._next_tick = 0.0
        self._started = time.time()
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
        pub = Publisher(self.ctx, self.cfg.bus["publish"], self.src, self.cfg.bus["hwm"])
        self._sockets.append(pub)
        if self._stats_pub is None:
            self._stats_pub = pub
        return pub

    def subscriber(self, wanted: list[bytes]) -> Subscriber:
        sub = Subscriber(self.ctx, self.cfg.bus["subscribe"], wanted, self.cfg.bus["hwm"])
        self._sockets.append(sub)
        return sub

    def tick(self) -> None:
        """Call often from the main loop: at most once per interval, heartbeat and stats."""
        now = time.time()
        if now < self._next_tick:
            return
        self._next_tick = now + self.cfg.runtime["stats_interval_s"]
        self.heartbeat_file.touch()
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
            "counters": dict(self.counters, gaps=gaps, repeats=repeats,
                             bad_messages=sum(s.bad for s in subs)),
            "gauges": self.gauges,
            # topics someone listens to (through the broker): who downstream is connected
            "subscribed": sorted(t.decode(errors="replace") for t in subscribed),
        }

    def close(self) -> None:
        if self._stats_pub is not None:
            self._stats_pub.send(topics.STATS, self.stats(), block=False)
        for sock in self._sockets:
            sock.close()
        self.ctx.term()
        self.heartbeat_file.unlink(missing_ok=True)
