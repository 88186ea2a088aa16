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


def make_payload(conn: int, conns: int, ticks: int, t0_us: int = T0) -> bytes:
    """The lines of connection ``conn`` of ``conns``: ``ticks`` ticks of all five meters.

    Tick ``k`` is global tick ``g = k * conns + conn`` at ``t0_us + g * STEP_US``; meter ``i``
    reads ``lo + (hi - lo) * ((g * 7 + i * 13) % 100) / 100`` (``%.3f``). Made with NumPy
    (about 0.35 us a line): every line is laid out zero-padded in a fixed-width row, the
    padding dropped at the end; tests/bench checks it against a line-by-line version."""
    g = np.arange(ticks, dtype=np.int64) * conns + conn
    stamps = np.datetime_as_string((t0_us + g * STEP_US).astype("datetime64[us]"), unit="us")
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--connections", type=int, default=20)
    ap.add_argument("--ticks", type=int, required=True, help="ticks (5 lines) per connection")
    ap.add_argument("--rate", type=float, help="lines/s per connection (default: flat out)")
    ap.add_argument("--t0-us", type=int, default=T0, help="timestamp of the first tick")
    args = ap.parse_args()
    payloads = [make_payload(c, args.connections, args.ticks, args.t0_us)
                for c in range(args.connections)]
    print(json.dumps(send(args.port, payloads, args.rate)), flush=True)


if __name__ == "__main__":
    main()
