"""A long hostile run: honest meters beside hostile clients, against a live local stack.

    python -m bench.hostile --minutes 10     # by hand; the figures are in README "Security"
    python -m bench.hostile --minutes 0.4    # tests/integration/test_hostile.py

Every service runs as its own process (like tests/integration/stack.py), meters on a free port
of 127.0.0.1, the bus on TCP loopback with CURVE off, so its ports are reachable and get garbage
too. First the honest meters alone (known lines, paced, ``--honest-rate`` lines/s over
``--honest-conns`` connections): their normal rate. Then the same beside a hostile process:
random bytes, 10 MB lines, idle connections beyond ``ingest.max_connections`` (reconnecting
when closed), slow connections dripping a byte a second, connection floods, random bytes on the
broker's two ports, a ZeroMQ publisher of undecodable messages and a subscriber to everything
that never reads. Every count and rate is bounded, and the run is bounded in time.

Checked (exit 1 and ``ok: false`` in the JSON otherwise): every service stays up (its process
alive and its heartbeat never older than 15 s at any sample) with no internal error counted
(a caught exception); each service's RSS (``/proc/<pid>/status`` VmRSS)
stays under its cap (``caps_mb``, documented in the README); the honest meters keep at least
half their normal rate; every honest line is in the database exactly once; and the counters
add up (ingest's ``lines_in`` = storage's ``readings_stored`` + ``lines_rejected``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.load import GROUP_SIZE, STEP_US, _slice_ends, make_payload
from bench.run import rss
from shared.parsing import to_us
from tests.integration.stack import SERVICES, Stack, free_port, wait_for

ROOT = Path(__file__).resolve().parents[1]
T_BASELINE = to_us(2027, 1, 1, 0, 0, 0, 0)  # honest lines of the baseline phase start here
T_ATTACK = to_us(2028, 1, 1, 0, 0, 0, 0)  # ... and of the hostile phase here
MAX_CONNECTIONS = 2000  # ingest.max_connections for the run (the idle swarm tries more)
IDLE_TIMEOUT_S = 20  # ingest.idle_timeout_s for the run (idle connections are closed)
# a heartbeat older than this counts as down: 3x `wattflow health`'s 5 s, because the plotter
# runs niced and a loaded machine can starve it for several seconds (compose calls a service
# unhealthy only after 6 failed checks 5 s apart)
HEARTBEAT_MAX_AGE_S = 15.0
LONG_LINE = 10 << 20  # bytes


def caps_mb(max_buffer_mb: float, max_connections: int) -> dict[str, float]:
    """RSS each service must stay under (README "Security" documents the same): a base (what
    the service uses flat out in the benchmark, with margin), plus for ingest what it may hold
    (``ingest.max_buffer_mb``, at most 1.5x in Python objects) and per connection at most two
    64 KB read buffers. The broker's includes one subscriber that never reads: it may queue up
    to ``bus.hwm`` messages, which at this run's honest rate (small batches) stays far under
    the cap; at full load (5,000-line batches) it would not (README "Security")."""
    return {"broker": 400, "ingest": 200 + 1.5 * max_buffer_mb + max_connections * 0.13,
            "storage": 400, "power": 200, "plotter": 300}


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # children inherit it
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def rss_mb(pid: int) -> float:
    return rss(pid) / 2**20


# ---- honest meters (a process of their own) ------------------------------------------------

def honest(port: int, conns: int, rate: float, seconds: float, t0_us: int) -> dict:
    """``conns`` connections, each sending ``rate / conns`` lines/s for ``seconds`` in 10 ms
    slices of whole lines; completed lines counted per second."""
    per_conn = rate / conns
    ticks = max(1, int(per_conn * seconds / GROUP_SIZE))
    payloads = [make_payload(c, conns, ticks, t0_us) for c in range(conns)]
    ends = [_slice_ends(p, per_conn) for p in payloads]
    socks = [socket.create_connection(("127.0.0.1", port), timeout=120) for _ in payloads]
    print(json.dumps({"connected": conns}), flush=True)
    sys.stdin.readline()  # "go": the meters are connected before the hostile swarm comes
    start = threading.Barrier(conns + 1)
    done: list[list[tuple[float, int, float]]] = [[] for _ in payloads]  # time, lines, late
    errors: list[BaseException] = []

    def run(i: int) -> None:
        view, sock, pos = memoryview(payloads[i]), socks[i], 0
        try:
            start.wait()
            begin = time.perf_counter()
            for k, end in enumerate(ends[i]):
                due = begin + k * 0.01
                delay = due - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                sock.sendall(view[pos:end])
                now = time.perf_counter()
                done[i].append((now, payloads[i].count(b"\n", pos, end), now - due))
                pos = end
            sock.shutdown(socket.SHUT_WR)
            sock.recv(1)  # ingest closes once it has read everything
        except Exception as exc:  # any failure shows in the report (and fails the run)
            errors.append(exc)
        finally:
            sock.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(conns)]
    for t in threads:
        t.start()
    start.wait()
    t_first = time.perf_counter()
    wall_first = time.time()
    for t in threads:
        t.join()
    t_last = max(d[-1][0] for d in done if d) if any(done) else time.perf_counter()
    per_second = [0] * (int(t_last - t_first) + 1)
    for d in done:
        for t, n, _ in d:
            per_second[int(t - t_first)] += n
    lines = sum(p.count(b"\n") for p in payloads)
    return {"lines": lines, "connections": conns, "offered_per_s": rate,
            "seconds": round(t_last - t_first, 3), "t_first": wall_first,
            "rate_per_s": round(lines / max(t_last - t_first, 1e-9)),
            "full_seconds_min_per_s": min(per_second[:-1], default=lines),
            "worst_lateness_s": round(max((x[2] for d in done for x in d), default=0), 3),
            "t0_us": t0_us, "ticks_per_conn": ticks, "errors": [str(e) for e in errors]}


# ---- hostile clients (a process of their own) -----------------------------------------------

class Hostile:
    """Bounded hostile clients; each kind counts what it did."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.deadline = time.monotonic() + args.seconds
        self.counts: dict[str, int] = {}
        self.noise = os.urandom(1 << 20)  # random bytes (a newline every 256 on average)
        self.long = bytes(random.Random(1).choices(range(32, 127), k=LONG_LINE)) + b"\n"
        self.open = 0
        self.max_open = 0

    def count(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n

    def left(self) -> float:
        return self.deadline - time.monotonic()

    async def connect(self, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        self.open += 1
        self.max_open = max(self.max_open, self.open)
        return reader, writer

    def close(self, writer: asyncio.StreamWriter) -> None:
        self.open -= 1
        writer.close()

    async def until_closed(self, reader: asyncio.StreamReader) -> bool:
        """Wait (until the deadline) for the server to close; True if it did."""
        try:
            while self.left() > 0:
                if not await asyncio.wait_for(reader.read(1 << 16), self.left()):
                    return True
        except (TimeoutError, OSError):
            pass
        return False

    async def idle(self, delay: float) -> None:
        """Connect, send nothing; when ingest closes it (full, or idle timeout), come back."""
        await asyncio.sleep(delay)
        while self.left() > 0:
            try:
                reader, writer = await self.connect(self.args.port)
            except OSError:
                self.count("idle_connect_failed")
                await asyncio.sleep(1)
                continue
            self.count("idle_connections")
            closed = await self.until_closed(reader)
            self.close(writer)
            if closed:
                self.count("idle_closed_by_ingest")
                await asyncio.sleep(1 + random.random())

    async def slow(self, delay: float) -> None:
        """A byte a second: a line that takes minutes to finish (slowloris)."""
        await asyncio.sleep(delay)
        try:
            _, writer = await self.connect(self.args.port)
        except OSError:
            self.count("slow_connect_failed")
            return
        self.count("slow_connections")
        try:
            i = 0
            while self.left() > 0:
                writer.write(b"\n" if i % 60 == 59 else b"x")
                await writer.drain()
                i += 1
                await asyncio.sleep(1)
        except OSError:
            self.count("slow_closed_by_ingest")
        finally:
            self.close(writer)

    async def noise_sender(self, rate_bytes: float) -> None:
        """Random bytes at a bounded rate, over a connection kept open (reconnecting)."""
        while self.left() > 0:
            try:
                _, writer = await self.connect(self.args.port)
                while self.left() > 0:
                    start = random.randrange(len(self.noise) - 8192)
                    writer.write(self.noise[start : start + 8192])
                    await writer.drain()
                    self.count("noise_bytes", 8192)
                    await asyncio.sleep(8192 / rate_bytes)
                self.close(writer)
            except OSError:
                self.count("noise_reconnects")
                await asyncio.sleep(0.5)

    async def long_lines(self) -> None:
        """10 MB lines, one after the other, on one connection."""
        while self.left() > 0:
            try:
                _, writer = await self.connect(self.args.port)
                while self.left() > 0:
                    for k in range(0, len(self.long), 1 << 20):
                        writer.write(self.long[k : k + (1 << 20)])
                        await writer.drain()
                    self.count("long_lines")
                    await asyncio.sleep(self.args.long_pause)
                self.close(writer)
            except OSError:
                self.count("long_reconnects")
                await asyncio.sleep(0.5)

    async def flood(self, port: int, per_s: float, key: str) -> None:
        """Connect, maybe send a little garbage, close (half of them with a reset)."""
        while self.left() > 0:
            await asyncio.sleep(random.expovariate(per_s))
            try:
                _, writer = await self.connect(port)
            except OSError:
                self.count(f"{key}_connect_failed")
                continue
            self.count(key)
            if random.random() < 0.5:
                start = random.randrange(len(self.noise) - 512)
                writer.write(self.noise[start : start + random.randrange(1, 512)])
            if random.random() < 0.5:
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            self.close(writer)

    def bus_clients(self) -> None:
        """A ZeroMQ publisher of undecodable messages, and a subscriber to everything that
        never reads (a thread: pyzmq's plain sockets)."""
        import zmq

        ctx = zmq.Context()
        pub = ctx.socket(zmq.PUB)
        pub.connect(self.args.bus_publish)
        pub.setsockopt(zmq.LINGER, 0)
        sink = ctx.socket(zmq.SUB)
        sink.setsockopt(zmq.SUBSCRIBE, b"")
        sink.setsockopt(zmq.LINGER, 0)
        sink.connect(self.args.bus_subscribe)
        topics = [b"raw", b"reading", b"power", b"ack", b"stats", b"rejected", b"x"]
        rng = random.Random(2)
        while self.left() > 0:
            frames = [rng.choice(topics)] + [
                self.noise[(s := rng.randrange(len(self.noise) - 4096)) : s + rng.randrange(4096)]
                for _ in range(rng.choice((0, 1, 1, 1, 2)))]
            pub.send_multipart(frames)
            self.count("bus_garbage_messages")
            time.sleep(1 / self.args.bus_msgs_per_s)
        pub.close()
        sink.close()
        ctx.term()

    async def run(self) -> dict:
        a = self.args
        tasks = [asyncio.create_task(self.idle(i / a.open_per_s)) for i in range(a.idle)]
        tasks += [asyncio.create_task(self.slow(i / a.open_per_s)) for i in range(a.slow)]
        tasks += [asyncio.create_task(self.noise_sender(a.noise_kb_s * 1024 / a.noise_conns))
                  for _ in range(a.noise_conns)]
        tasks += [asyncio.create_task(self.long_lines()) for _ in range(a.long_conns)]
        tasks.append(asyncio.create_task(self.flood(a.port, a.flood_per_s, "flood_connections")))
        for endpoint in (a.bus_publish, a.bus_subscribe):
            port = int(endpoint.rsplit(":", 1)[1])
            tasks.append(asyncio.create_task(self.flood(port, a.bus_flood_per_s,
                                                        "bus_garbage_connections")))
        bus = threading.Thread(target=self.bus_clients, daemon=True)
        bus.start()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        try:
            await asyncio.wait_for(stop.wait(), max(self.left(), 0))
        except TimeoutError:
            pass
        self.deadline = 0
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        bus.join(timeout=5)
        return dict(sorted(self.counts.items()), max_open_connections=self.max_open)


# ---- the run --------------------------------------------------------------------------------

CHILDREN: list[subprocess.Popen] = []


def child(args: list[str]) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "bench.hostile", *args],
                            stdout=subprocess.PIPE, stdin=subprocess.PIPE, cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    CHILDREN.append(proc)
    return proc


def meters_connected(proc: subprocess.Popen) -> subprocess.Popen:
    """Wait until the honest child says its connections are open (it then waits for go)."""
    line = proc.stdout.readline()
    if not line:
        raise SystemExit("hostile: the honest meters could not connect")
    return proc


def go(proc: subprocess.Popen) -> subprocess.Popen:
    proc.stdin.write(b"go\n")
    proc.stdin.close()
    return proc


class Watch:
    """Samples every service: alive, heartbeat age, RSS (peak kept)."""

    def __init__(self, stack: Stack):
        self.stack = stack
        self.peak: dict[str, float] = dict.fromkeys(SERVICES, 0.0)
        self.max_heartbeat_age = dict.fromkeys(SERVICES, 0.0)
        self.down: list[str] = []
        self.samples = 0

    def sample(self) -> None:
        self.samples += 1
        run_dir = Path(self.stack.config["runtime"]["run_dir"])
        for name, proc in self.stack.procs.items():
            if proc.poll() is not None:
                self.down.append(f"{name} exited with {proc.returncode}")
                continue
            self.peak[name] = max(self.peak[name], rss_mb(proc.pid))
            try:
                age = time.time() - (run_dir / f"{name}.heartbeat").stat().st_mtime
            except FileNotFoundError:
                age = float("inf")
            self.max_heartbeat_age[name] = max(self.max_heartbeat_age[name], age)

    def during(self, proc: subprocess.Popen, limit_s: float) -> dict:
        """Sample until ``proc`` ends (at most ``limit_s``); its JSON output."""
        end = time.monotonic() + limit_s
        while proc.poll() is None and time.monotonic() < end:
            self.sample()
            self.stack.stats()  # keep the test's stats subscriber read
            time.sleep(0.5)  # the sampling period
        if proc.poll() is None:
            proc.kill()
            raise SystemExit(f"hostile: a child did not finish within {limit_s:.0f} s")
        out = proc.stdout.read()
        proc.wait()
        return json.loads(out)


def honest_args(stack: Stack, a: argparse.Namespace, seconds: float, t0: int) -> list[str]:
    return ["honest", "--port", str(stack.port), "--conns", str(a.honest_conns),
            "--rate", str(a.honest_rate), "--seconds", str(seconds), "--t0-us", str(t0)]


def stored_once(stack: Stack, t0_us: int, lines: int) -> dict:
    span = lines // GROUP_SIZE * STEP_US
    where = "FROM readings WHERE ts_us >= ? AND ts_us < ?"
    total = stack.query(f"SELECT count(*) {where}", t0_us, t0_us + span)[0][0]
    distinct = stack.query(f"SELECT count(*) FROM (SELECT DISTINCT meter_id, ts_us {where})",
                           t0_us, t0_us + span)[0][0]
    return {"sent": lines, "in_db": total, "distinct": distinct,
            "ok": total == distinct == lines}


def run(a: argparse.Namespace) -> dict:
    nofile = raise_nofile()
    total_s = a.minutes * 60
    base_s = max(5.0, total_s * 0.1)
    attack_s = max(5.0, total_s - base_s)
    tmp = Path(tempfile.mkdtemp(prefix="wattflow-hostile-"))
    pub, sub = free_port(), free_port()
    overrides = {
        "bus": {"publish": f"tcp://127.0.0.1:{pub}", "subscribe": f"tcp://127.0.0.1:{sub}"},
        "broker": {"xsub_bind": f"tcp://127.0.0.1:{pub}", "xpub_bind": f"tcp://127.0.0.1:{sub}"},
        "ingest": {"max_connections": a.max_connections, "idle_timeout_s": IDLE_TIMEOUT_S},
        "runtime": {"stats_interval_s": 0.5},
        "plotter": {"interval_s": 1.0}}
    stack = Stack(tmp, overrides)
    cap = caps_mb(stack.cfg.ingest["max_buffer_mb"], a.max_connections)
    report: dict = {"minutes": a.minutes, "nofile_limit": nofile, "caps_mb": cap,
                    "config": {"max_connections": a.max_connections,
                               "idle_timeout_s": IDLE_TIMEOUT_S,
                               "max_buffer_mb": stack.cfg.ingest["max_buffer_mb"]}}
    try:
        stack.start()
        stack.wait_ready(60)
        watch = Watch(stack)
        print(f"honest meters alone for {base_s:.0f} s ...", flush=True)
        report["baseline"] = watch.during(
            go(meters_connected(child(honest_args(stack, a, base_s, T_BASELINE)))),
            base_s * 3 + 120)
        rss_alone = dict(watch.peak)
        print(f"honest meters beside hostile clients for {attack_s:.0f} s ...", flush=True)
        # meters are connected first (a swarm that takes every free slot locks out a meter
        # that connects later: ingest.allow is the remedy, see README "Security")
        meters = meters_connected(child(honest_args(stack, a, attack_s, T_ATTACK)))
        hostile = child(["hostile", "--port", str(stack.port), "--seconds", str(attack_s + 30),
                         "--bus-publish", stack.config["bus"]["publish"],
                         "--bus-subscribe", stack.config["bus"]["subscribe"],
                         "--idle", str(a.idle), "--slow", str(a.slow),
                         "--open-per-s", str(a.open_per_s), "--long-conns", str(a.long_conns),
                         "--noise-conns", str(a.noise_conns), "--noise-kb-s", str(a.noise_kb_s),
                         "--flood-per-s", str(a.flood_per_s)])
        # the attack is under way (most idle connections opened) before the honest run starts
        wait_for(lambda: stack.stats()["ingest"]["gauges"].get("connections", 0)
                 >= min(a.idle, a.max_connections) // 2, 60, "the hostile swarm connected")
        report["attack"] = watch.during(go(meters), attack_s * 3 + 120)
        hostile.send_signal(signal.SIGTERM)
        report["hostile"] = watch.during(hostile, 60)
        print("settling ...", flush=True)

        def settled() -> bool:
            watch.sample()
            s = stack.stats()
            i, st = s["ingest"], s["storage"]
            return (i["gauges"].get("connections") == 0 and i["gauges"].get("unacked_lines") == 0
                    and i["gauges"].get("pending_lines") == 0
                    and st["counters"].get("readings_stored", 0)
                    + st["counters"].get("lines_rejected", 0) == i["counters"]["lines_in"])

        wait_for(settled, 300, lambda: f"the stack settling: {stack.describe()}", step=0.5)
        watch.sample()
        stats = stack.stats()
        report["counters"] = {n: stats[n]["counters"] for n in SERVICES}
        report["stored_once"] = {"baseline": stored_once(stack, T_BASELINE,
                                                         report["baseline"]["lines"]),
                                 "attack": stored_once(stack, T_ATTACK,
                                                       report["attack"]["lines"])}
        report["rss_peak_mb"] = {n: round(v, 1) for n, v in watch.peak.items()}
        report["rss_peak_honest_alone_mb"] = {n: round(v, 1) for n, v in rss_alone.items()}
        report["max_heartbeat_age_s"] = {n: round(v, 2) for n, v in
                                         watch.max_heartbeat_age.items()}
        report["samples"] = watch.samples
        ingest, storage = report["counters"]["ingest"], report["counters"]["storage"]
        ratio = report["attack"]["rate_per_s"] / max(report["baseline"]["rate_per_s"], 1)
        report["honest_rate_ratio"] = round(ratio, 3)
        report["checks"] = {
            "services_up": not watch.down and all(
                v <= HEARTBEAT_MAX_AGE_S for v in watch.max_heartbeat_age.values()),
            "rss_under_caps": all(watch.peak[n] <= cap[n] for n in SERVICES),
            "honest_rate_at_least_half": ratio >= 0.5,
            "honest_lines_stored_once": all(v["ok"] for v in report["stored_once"].values()),
            "counters_add_up": ingest["lines_in"] == storage.get("readings_stored", 0)
            + storage.get("lines_rejected", 0),
            "honest_meters_undisturbed": not report["baseline"]["errors"]
            and not report["attack"]["errors"],
            "no_internal_errors": not any(c.get("internal_errors")
                                          for c in report["counters"].values()),
        }
        report["down"] = watch.down
        report["ok"] = all(report["checks"].values())
    finally:
        for proc in CHILDREN:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        stack.close()
        if report.get("ok") and not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"logs and database kept in {tmp}", flush=True)
    return report


def summary(r: dict) -> str:
    b, at, h = r["baseline"], r["attack"], r["hostile"]
    i, s, br = r["counters"]["ingest"], r["counters"]["storage"], r["counters"]["broker"]
    return "\n".join([
        f"hostile run, {r['minutes']} min: {'OK' if r['ok'] else 'FAILED'} {r['checks']}",
        f"honest meters: alone {b['rate_per_s']:,} lines/s ({b['lines']:,} lines), beside the "
        f"attack {at['rate_per_s']:,} lines/s ({at['lines']:,} lines) = "
        f"{r['honest_rate_ratio']:.2f}; slowest full second {at['full_seconds_min_per_s']:,}, "
        f"worst slice late by {at['worst_lateness_s']} s",
        f"stored exactly once: {r['stored_once']}",
        f"hostile: {h}",
        "ingest: " + ", ".join(f"{k} {i.get(k, 0):,}" for k in (
            "lines_in", "connections", "connections_refused", "idle_closed",
            "rejected.line_too_long", "bytes_in", "backpressure_pauses", "internal_errors")),
        "storage: " + ", ".join(f"{k} {s.get(k, 0):,}" for k in (
            "readings_stored", "lines_rejected", "gaps")),
        "broker: " + ", ".join(f"{k} {v:,}" for k, v in br.items() if v),
        "peak RSS MB (cap): " + ", ".join(f"{n} {r['rss_peak_mb'][n]} ({r['caps_mb'][n]:.0f})"
                                          for n in SERVICES),
        f"peak RSS MB, honest alone: {r['rss_peak_honest_alone_mb']}",
        f"oldest heartbeat seen (s): {r['max_heartbeat_age_s']} over {r['samples']} samples",
    ])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["honest"]:
        ap = argparse.ArgumentParser(prog="bench.hostile honest")
        for name, kind in (("port", int), ("conns", int), ("rate", float), ("seconds", float),
                           ("t0-us", int)):
            ap.add_argument(f"--{name}", type=kind, required=True)
        h = ap.parse_args(argv[1:])
        print(json.dumps(honest(h.port, h.conns, h.rate, h.seconds, h.t0_us)), flush=True)
        return 0
    if argv[:1] == ["hostile"]:
        ap = argparse.ArgumentParser(prog="bench.hostile hostile")
        for name, kind in (("port", int), ("seconds", float), ("bus-publish", str),
                           ("bus-subscribe", str), ("idle", int), ("slow", int),
                           ("open-per-s", float), ("long-conns", int), ("noise-conns", int),
                           ("noise-kb-s", float), ("flood-per-s", float)):
            ap.add_argument(f"--{name}", type=kind, required=True)
        ap.add_argument("--long-pause", type=float, default=1.0)
        ap.add_argument("--bus-flood-per-s", type=float, default=20.0)
        ap.add_argument("--bus-msgs-per-s", type=float, default=200.0)
        h = ap.parse_args(argv[1:])
        print(json.dumps(asyncio.run(Hostile(h).run())), flush=True)
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="whole run (default 10)")
    ap.add_argument("--honest-rate", type=float, default=20_000,
                    help="lines/s the honest meters offer in all (default 20000)")
    ap.add_argument("--honest-conns", type=int, default=10)
    ap.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS,
                    help=f"ingest.max_connections for the run (default {MAX_CONNECTIONS})")
    ap.add_argument("--idle", type=int, default=2500, help="idle connections (default 2500)")
    ap.add_argument("--slow", type=int, default=200, help="slow connections (default 200)")
    ap.add_argument("--open-per-s", type=float, default=500.0,
                    help="how fast the idle and slow ones open (default 500/s)")
    ap.add_argument("--long-conns", type=int, default=2, help="senders of 10 MB lines")
    ap.add_argument("--noise-conns", type=int, default=4, help="senders of random bytes")
    ap.add_argument("--noise-kb-s", type=float, default=256.0,
                    help="random bytes in all, KB/s (default 256: about 1000 lines/s)")
    ap.add_argument("--flood-per-s", type=float, default=200.0,
                    help="connect-and-close per second on the meters' port (default 200)")
    ap.add_argument("--json", help="write the report here too")
    ap.add_argument("--keep", action="store_true", help="keep the logs and database")
    a = ap.parse_args(argv)
    # the harness's own stats subscriber sees the garbage too: its drops are expected here
    logging.getLogger("shared.bus").setLevel(logging.ERROR)

    def stop(_signum, _frame):  # SIGTERM like Ctrl-C: the stack and the children are stopped
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    report = run(a)
    print(summary(report))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
