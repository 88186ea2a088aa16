"""Simulated meters: one TCP connection per meter, lines at a steady rate with current time.

Voltage and current meters send at the same instants, so every current reading has a voltage
reading well within ``max_time_diff``. ``invalid`` makes that fraction of lines bad in every
way the validator knows (out of range, unknown meter, garbage).

By default each simulated meter uses the acknowledged mode (README): it says hello with a
sender id of its own, keeps every line ingest has not acknowledged yet, and when the connection
breaks (ingest restarted, killed, moved) it reconnects and sends them again; ingest and storage
recognise a line sent twice by its number. ``plain`` sends like a meter that never reads.
"""

from __future__ import annotations

import collections
import logging
import math
import random
import socket
import threading
import time
import uuid
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


class AckedLink:
    """A connection in the acknowledged mode that survives ingest's restarts: lines are kept
    until an ``ACK n`` covers them and sent again after a reconnect."""

    def __init__(self, host: str, port: int, stop: threading.Event, sender: str | None,
                 max_unacked: int = 200_000):
        self.host, self.port, self.stop, self.sender = host, port, stop, sender
        self.max_unacked = max_unacked
        self.kept: collections.deque[tuple[int, bytes]] = collections.deque()  # (number, line)
        self.next_no = 0
        self.sock: socket.socket | None = None
        self.inbox = b""
        self.reconnects = 0

    def _connect(self) -> None:
        self.sock = connect(self.host, self.port, self.stop)
        if self.sender is None:
            return
        first = self.kept[0][0] if self.kept else self.next_no
        again = b"".join(line for _, line in self.kept)
        self.sock.sendall(b"#wattflow ack v1 %s %d\n" % (self.sender.encode(), first) + again)

    def send(self, lines: list[bytes]) -> None:
        """Send (and, acknowledged, keep) ``lines``; reconnect and resend on a broken link."""
        if self.sender is not None:
            for line in lines:
                self.kept.append((self.next_no, line))
                self.next_no += 1
        for attempt in range(1000):
            try:
                if self.sock is None:
                    self._connect()
                    if self.sender is not None:
                        self._read_acks(block=False)
                        return  # the kept lines, these ones included, went with the hello
                self.sock.sendall(b"".join(lines))
                self._read_acks(block=len(self.kept) > self.max_unacked)
                return
            except OSError as exc:
                self._drop()
                if self.stop.is_set() or self.sender is None:
                    raise
                if attempt == 0:
                    log.warning("link to %s:%d broke (%s): reconnecting, %d lines to send "
                                "again", self.host, self.port, exc, len(self.kept))
                self.reconnects += 1
                self.stop.wait(min(0.1 * (attempt + 1), 1.0))
        raise ConnectionError(f"could not reach {self.host}:{self.port} again")

    def _read_acks(self, block: bool) -> None:
        """Take the ACK lines ingest wrote back (waiting for one when too much is unacked)."""
        if self.sender is None:
            return
        while True:
            try:
                data = self.sock.recv(65536, 0 if block else socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            if not data:
                raise ConnectionResetError("ingest closed the connection")
            self.inbox += data
            *done, self.inbox = self.inbox.split(b"\n")
            for line in done:
                if line.startswith(b"ACK "):
                    upto = int(line[4:])
                    while self.kept and self.kept[0][0] < upto:
                        self.kept.popleft()
            if not block or len(self.kept) <= self.max_unacked:
                return

    def finish(self, patience_s: float = 10.0) -> int:
        """Close; acknowledged: first wait (a while) until every line is acknowledged.
        Returns how many were not."""
        deadline = time.monotonic() + patience_s
        while self.sender is not None and self.kept and time.monotonic() < deadline:
            try:
                if self.sock is None:
                    self._connect()
                self.sock.settimeout(max(0.1, deadline - time.monotonic()))
                self._read_acks(block=True)
            except OSError:
                self._drop()
                self.stop.wait(0.2)
        self._drop()
        return len(self.kept)

    def _drop(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
            self.inbox = b""


def run_meter(meter: Meter, host: str, port: int, rate: float, duration: float | None,
              invalid: float, stop: threading.Event, seed: int, acked: bool = True,
              run_id: str = "") -> int:
    rng = random.Random(seed)
    period = 1.0 / rate
    sent = 0
    started = time.time()
    link = AckedLink(host, port, stop, f"sim-{meter.ip}-{run_id}" if acked else None)
    next_t = started
    try:
        while not stop.is_set() and (duration is None or time.time() - started < duration):
            now = time.time()
            batch = []
            while next_t <= now:  # catch up in one write if we fell behind
                if rng.random() < invalid:
                    text = bad_line(meter, next_t, rng)
                else:
                    text = f"{meter.ip}\t{fmt_time(next_t)}\t{value_for(meter, next_t, rng)}"
                batch.append(text.encode() + b"\n")
                next_t += period
            if batch:
                link.send(batch)
                sent += len(batch)
            stop.wait(max(0.0, next_t - time.time()))
    finally:
        unacked = link.finish()
        if unacked:
            log.error("meter %s: %d lines not acknowledged by ingest", meter.ip, unacked)
        elif acked:
            log.info("meter %s: all %d lines acknowledged (%d reconnects)", meter.ip, sent,
                     link.reconnects)
    return sent


def simulate(meters: list[Meter], host: str, port: int, rate: float, duration: float | None,
             invalid: float, stop: threading.Event | None = None, acked: bool = True) -> int:
    stop = stop or threading.Event()
    totals: list[int] = []
    errors: list[BaseException] = []
    run_id = uuid.uuid4().hex[:8]  # a new numbering: a sender id of its own

    def worker(i: int, m: Meter) -> None:
        try:
            totals.append(run_meter(m, host, port, rate, duration, invalid, stop, seed=i,
                                    acked=acked, run_id=run_id))
        except OSError as exc:
            errors.append(exc)
            log.error("meter %s: %s", m.ip, exc)
            stop.set()

    threads = [threading.Thread(target=worker, args=(i, m), daemon=True)
               for i, m in enumerate(meters)]
    for t in threads:
        t.start()
    log.info("simulating %d meters at %g lines/s each -> %s:%d (%s)", len(meters), rate, host,
             port, "acknowledged mode" if acked else "plain")
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
