"""Soak: a fresh stack driven for minutes by meters stamped with the wall clock.

    ./run-bench --soak MINUTES [--rate LINES_PER_S]

A load process (``bench.load --wallclock``) sends the five default meters' lines at a steady
rate, one in a hundred ticks with an out-of-range current reading. Every few seconds the soak
records each service's RSS, the database's and its WAL's size, ingest's unacked lines and the
latency of power points (line received by ingest -> power received by a subscriber of the
soak's own), and at the end it stops the load, waits until everything is stored, and checks
that every line is in the database exactly once (or rejected, with the right reason). It
reports RSS slopes (MB per minute after the first fifth of the run: the warm-up), the WAL's
peak against ``storage.wal_max_mb``, and latency percentiles over the whole run and per minute.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from bench.load import METERS
from bench.run import rss
from shared import topics
from tests.integration.stack import Stack, wait_for

SAMPLE_S = 5.0
ROOT = Path(__file__).resolve().parents[1]


def rss_mb(pid: int) -> float:
    return rss(pid) / 2**20


def file_mb(path: Path) -> float:
    try:
        return path.stat().st_size / 2**20
    except FileNotFoundError:
        return 0.0


def slope_per_minute(t: list[float], y: list[float]) -> float:
    if len(t) < 3:
        return 0.0
    return float(np.polyfit(np.array(t) / 60, np.array(y), 1)[0])


def soak(tmp: Path, minutes: float, rate: float, wal_max_mb: float = 64, conns: int = 5,
         quiet: bool = False) -> dict:
    cfg = {"runtime": {"stats_interval_s": 0.5}, "plotter": {"interval_s": 1.0},
           "storage": {"wal_max_mb": wal_max_mb}}
    stack = Stack(tmp, cfg)
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    try:
        stack.start()
        stack.wait_ready()
        sub = stack.subscribe(topics.POWER)
        wait_for(lambda: stack.listening("power", "power"), 10, "soak subscribed to power")
        latencies: list[tuple[float, np.ndarray]] = []  # (arrival, latency per point)
        stop = threading.Event()

        def receive() -> None:
            while not stop.is_set():
                for msg in sub.recv_batch(50, 1):
                    now = time.time()
                    latencies.append((now, now - np.asarray(msg.data["t_recv"])))

        receiver = threading.Thread(target=receive, name="power-receiver")
        receiver.start()
        seconds = minutes * 60
        load = subprocess.Popen(
            [sys.executable, "-m", "bench.load", "--port", str(stack.port), "--wallclock",
             "--connections", str(conns), "--rate", str(rate / conns), "--seconds", str(seconds)],
            stdout=subprocess.PIPE, cwd=ROOT, env=stack.env)
        started = time.time()
        samples = []
        db = stack.db_path
        wal = Path(str(db) + "-wal")
        while load.poll() is None:
            time.sleep(SAMPLE_S)
            stats = stack.stats()
            gauges = stats.get("ingest", {}).get("gauges", {})
            sample = {"t": round(time.time() - started, 1),
                      "rss_mb": {n: round(rss_mb(p.pid), 1) for n, p in stack.procs.items()},
                      "wal_mb": round(file_mb(wal), 1), "db_mb": round(file_mb(db), 1),
                      "unacked_lines": gauges.get("unacked_lines", 0),
                      # power's minutes: rollups kept in the write, or recomputed (and why)
                      "rollups": {k: v for k, v in stats.get("storage", {}).get("gauges", {})
                                  .items() if k.startswith("rollup")}}
            samples.append(sample)
            say(f"  {sample['t']:>7.0f} s  wal {sample['wal_mb']:>6} MB  db "
                f"{sample['db_mb']:>8} MB  unacked {sample['unacked_lines']:>7}  RSS MB "
                + " ".join(f"{n} {v}" for n, v in sample["rss_mb"].items())
                + "  " + " ".join(f"{k}={v}" for k, v in sample["rollups"].items()))
        sent = json.loads(load.communicate(timeout=60)[0])
        wait_for(lambda: stack.settled(sent["lines"]), 600,
                 lambda: f"{sent['lines']} lines settled: {stack.describe()}", step=0.5)
        time.sleep(1)  # (the last power points on their way to the soak's subscriber)
        stop.set()
        receiver.join()
        return report(stack, sent, samples, latencies, started, minutes, rate, wal_max_mb)
    finally:
        stack.close()


def report(stack, sent, samples, latencies, started, minutes, rate, wal_max_mb) -> dict:
    per_meter = dict(stack.query("SELECT meter, count(*) FROM readings_view GROUP BY meter"))
    rejected = dict(stack.query("SELECT reason, count(*) FROM rejected GROUP BY reason"))
    distinct = stack.query("SELECT count(*) FROM (SELECT DISTINCT meter_id, ts_us FROM readings)")
    exact = (per_meter == {ip: sent["per_meter"][ip] for ip, *_ in METERS}
             and rejected == ({"out_of_range": sent["invalid"]} if sent["invalid"] else {})
             and distinct[0][0] == sum(per_meter.values()))
    warm = minutes * 60 / 5
    later = [s for s in samples if s["t"] >= warm]
    slopes = {n: round(slope_per_minute([s["t"] for s in later],
                                        [s["rss_mb"][n] for s in later]), 2)
              for n in stack.procs}
    all_ms = (np.concatenate([lat for _, lat in latencies]) * 1000 if latencies
              else np.zeros(1))
    minute_ms = {}
    for t, lat in latencies:
        minute_ms.setdefault(int((t - started) // 60), []).append(lat)
    pct = (50, 90, 99)
    return {
        "minutes": minutes, "offered_lines_per_s": rate, "lines": sent["lines"],
        "invalid": sent["invalid"], "accepted_lines_per_s": round(
            sent["lines"] / (sent["t_all_sent"] - sent["t_first_byte"])),
        "exact": exact, "per_meter": per_meter, "rejected": rejected,
        "wal_max_mb_config": wal_max_mb, "wal_peak_mb": max(s["wal_mb"] for s in samples),
        "db_mb_end": samples[-1]["db_mb"], "unacked_peak": max(s["unacked_lines"] for s in samples),
        "rss_slope_mb_per_min_after_warmup": slopes,
        "rss_mb_end": samples[-1]["rss_mb"],
        "latency_ms": {f"p{q}": round(float(np.percentile(all_ms, q)), 2) for q in pct}
        | {"max": round(float(all_ms.max()), 2)},
        "latency_ms_per_minute": {m: [round(float(np.percentile(np.concatenate(v) * 1000, q)), 1)
                                      for q in pct] for m, v in sorted(minute_ms.items())},
        "samples": samples,
    }


def print_soak(r: dict) -> None:
    print(f"\nsoak: {r['minutes']} min at {r['offered_lines_per_s']:,} lines/s offered "
          f"({r['accepted_lines_per_s']:,} accepted), {r['lines']:,} lines, {r['invalid']:,} "
          f"invalid: {'EXACT' if r['exact'] else 'NOT EXACT'} (every line once, stored or "
          f"rejected with its reason)")
    print(f"  WAL peak {r['wal_peak_mb']} MB (storage.wal_max_mb {r['wal_max_mb_config']}); "
          f"database {r['db_mb_end']} MB at the end; ingest's unacked lines at most "
          f"{r['unacked_peak']:,}")
    print("  RSS slope after warm-up, MB/min: " + ", ".join(
        f"{n} {v}" for n, v in r["rss_slope_mb_per_min_after_warmup"].items()))
    lat = r["latency_ms"]
    print(f"  latency line -> power at a subscriber: p50 {lat['p50']} ms, p90 {lat['p90']} ms, "
          f"p99 {lat['p99']} ms, max {lat['max']} ms; per minute (p50/p90/p99): " + "; ".join(
              f"{m}: {'/'.join(str(x) for x in v)}"
              for m, v in r["latency_ms_per_minute"].items()))
