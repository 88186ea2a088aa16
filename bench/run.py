"""End-to-end benchmark of the real stack, with the rates that bound it measured in the same run.

    python -m bench.run            # full run (a few minutes)
    python -m bench.run --quick    # small run (seconds), used by the test suite

Prints a report and writes JSON (default bench/results/latest.json). Phases:
1. references on this machine, now: bare TCP line count (a reader that only counts), bare
   parse (``parse_block`` and a ``strptime``-per-line baseline), bare ``executemany`` into the
   storage schema;
2. throughput: the whole stack as processes, a separate load-generator process sending flat out
   over several connections; clock from the first byte until every line is in the database and
   every power point is stored;
3. latency at a fixed offered rate (20 connections): power arrival at a subscriber minus the
   ingest receive time carried in each power record;
then CPU seconds and peak RSS of every service.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import numpy as np

from bench.load import GROUP_SIZE, group_meters, make_payload
from shared import config, parsing, topics
from tests.integration.stack import SERVICES, Stack, wait_for

ROOT = Path(__file__).resolve().parents[1]
LATENCY_GROUP0 = 100  # latency phase uses fresh meters, so no reading is older than one held


def bench_config(throughput_conns: int, latency_conns: int) -> dict:
    groups = list(range(throughput_conns)) + list(range(LATENCY_GROUP0,
                                                        LATENCY_GROUP0 + latency_conns))
    meters, circuits = [], []
    for g in groups:
        ms = group_meters(g)
        meters += [{"ip": ip, "unit": unit, "range": [lo, hi]} for ip, unit, lo, hi in ms]
        circuits += [{"name": a[0], "voltage": ms[0][0], "current": a[0]} for a in ms[1:]]
    return {"meters": meters, "circuits": circuits,
            "runtime": {"stats_interval_s": 0.1}, "plotter": {"interval_s": 1.0}}


def run_load(port: int, conns: int, ticks: int, rate: float | None = None,
             first_group: int = 0) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "bench.load", "--port", str(port), "--connections", str(conns),
           "--ticks", str(ticks), "--first-group", str(first_group)]
    if rate:
        cmd += ["--rate", str(rate)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))


# ---- references ------------------------------------------------------------------------------

def ref_tcp(conns: int, ticks: int) -> float:
    """Lines/s to a reader that only counts newlines, from the same load generator."""
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    counted = []

    def serve() -> None:
        srv.settimeout(60)
        socks = [srv.accept()[0] for _ in range(conns)]
        total = 0
        import selectors

        sel = selectors.DefaultSelector()
        for s in socks:
            sel.register(s, selectors.EVENT_READ)
        open_ = len(socks)
        while open_:
            for key, _ in sel.select(timeout=30):
                data = key.fileobj.recv(1 << 20)
                if data:
                    total += data.count(b"\n")
                else:
                    sel.unregister(key.fileobj)
                    key.fileobj.close()
                    open_ -= 1
        counted.append(total)

    t = threading.Thread(target=serve)
    t.start()
    proc = run_load(port, conns, ticks)
    out = json.loads(proc.communicate(timeout=300)[0])
    t.join()
    srv.close()
    assert counted[0] == out["lines"], (counted, out)
    return out["lines"] / (out["t_all_sent"] - out["t_first_byte"])


def ref_parse(block: bytes, table: parsing.MeterTable, batch: int = 5000) -> tuple[float, float]:
    """parse_block over the data in ingest-sized batches; and strptime per line."""
    all_lines = block.split(b"\n")[:-1]
    blocks = [b"\n".join(all_lines[k : k + batch]) + b"\n"
              for k in range(0, len(all_lines), batch)]
    lines = len(all_lines)
    start = time.perf_counter()
    parsed = sum(parsing.parse_block(b, table).count for b in blocks)
    fast = lines / (time.perf_counter() - start)
    assert parsed == lines
    sample = block.split(b"\n")[:50_000]
    start = time.perf_counter()
    for ln in sample:
        if ln:
            ip, ts, value = ln.split(b"\t")
            datetime.strptime(ts.decode(), "%Y.%m.%d %H:%M:%S.%f")
            float(value)
    slow = len(sample) / (time.perf_counter() - start)
    return fast, slow


def ref_executemany(rows: int, batch: int = 5000) -> float:
    from services.storage.db import SCHEMA

    with tempfile.TemporaryDirectory() as tmp:
        conn = sqlite3.connect(Path(tmp) / "ref.db", isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(SCHEMA)
        data = [(i % 100 + 1, 1_700_000_000_000_000 + i * 1000, float(i % 97)) for i in range(rows)]
        start = time.perf_counter()
        for k in range(0, rows, batch):
            conn.execute("BEGIN")
            conn.executemany("INSERT INTO readings (meter_id, ts_us, value) VALUES (?, ?, ?)",
                             data[k : k + batch])
            conn.execute("COMMIT")
        rate = rows / (time.perf_counter() - start)
        conn.close()
    return rate


# ---- the stack -------------------------------------------------------------------------------

def proc_usage(pid: int) -> tuple[float, int]:
    """(CPU seconds, peak RSS bytes) of a live process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    peak = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                peak = int(line.split()[1]) * 1024
    return cpu, peak


def expected_power(conns: int, ticks: int) -> int:
    """Per connection and tick: each A reading pairs with the V of its tick (4), and the V
    reading pairs with the four A readings of the tick before, 10 ms earlier (4; not on the
    first tick). Both are "a new reading whose circuit partner is within 0.5 s"."""
    a = GROUP_SIZE - 1
    return conns * (ticks * 2 * a - a)


def throughput(stack: Stack, conns: int, ticks: int) -> dict:
    lines = conns * ticks * GROUP_SIZE
    power_expected = expected_power(conns, ticks)
    before = {n: proc_usage(p.pid)[0] for n, p in stack.procs.items()}
    load = run_load(stack.port, conns, ticks)

    def done() -> bool:
        c = stack.counters("storage")
        return c.get("readings_stored", 0) >= lines and c.get("power_stored", 0) >= power_expected

    wait_for(done, 600, lambda: f"{lines} readings and {power_expected} power points stored: "
                               f"{stack.describe()}", step=0.02)
    t_end = time.time()
    sent = json.loads(load.communicate(timeout=60)[0])
    elapsed = t_end - sent["t_first_byte"]
    readings, power = stack.count("readings"), stack.count("power")
    cpu = {n: round(proc_usage(p.pid)[0] - before[n], 2) for n, p in stack.procs.items()}
    return {"lines": lines, "connections": conns, "seconds": round(elapsed, 3),
            "readings_per_s": round(lines / elapsed), "readings_in_db": readings,
            "db_rows_per_s": round((readings + power) / elapsed),
            "power_expected": power_expected, "power_in_db": power,
            "accept_seconds": round(sent["t_all_sent"] - sent["t_first_byte"], 3),
            "cpu_seconds": cpu}


def latency(stack: Stack, conns: int, rate_total: float, seconds: float) -> dict:
    sub = stack.subscribe(topics.POWER)
    wait_for(lambda: stack.listening("power", "power"), 10, "bench subscribed to power")
    per_conn = rate_total / conns
    ticks = int(per_conn * seconds / GROUP_SIZE)
    lat: list[np.ndarray] = []
    expected = expected_power(conns, ticks)
    frames_before = stack.counters("plotter").get("frames", 0)
    t_start = time.time()
    load = run_load(stack.port, conns, ticks, rate=per_conn, first_group=LATENCY_GROUP0)
    got = 0
    deadline = time.monotonic() + seconds * 3 + 60
    while got < expected and time.monotonic() < deadline:
        for msg in sub.recv_batch(100, 1000):
            now = time.time()
            t_recv = msg.data["t_recv"]
            lat.append(now - t_recv)
            got += len(t_recv)
    sent = json.loads(load.communicate(timeout=60)[0])
    elapsed = time.time() - t_start
    frames = stack.counters("plotter").get("frames", 0) - frames_before
    ms = np.concatenate(lat) * 1000 if lat else np.zeros(1)
    return {"offered_lines_per_s": rate_total, "connections": conns, "lines": sent["lines"],
            "power_points": got, "power_expected": expected,
            "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p95_ms": round(float(np.percentile(ms, 95)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "max_ms": round(float(ms.max()), 2),
            "plotter_frames_per_s": round(frames / elapsed, 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a small run (seconds)")
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "latest.json"))
    args = ap.parse_args(argv)
    conns, lat_conns = 10, 20
    ticks = 4_000 if args.quick else 40_000  # x5 lines x conns: 200k or 2M lines
    lat_rate, lat_s = (20_000, 2.0) if args.quick else (100_000, 10.0)
    cfg = bench_config(conns, lat_conns)
    report: dict = {"machine": machine(), "quick": args.quick}

    table = parsing.MeterTable(config.load(env={}).meters.__class__(
        config.Meter(ip, u, lo, hi) for g in range(conns) for ip, u, lo, hi in group_meters(g)))
    block = b"".join(make_payload(g, ticks // 4) for g in range(conns))
    print("measuring references ...", flush=True)
    tcp = ref_tcp(conns, ticks)
    parse_fast, parse_strptime = ref_parse(block, table)
    insert = ref_executemany(conns * ticks * GROUP_SIZE // (2 if args.quick else 4))
    report["reference"] = {"tcp_lines_per_s": round(tcp), "parse_block_lines_per_s":
                           round(parse_fast), "strptime_lines_per_s": round(parse_strptime),
                           "executemany_rows_per_s": round(insert)}

    with tempfile.TemporaryDirectory() as tmp:
        stack = Stack(Path(tmp), cfg)
        try:
            stack.start()
            stack.wait_ready()
            print("throughput ...", flush=True)
            report["throughput"] = throughput(stack, conns, ticks)
            print("latency ...", flush=True)
            report["latency"] = latency(stack, lat_conns, lat_rate, lat_s)
            report["services"] = {n: dict(zip(("cpu_s_total", "peak_rss_mb"), (
                round(u[0], 2), round(u[1] / 2**20, 1)), strict=True))
                for n, u in ((n, proc_usage(p.pid)) for n, p in stack.procs.items())}
        finally:
            stack.close()
    e2e = report["throughput"]["readings_per_s"]
    ref = report["reference"]
    report["ratios"] = {
        "vs_tcp": round(e2e / ref["tcp_lines_per_s"], 3),
        "vs_parse_block": round(e2e / ref["parse_block_lines_per_s"], 3),
        "vs_executemany": round(e2e / ref["executemany_rows_per_s"], 3),
        "db_rows_vs_executemany": round(report["throughput"]["db_rows_per_s"]
                                        / ref["executemany_rows_per_s"], 3),
        "vs_original_40k": round(e2e / 40_000, 2),
    }
    print_report(report)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"\nJSON: {args.json}")
    return 0


def machine() -> dict:
    model = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                  if ln.startswith("model name")), "?")
    return {"cpus": os.cpu_count(), "cpu": model, "python": sys.version.split()[0],
            "when": datetime.now().isoformat(timespec="seconds")}


def print_report(r: dict) -> None:
    m, ref, tp, lat = r["machine"], r["reference"], r["throughput"], r["latency"]
    print(f"\nwattflow benchmark ({'quick' if r['quick'] else 'full'}) on {m['cpus']} x "
          f"{m['cpu']}, Python {m['python']}")
    print(f"\nend to end: {tp['lines']:,} lines from {tp['connections']} connections in "
          f"{tp['seconds']} s = {tp['readings_per_s']:,} readings/s stored "
          f"({tp['readings_in_db']:,} in db; power {tp['power_in_db']:,} of "
          f"{tp['power_expected']:,} expected); ingest accepted all in {tp['accept_seconds']} s")
    print(f"latency at {lat['offered_lines_per_s']:,} lines/s offered from {lat['connections']} "
          f"connections: p50 {lat['p50_ms']} ms, p95 {lat['p95_ms']} ms, p99 {lat['p99_ms']} ms,"
          f" max {lat['max_ms']} ms ({lat['power_points']:,} of {lat['power_expected']:,} power "
          f"points); plotter {lat['plotter_frames_per_s']} frames/s")
    print("\nreferences measured in this run:          rate/s     ours/ref")
    for key, label, ratio in (("tcp_lines_per_s", "bare TCP line count", "vs_tcp"),
                              ("parse_block_lines_per_s", "bare parse_block", "vs_parse_block"),
                              ("strptime_lines_per_s", "strptime per line", None),
                              ("executemany_rows_per_s", "bare executemany (same schema)",
                               "vs_executemany")):
        rr = f"{r['ratios'][ratio]:>8.3f}" if ratio else ""
        print(f"  {label:<36} {ref[key]:>12,} {rr}")
    print(f"  {'original program (its README)':<36} {40_000:>12,} "
          f"{r['ratios']['vs_original_40k']:>8.2f}")
    print(f"  rows written by storage (readings + power): {tp['db_rows_per_s']:,}/s = "
          f"{r['ratios']['db_rows_vs_executemany']:.3f} of bare executemany")
    print("\nper service:        CPU s (whole run)   peak RSS MB   CPU s (throughput phase)")
    for name in SERVICES:
        s = r["services"][name]
        print(f"  {name:<18} {s['cpu_s_total']:>10}   {s['peak_rss_mb']:>14}   "
              f"{tp['cpu_seconds'].get(name, 0):>10}")


if __name__ == "__main__":
    sys.exit(main())
