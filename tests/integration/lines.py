"""Meter lines for tests, built from the same timestamp helpers the parser is checked against."""

from __future__ import annotations

from shared.parsing import format_us, to_us

T0 = to_us(2024, 4, 27, 12, 0, 0, 0)
SECOND = 1_000_000
V_METER = "10.0.0.1"
A_METERS = {"10.0.0.2": (0.0, 0.5), "10.0.0.3": (0.2, 1.0), "10.0.0.4": (1.0, 5.0),
            "10.0.0.5": (3.0, 10.0)}
RANGES = {V_METER: (0.0, 110.0), **A_METERS}


def line(meter: str, ts_us: int, value: float | str) -> bytes:
    return f"{meter}\t{format_us(ts_us)}\t{value}\n".encode()


def in_range(meter: str, k: int) -> float:
    """A value inside the meter's range, different for each k, exact in decimal."""
    lo, hi = RANGES[meter]
    return round(lo + (hi - lo) * ((k * 37) % 101) / 100, 6)


class Feeder:
    """Sends ``connections`` short connections one after another, each with ``per_conn`` lines
    of ticks (one V and four A readings at the same instant, instants 10 ms apart), retrying a
    refused connection (ingest restarting). A connection either delivers all its lines or is
    refused, so every line sent is a line ingest accepted."""

    def __init__(self, port: int, connections: int, ticks_per_conn: int = 100,
                 invalid_every: int = 0, pause_s: float = 0.01, concurrent: bool = False):
        import threading

        self.port = port
        self.payloads: list[bytes] = []
        self.expected: list[tuple[str, int, float]] = []
        self.invalid = 0
        k = 0
        for _ in range(connections):
            parts = []
            for _ in range(ticks_per_conn):
                t = T0 + k * SECOND // 100
                for meter in RANGES:
                    if invalid_every and k % invalid_every == 0 and meter == "10.0.0.3":
                        parts.append(line(meter, t, 99.0))  # out of range
                        self.invalid += 1
                        continue
                    value = in_range(meter, k)
                    parts.append(line(meter, t, value))
                    self.expected.append((meter, t, value))
                k += 1
            self.payloads.append(b"".join(parts))
        self.lines = len(self.expected) + self.invalid
        self.sent_conns = 0
        self.pause_s = pause_s
        self.error: BaseException | None = None
        self.concurrent = concurrent
        self.go = threading.Event()  # cleared: hold before the next connection
        self.go.set()
        self.between = threading.Event()  # set while no connection is being sent
        self.between.set()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Feeder:
        self.thread.start()
        return self

    def _run(self) -> None:
        import socket
        import time

        if self.concurrent:  # all connections at once, each in its own thread
            import threading

            subs = [Feeder.__new__(Feeder) for _ in self.payloads]
            for sub, payload in zip(subs, self.payloads, strict=True):
                sub.__dict__.update(self.__dict__, payloads=[payload], concurrent=False,
                                    sent_conns=0, error=None)
            threads = [threading.Thread(target=sub._run) for sub in subs]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            self.sent_conns = sum(sub.sent_conns for sub in subs)
            self.error = next((sub.error for sub in subs if sub.error), None)
            return
        try:
            for payload in self.payloads:
                self.go.wait()
                self.between.clear()
                deadline = time.monotonic() + 60
                while True:
                    try:
                        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
                            s.sendall(payload)
                        break
                    except ConnectionRefusedError:
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.05)
                self.sent_conns += 1
                self.between.set()
                time.sleep(self.pause_s)
        except BaseException as exc:  # reported by done()
            self.error = exc

    def pause(self) -> None:
        """Hold before the next connection; returns once none is being sent."""
        self.go.clear()
        self.between.wait(60)

    def resume(self) -> None:
        self.go.set()

    def progress(self) -> float:
        return self.sent_conns / len(self.payloads)

    def done(self) -> bool:
        if self.error:
            raise self.error
        return not self.thread.is_alive()
