"""Load generator, run as its own process: ``python -m bench.load``.

Each connection carries its own group of meters (one V and four A), so every A line pairs with
the V line of its tick whatever the interleaving between connections: power points expected =
A lines. All bytes are made before the clock starts; sending only slices them.
"""

from __future__ import annotations

import argparse
import json
import socket
import threading
import time

from shared.parsing import format_us, to_us

T0 = to_us(2025, 1, 1, 0, 0, 0, 0)
GROUP_SIZE = 5  # one V and four A meters per connection


def group_meters(g: int) -> list[tuple[str, str, float, float]]:
    """(ip, unit, range_start, range_stop) of group ``g``."""
    return [(f"10.1.{g}.1", "V", 0.0, 300.0)] + [(f"10.1.{g}.{k}", "A", 0.0, 100.0)
                                                for k in range(2, 2 + GROUP_SIZE - 1)]


def make_payload(g: int, ticks: int) -> bytes:
    meters = group_meters(g)
    stamps = [format_us(T0 + k * 10_000).encode() for k in range(ticks)]  # 10 ms apart
    lines = []
    for k, stamp in enumerate(stamps):
        for i, (ip, _, _, hi) in enumerate(meters):
            value = (k * 7 + i * 13) % int(hi) + 0.5
            lines.append(b"%s\t%s\t%.1f\n" % (ip.encode(), stamp, value))
    return b"".join(lines)


def send(port: int, payloads: list[bytes], rate_per_conn: float | None) -> dict:
    """Send every payload on its own connection; paced to ``rate_per_conn`` lines/s if given."""
    socks = [socket.create_connection(("127.0.0.1", port), timeout=60) for _ in payloads]
    start = threading.Barrier(len(payloads) + 1)
    errors: list[BaseException] = []

    def run(sock: socket.socket, payload: bytes) -> None:
        try:
            start.wait()
            if rate_per_conn is None:
                sock.sendall(payload)
            else:
                _paced(sock, payload, rate_per_conn)
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


def _paced(sock: socket.socket, payload: bytes, rate: float) -> None:
    """Send in 10 ms slices of whole lines at ``rate`` lines/s."""
    per_slice = max(1, int(rate / 100))
    ends, pos = [], 0
    while pos < len(payload):
        cut = pos
        for _ in range(per_slice):
            nxt = payload.find(b"\n", cut) + 1
            if nxt <= 0:
                cut = len(payload)
                break
            cut = nxt
            if cut >= len(payload):
                break
        ends.append(cut)
        pos = cut
    begin, start = time.perf_counter(), 0
    for i, end in enumerate(ends):
        due = begin + i * 0.01
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        sock.sendall(payload[start:end])
        start = end


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--connections", type=int, default=20)
    ap.add_argument("--ticks", type=int, required=True, help="ticks (5 lines) per connection")
    ap.add_argument("--rate", type=float, help="lines/s per connection (default: flat out)")
    ap.add_argument("--first-group", type=int, default=0)
    args = ap.parse_args()
    payloads = [make_payload(args.first_group + g, args.ticks) for g in range(args.connections)]
    print(json.dumps(send(args.port, payloads, args.rate)), flush=True)


if __name__ == "__main__":
    main()
