"""Load generator, run as its own process: ``python -m bench.load``.

Valid lines from the five default meters (one V meter, four A meters; the default circuits pair
the V meter with each A meter). Every tick carries one reading of each meter with the same
timestamp, so V and A of a tick are 0 s apart. Connection ``c`` of ``C`` sends ticks
``c, c + C, c + 2C, ...`` (``STEP_US`` apart on one global clock), so the connections together
cover one time line; which readings end up stale (older than one already held for that meter)
depends on how the connections interleave, so the benchmark computes the power points to expect
from the readings in the order storage wrote them. All bytes are made before the clock starts;
sending only slices them.
"""

from __future__ import annotations

import argparse
import json
import socket
import threading
import time

import numpy as np

from shared.parsing import to_us

T0 = to_us(2025, 1, 1, 0, 0, 0, 0)
STEP_US = 1_000  # between two consecutive global ticks
# the default meters: (ip, unit, range_start, range_stop)
METERS = (("10.0.0.1", "V", 0.0, 110.0), ("10.0.0.2", "A", 0.0, 0.5),
          ("10.0.0.3", "A", 0.2, 1.0), ("10.0.0.4", "A", 1.0, 5.0), ("10.0.0.5", "A", 3.0, 10.0))
GROUP_SIZE = len(METERS)  # lines per tick


BAD_VALUE = b"99.000\n"  # out of range for 10.0.0.3 (A, 0.2-1): the soak's invalid lines
BAD_METER = 2


def make_payload(conn: int, conns: int, ticks: int, t0_us: int = T0, step_us: int = STEP_US,
                 bad_every: int = 0) -> bytes:
    """The lines of connection ``conn`` of ``conns``: ``ticks`` ticks of all five meters.

    Tick ``k`` is global tick ``g = k * conns + conn`` at ``t0_us + g * step_us``; meter ``i``
    reads ``lo + (hi - lo) * ((g * 7 + i * 13) % 100) / 100`` (``%.3f``); with ``bad_every``,
    meter 10.0.0.3 reads 99 (out of range) in every tick whose ``g`` it divides. Made with
    NumPy (about 0.35 us a line): every line is laid out zero-padded in a fixed-width row, the
    padding dropped at the end; tests/bench checks it against a line-by-line version."""
    g = np.arange(ticks, dtype=np.int64) * conns + conn
    stamps = np.datetime_as_string((t0_us + g * step_us).astype("datetime64[us]"), unit="us")
    ts = np.frombuffer(stamps.astype("S26").tobytes(), np.uint8).reshape(ticks, 26).copy()
    ts[ts == ord("-")] = ord(".")  # 2025-01-01T00:00:00.000000 -> 2025.01.01 00:00:00.000000
    ts[ts == ord("T")] = ord(" ")
    values = [[b"%.3f\n" % (lo + (hi - lo) * (j / 100)) for j in range(100)]
              for _, _, lo, hi in METERS]
    ip_w = max(len(m[0]) for m in METERS)
    val_w = max(len(v) for per_meter in values for v in per_meter)
    rows = np.zeros((ticks, GROUP_SIZE, ip_w + 28 + val_w), np.uint8)
    for i, (ip, *_) in enumerate(METERS):
        rows[:, i, : len(ip)] = np.frombuffer(ip.encode(), np.uint8)
        rows[:, i, ip_w] = rows[:, i, ip_w + 27] = ord("\t")
        rows[:, i, ip_w + 1 : ip_w + 27] = ts
        table = np.array(values[i], dtype=f"S{val_w}")[(g * 7 + i * 13) % 100]
        if bad_every and i == BAD_METER:
            table[g % bad_every == 0] = BAD_VALUE
        rows[:, i, ip_w + 28 :] = np.frombuffer(table.tobytes(), np.uint8).reshape(ticks, val_w)
    flat = rows.reshape(-1)
    return flat[flat != 0].tobytes()


def send(port: int, payloads: list[bytes], rate_per_conn: float | None) -> dict:
    """Send every payload on its own connection; paced to ``rate_per_conn`` lines/s if given."""
    socks = [socket.create_connection(("127.0.0.1", port), timeout=60) for _ in payloads]
    start = threading.Barrier(len(payloads) + 1)
    errors: list[BaseException] = []

    def run(sock: socket.socket, payload: bytes) -> None:
        try:
            # slices made before the clock starts, like the payloads
            ends = [len(payload)] if rate_per_conn is None else _slice_ends(payload,
                                                                            rate_per_conn)
            start.wait()
            _send_paced(sock, payload, ends)
            sock.shutdown(socket.SHUT_WR)
            sock.recv(1)  # wait for ingest to close: it has read everything
        except OSError as exc:
            errors.append(exc)
        finally:
            sock.close()

    threads = [threading.Thread(target=run, args=pair)
               for pair in zip(socks, payloads, strict=True)]
    for t in threads:
        t.start()
    start.wait()
    t_first = time.time()
    for t in threads:
        t.join()
    t_last = time.time()
    if errors:
        raise SystemExit(f"load: {errors[0]}")
    return {"t_first_byte": t_first, "t_all_sent": t_last,
            "lines": sum(p.count(b"\n") for p in payloads)}


def _slice_ends(payload: bytes, rate: float) -> list[int]:
    """Where the 10 ms slices of whole lines end, for ``rate`` lines/s."""
    per_slice = max(1, int(rate / 100))
    ends = np.flatnonzero(np.frombuffer(payload, np.uint8) == 10) + 1
    cuts = ends[per_slice - 1 :: per_slice].tolist()
    if not cuts or cuts[-1] != len(payload):
        cuts.append(len(payload))
    return cuts


def _send_paced(sock: socket.socket, payload: bytes, ends: list[int]) -> None:
    """Send slice ``i`` (up to ``ends[i]``) 10 ms after slice ``i - 1`` was due; one slice:
    all at once. A slice due while the previous send was still blocked goes at once."""
    view = memoryview(payload)
    begin, start = time.perf_counter(), 0
    for i, end in enumerate(ends):
        delay = begin + i * 0.01 - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        sock.sendall(view[start:end])
        start = end


def wallclock(port: int, conns: int, rate_per_conn: float, seconds: float,
              bad_every: int = 100) -> dict:
    """Meters stamped with the wall clock, for ``seconds``: every 10 ms each connection sends
    the ticks due in that slice (global tick ``g`` of the slice at its start + ``g * step``)."""
    ticks_per_slice = max(1, round(rate_per_conn * conns / GROUP_SIZE / 100))  # all conns
    per_conn = max(1, ticks_per_slice // conns)
    ticks_per_slice = per_conn * conns
    step_us = 10_000 // ticks_per_slice
    socks = [socket.create_connection(("127.0.0.1", port), timeout=60) for _ in range(conns)]
    for sock in socks:  # a meter blocks while ingest holds it back (backpressure), however long
        sock.settimeout(None)
    slices = int(seconds * 100)
    begin_us = (time.time_ns() // 1000 // 10_000 + 1) * 10_000
    invalid = [0] * conns
    errors: list[BaseException] = []

    def run(c: int, sock: socket.socket) -> None:
        try:
            for i in range(slices):
                t0 = begin_us + i * 10_000
                delay = t0 / 1e6 - time.time()
                if delay > 0:
                    time.sleep(delay)
                sock.sendall(make_payload(c, conns, per_conn, t0, step_us, bad_every))
                g = np.arange(per_conn) * conns + c
                invalid[c] += int((g % bad_every == 0).sum()) if bad_every else 0
            sock.shutdown(socket.SHUT_WR)
            sock.recv(1)
        except OSError as exc:
            errors.append(exc)
        finally:
            sock.close()

    threads = [threading.Thread(target=run, args=(c, s)) for c, s in enumerate(socks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit(f"load: {errors[0]}")
    ticks = slices * per_conn * conns
    bad = sum(invalid)
    per_meter = {ip: ticks - (bad if i == BAD_METER else 0) for i, (ip, *_) in enumerate(METERS)}
    return {"t_first_byte": begin_us / 1e6, "t_all_sent": time.time(),
            "lines": ticks * GROUP_SIZE, "invalid": bad, "per_meter": per_meter}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--connections", type=int, default=20)
    ap.add_argument("--ticks", type=int, help="ticks (5 lines) per connection")
    ap.add_argument("--rate", type=float, help="lines/s per connection (default: flat out)")
    ap.add_argument("--t0-us", type=int, default=T0, help="timestamp of the first tick")
    ap.add_argument("--wallclock", action="store_true",
                    help="stamp lines with the time now, for --seconds (the soak)")
    ap.add_argument("--seconds", type=float, default=10.0)
    args = ap.parse_args()
    if args.wallclock:
        print(json.dumps(wallclock(args.port, args.connections, args.rate, args.seconds)),
              flush=True)
        return
    payloads = [make_payload(c, args.connections, args.ticks, args.t0_us)
                for c in range(args.connections)]
    print(json.dumps(send(args.port, payloads, args.rate)), flush=True)


if __name__ == "__main__":
    main()
