"""``wattflow status``: one table of every service's counters, from the ``stats`` topic."""

from __future__ import annotations

import json
import sys
import time

import zmq

from shared import topics
from shared.bus import Subscriber
from shared.config import Config

EXPECTED = ("ingest", "storage", "power", "plotter")


def collect(cfg: Config, wait_s: float) -> dict[str, dict]:
    ctx = zmq.Context()
    try:
        sub = Subscriber(ctx, cfg.bus["subscribe"], [topics.STATS], cfg=cfg)
    except BaseException:
        ctx.term()
        raise
    latest: dict[str, dict] = {}
    deadline = time.monotonic() + wait_s
    try:
        while (left := deadline - time.monotonic()) > 0:
            msg = sub.recv(int(left * 1000) + 1)
            if msg is not None and isinstance(msg.data, dict):
                latest[msg.src] = dict(msg.data, received=time.time())
    finally:
        sub.close()
        ctx.term()
    return latest


def render(latest: dict[str, dict]) -> str:
    if not latest:
        return "no stats received: is the broker running, and are services connected to it?"
    lines = [f"{'SERVICE':<9} {'INSTANCE':<34} {'UP(s)':>8} {'RESTARTS':>8}  COUNTERS"]
    for src, s in sorted(latest.items(), key=lambda kv: (kv[1].get("service", ""), kv[0])):
        counters = " ".join(f"{k}={v}" for k, v in sorted(s.get("counters", {}).items()))
        gauges = " ".join(f"{k}={v}" for k, v in sorted(s.get("gauges", {}).items()))
        lines.append(f"{s.get('service', '?'):<9} {src:<34} {s.get('uptime_s', 0):>8} "
                     f"{s.get('restarts', 0):>8}  "
                     f"{counters} {gauges}".rstrip())
    return "\n".join(lines)


def missing(latest: dict[str, dict]) -> list[str]:
    present = {s.get("service") for s in latest.values()}
    return [name for name in EXPECTED if name not in present]


def status(cfg: Config, as_json: bool, wait_s: float | None, watch: bool) -> int:
    wait_s = wait_s or cfg.runtime["stats_interval_s"] * 2.5
    while True:
        latest = collect(cfg, wait_s)
        silent = missing(latest)
        if as_json:
            print(json.dumps({"services": latest, "silent": silent}))
        else:
            if watch:
                print("\033[2J\033[H", end="")
            print(render(latest))
            if silent:
                print(f"silent: {', '.join(silent)}", file=sys.stderr)
        sys.stdout.flush()
        if not watch:
            return 1 if silent else 0
