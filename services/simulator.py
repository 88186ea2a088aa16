"""Simulated meters: one TCP connection per meter, lines at a steady rate with current time.

Voltage and current meters send at the same instants, so every current reading has a voltage
reading well within ``max_time_diff``. ``invalid`` makes that fraction of lines bad in every
way the validator knows (out of range, unknown meter, garbage).
"""

from __future__ import annotations

import logging
import math
import random
import socket
import threading
import time
from datetime import UTC, datetime

from shared.config import Meter

log = logging.getLogger("simulate")


def fmt_time(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y.%m.%d %H:%M:%S.%f")


def value_for(meter: Meter, t: float, rng: random.Random) -> float:
    """A plausible value inside the meter's range that wanders slowly over time."""
    lo, hi = meter.range_start, meter.range_stop
    mid, half = (lo + hi) / 2, (hi - lo) / 2
    wave = math.sin(t / 7 + hash(meter.ip) % 10) * 0.6 + rng.uniform(-0.2, 0.2)
    return round(mid + half * max(-0.95, min(0.95, wave)), 4)


def bad_line(meter: Meter, t: float, rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        return f"{meter.ip}\t{fmt_time(t)}\t{meter.range_stop + 1 + rng.random():.4f}"
    if kind == 1:
        return f"10.255.255.{rng.randrange(1, 250)}\t{fmt_time(t)}\t1.0"
    if kind == 2:
        return f"{meter.ip}\t{fmt_time(t)}\tnot-a-number"
    return f"{meter.ip} {fmt_time(t)} 1.0"


def connect(host: str, port: int, stop: threading.Event, patience_s: float = 30.0) -> socket.socket:
    """Connect like a real meter would: retry while ingest is not up yet."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            return socket.create_connection((host, port), timeout=10)
        except OSError:
            if time.monotonic() > deadline or stop.is_set():
                raise
            stop.wait(0.5)


def run_meter(meter: Meter, host: str, port: int, rate: float, duration: float | None,
              invalid: float, stop: threading.Event, seed: int) -> int:
    rng = random.Random(seed)
    period = 1.0 / rate
    sent = 0
    started = time.time()
    with connect(host, port, stop) as sock:
        next_t = started
        while not stop.is_set() and (duration is None or time.time() - started < duration):
            now = time.time()
            batch = []
            while next_t <= now:  # catch up in one write if we fell behind
                if rng.random() < invalid:
                    batch.append(bad_line(meter, next_t, rng))
                else:
                    batch.append(f"{meter.ip}\t{fmt_time(next_t)}\t{value_for(meter, next_t, rng)}")
                next_t += period
            if batch:
                sock.sendall(("\n".join(batch) + "\n").encode())
                sent += len(batch)
            stop.wait(max(0.0, next_t - time.time()))
    return sent


def simulate(meters: list[Meter], host: str, port: int, rate: float, duration: float | None,
             invalid: float, stop: threading.Event | None = None) -> int:
    stop = stop or threading.Event()
    totals: list[int] = []
    errors: list[BaseException] = []

    def worker(i: int, m: Meter) -> None:
        try:
            totals.append(run_meter(m, host, port, rate, duration, invalid, stop, seed=i))
        except OSError as exc:
            errors.append(exc)
            log.error("meter %s: %s", m.ip, exc)
            stop.set()

    threads = [threading.Thread(target=worker, args=(i, m), daemon=True)
               for i, m in enumerate(meters)]
    for t in threads:
        t.start()
    log.info("simulating %d meters at %g lines/s each -> %s:%d", len(meters), rate, host, port)
    try:
        for t in threads:
            while t.is_alive():
                t.join(0.2)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (see cli)
        stop.set()
        deadline = time.monotonic() + 5  # a send blocked by backpressure must not hold us
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
    if errors:
        raise ConnectionError(f"simulated meters could not send to {host}:{port}: {errors[0]}")
    log.info("simulation sent %d lines", sum(totals))
    return sum(totals)
