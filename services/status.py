"""``wattflow status``: one table of every service's counters, from the ``stats`` topic."""

from __future__ import annotations

import json
import sys
import threading
import time

import zmq

from shared import topics
from shared.bus import Subscriber
from shared.config import Config

EXPECTED = ("ingest", "storage", "power", "plotter")


def collect(cfg: Config, wait_s: float, stop: threading.Event | None = None) -> dict[str, dict]:
    ctx = zmq.Context()
    try:
        sub = Subscriber(ctx, cfg.bus["subscribe"], [topics.STATS], cfg=cfg)
    except BaseException:
        ctx.term()
        raise
    latest: dict[str, dict] = {}
    deadline = time.monotonic() + wait_s
    try:
        while (left := deadline - time.monotonic()) > 0 and not (stop and stop.is_set()):
            msg = sub.recv(int(min(left, 0.2) * 1000) + 1)
            if msg is not None and isinstance(msg.data, dict):
                if msg.data.get("stopped"):  # its last word: it stops in order
                    latest.pop(msg.src, None)
                else:
                    latest[msg.src] = dict(msg.data, received=time.time())
    finally:
        sub.close()
        ctx.term()
    return latest


WORK = {"ingest": ("lines_in",), "storage": ("readings_stored", "lines_rejected"),
        "power": ("readings_in",), "plotter": ("power_in",)}  # an instance's share of the work


def shares(latest: dict[str, dict]) -> dict[str, float]:
    """Each instance's part of its service's work (in %), among the instances heard."""
    work = {src: sum(s.get("counters", {}).get(k, 0) for k in WORK.get(s.get("service"), ()))
            for src, s in latest.items()}
    totals: dict[str, int] = {}
    for src, s in latest.items():
        totals[s.get("service")] = totals.get(s.get("service"), 0) + work[src]
    return {src: round(100 * work[src] / totals[s.get("service")], 1)
            for src, s in latest.items() if totals.get(s.get("service"))}


def silent_instances(cfg: Config, latest: dict[str, dict]) -> dict[str, dict]:
    """Instances the broker has heard from (its roster) that did not report lately: killed,
    frozen (SIGSTOP), or cut off. (One that stopped in order left the roster; one whose main
    loop hangs still reports, with ``busy_s``: see ``busy``.)"""
    roster = next((s.get("gauges", {}).get("members", {}) for s in latest.values()
                   if s.get("service") == "broker"), {})
    quiet = 3 * cfg.runtime["stats_interval_s"]
    return {src: m for src, m in roster.items()
            if src not in latest and m.get("age_s", 0) > quiet}


def render(latest: dict[str, dict], silent: dict[str, dict]) -> str:
    if not latest:
        return "no stats received: is the broker running, and are services connected to it?"
    share = shares(latest)
    lines = [f"{'SERVICE':<9} {'INSTANCE':<36} {'ROLE':<8} {'SHARE':>6} {'UP(s)':>8} "
             f"{'RESTARTS':>8}  COUNTERS"]
    for src, s in sorted(latest.items(), key=lambda kv: (kv[1].get("service", ""), kv[0])):
        gauges = dict(s.get("gauges", {}))
        gauges.pop("members", None)
        role = gauges.pop("role", "")
        counters = " ".join(f"{k}={v}" for k, v in sorted(s.get("counters", {}).items()))
        gauge_text = " ".join(f"{k}={v}" for k, v in sorted(gauges.items()))
        part = f"{share[src]}%" if src in share else ""
        lines.append(f"{s.get('service', '?'):<9} {src:<36} {role:<8} {part:>6} "
                     f"{s.get('uptime_s', 0):>8} {s.get('restarts', 0):>8}  "
                     f"{counters} {gauge_text}".rstrip())
    for src, m in sorted(silent.items()):
        lines.append(f"{m.get('service', '?'):<9} {src:<36} {'SILENT':<8} {'':>6} {'':>8} "
                     f"{'':>8}  no stats for {m.get('age_s')} s (killed, hung or cut off?)")
    for src, s in sorted(latest.items()):  # alive but not doing its job: said apart, in words
        if s.get("gauges", {}).get("paused"):
            lines.append(f"! {src}: {s['gauges']['paused']}")
        if s.get("busy_s"):
            lines.append(f"! {src}: busy: its main loop has not come round for {s['busy_s']} s "
                         f"(a long catch-up or read; hung if this keeps growing)")
    return "\n".join(lines)


def busy(latest: dict[str, dict]) -> dict[str, float]:
    """Instances whose main loop has not come round lately, and for how long (s)."""
    return {src: s["busy_s"] for src, s in latest.items() if s.get("busy_s")}


def missing(latest: dict[str, dict]) -> list[str]:
    present = {s.get("service") for s in latest.values()}
    return [name for name in EXPECTED if name not in present]


def status(cfg: Config, as_json: bool, wait_s: float | None, watch: bool,
           stop: threading.Event | None = None) -> int:
    wait_s = wait_s or cfg.runtime["stats_interval_s"] * 2.5
    while True:
        latest = collect(cfg, wait_s, stop)
        if stop is not None and stop.is_set():
            return 0
        absent = missing(latest)
        quiet = silent_instances(cfg, latest)
        if as_json:
            print(json.dumps({"services": latest, "silent": absent, "silent_instances": quiet,
                              "busy": busy(latest), "shares": shares(latest)}))
        else:
            if watch:
                print("\033[2J\033[H", end="")
            print(render(latest, quiet))
            if absent:
                print(f"silent: {', '.join(absent)}", file=sys.stderr)
        sys.stdout.flush()
        if not watch:  # (a silent replica is flagged; only a service none of reports fails)
            return 1 if absent else 0
