"""Dashboard benchmark: ``python -m bench.dashboard [--quick] [--json FILE]``.

1. **Serving** (no pipeline running): a database with 24 h of 10 readings/s per meter (the
   five default meters: four circuits; their power points and rollups, all settled but the
   last minutes) ending now; a real ``wattflow dashboard`` process; the time to serve what the
   page fetches when it opens a window (``/api/history`` for 4 circuits and 5 meters, and
   ``/api/now`` with the window's energy) for 5 min, 1 h and 24 h, and for one live poll
   (``/api/now`` and the tail of ``/api/history``). Median and max of several requests.
2. **Cost under load**: bench/run.py's throughput phase (5M lines flat out; ``--ticks`` to
   change, ``--quick``: 200k) on a fresh stack, side by side in each round: without the
   dashboard; with it and a poller making the page's requests once a second for the page's
   default window (5 min ending now); and for a window over the data being written (all of it
   unsettled: the heaviest case). Reported: end-to-end readings/s of each, the cost in percent
   against the run without, and the poll times. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlencode

import numpy as np

from bench.load import METERS, STEP_US, T0
from shared.config import Meter
from shared.db import PowerBatch, RawBatch, open_database
from tests.integration.stack import ROOT, Stack, free_port, wait_for

CIRCUITS = [m[0] for m in METERS[1:]]  # default circuits: named after their A meter
V_METER = METERS[0][0]


def fill(target: str, seconds: float, rate: float, end_us: int, chunk_s: float = 600) -> int:
    """``seconds`` of ``rate`` readings/s per meter (all five at the same instants) up to
    ``end_us``, with their power points (V x A, one per circuit and instant) and rollups, all
    minutes rolled up but the last, in ``target``: a SQLite file's path or a database URL
    (``postgresql://...``). Returns readings written."""
    url = target if "://" in target else f"sqlite:///{target}"
    db = open_database(url, [Meter(*m) for m in METERS], checkpoints=False)
    step = int(1e6 / rate)
    ticks = int(seconds * rate)
    start = end_us - ticks * step
    rng = np.random.default_rng(7)
    per = int(chunk_s * rate)
    written = 0
    for seq, k0 in enumerate(range(0, ticks, per)):
        k = np.arange(k0, min(ticks, k0 + per))
        ts = start + k * step
        phase = ts / 3.6e9 * 2 * np.pi
        values = [np.clip(lo + (hi - lo) * (0.5 + 0.35 * np.sin(phase * (i + 1))
                                            + 0.05 * rng.standard_normal(len(k))), lo, hi)
                  for i, (_, _, lo, hi) in enumerate(METERS)]
        meter = np.repeat(np.arange(len(METERS))[None, :], len(k), 0).ravel()
        raw = RawBatch("bench-fill", seq, seq, meter, np.repeat(ts, len(METERS)),
                       np.stack(values, 1).ravel())
        n = len(k) * len(CIRCUITS)
        volts = np.tile(values[0], len(CIRCUITS))
        amps = np.concatenate(values[1:])
        points = {"circuit": np.repeat(np.array(CIRCUITS, "S"), len(k)),
                  "v_meter": np.full(n, V_METER.encode(), "S8"),
                  "a_meter": np.repeat(np.array(CIRCUITS, "S"), len(k)),
                  "ts_us": np.tile(ts, len(CIRCUITS)), "watts": volts * amps, "volts": volts,
                  "amps": amps}
        db.write([raw, PowerBatch(points)])
        written += len(raw.ts_us)
    while db.rollup_step(time.time() + 20, most=500):  # every minute written is settled
        pass
    # the newest minutes as a live database has them: not rolled up yet
    mark = "?" if url.startswith("sqlite") else "%s"
    db.conn.execute(f"DELETE FROM power_1m WHERE t >= {mark}", (end_us - 90_000_000,))
    db.close()
    return written


def get(url: str) -> tuple[float, int]:
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=120) as resp:
        body = resp.read()
    return (time.perf_counter() - started) * 1000, len(body)


def page_requests(base: str, t0: int, t1: int, tail: bool = False, step: int = 0) -> list[str]:
    """What the page asks for: all series of the window (or its tail) and the numbers."""
    series = [("circuit", c) for c in CIRCUITS] + [("meter", m[0]) for m in METERS]
    window = [("from", f"@{t0 / 1e6:.6f}"), ("to", f"@{t1 / 1e6:.6f}")]
    hist = series + ([("from", f"@{(t1 - 10_000_000) / 1e6:.6f}"), ("to", window[1][1]),
                      ("step", str(step))] if tail else window)
    return [f"{base}/api/history?{urlencode(hist)}", f"{base}/api/now?{urlencode(window)}"]


def serving(tmp: Path, quick: bool) -> dict:
    hours = 2 if quick else 24
    now = time.time_ns() // 1000
    db_path = tmp / "serve.db"
    print(f"filling {hours} h of 10 readings/s per meter ...", flush=True)
    started = time.perf_counter()
    n = fill(str(db_path), hours * 3600, 10, now)
    fill_s = time.perf_counter() - started
    port = free_port()
    cfg = tmp / "serve.yaml"
    cfg.write_text(json.dumps({"storage": {"path": str(db_path)},
                               "dashboard": {"port": port},
                               "runtime": {"run_dir": str(tmp / "run")},
                               "bus": {"publish": f"ipc://{tmp}/nobody"}}))
    proc = subprocess.Popen([sys.executable, "-m", "services", "dashboard", "--config",
                             str(cfg)], cwd=ROOT, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    out = {"readings_in_db": n, "fill_seconds": round(fill_s, 1), "windows": {}}
    try:
        wait_for(lambda: _up(base), 60, "the dashboard answers")
        for name, span_s in (("5min", 300), ("1h", 3600), ("24h", 86400)):
            if span_s > hours * 3600:
                continue
            t1 = time.time_ns() // 1000
            t0 = t1 - span_s * 1_000_000
            first = json.loads(urllib.request.urlopen(page_requests(base, t0, t1)[0]).read())
            opens, polls, sizes = [], [], []
            for _ in range(3 if quick else 7):
                took = [get(u) for u in page_requests(base, t0, t1)]
                opens.append(sum(t for t, _ in took))
                sizes.append(sum(s for _, s in took))
                took = [get(u) for u in page_requests(base, t0, t1, True, first["step_us"])]
                polls.append(sum(t for t, _ in took))
            out["windows"][name] = {
                "step_s": first["step_us"] / 1e6,
                "points_per_series": max(len(s["t"]) for s in first["series"].values()),
                "open_ms_median": round(statistics.median(opens), 1),
                "open_ms_max": round(max(opens), 1), "open_kb": round(sizes[0] / 1024, 1),
                "poll_ms_median": round(statistics.median(polls), 1),
                "poll_ms_max": round(max(polls), 1)}
            print(f"  {name}: {out['windows'][name]}", flush=True)
    finally:
        proc.terminate()
        proc.wait(30)
    return out


def _up(base: str) -> bool:
    try:
        return get(f"{base}/api/config")[1] > 0
    except OSError:
        return False


class Poller:
    """The page's requests once a second against a dashboard, in a thread: the window once,
    then per second ``/api/now`` and the window's last 10 s. ``span_s``: a live window ending
    now (the page's default); else the fixed window ``t0..t1``."""

    def __init__(self, base: str, t0: int = 0, t1: int = 0, span_s: float = 0):
        self.base, self.t0, self.t1, self.span_us = base, t0, t1, int(span_s * 1e6)
        self.stop = threading.Event()
        self.times: list[float] = []
        self.errors = 0
        self.thread = threading.Thread(target=self.run)

    def window(self) -> tuple[int, int]:
        if not self.span_us:
            return self.t0, self.t1
        now = time.time_ns() // 1000
        return now - self.span_us, now

    def run(self) -> None:
        step = 0
        while not self.stop.wait(1.0):
            t0, t1 = self.window()
            try:
                if not step:
                    first = json.loads(urllib.request.urlopen(
                        page_requests(self.base, t0, t1)[0], timeout=120).read())
                    step = first["step_us"]
                took = [get(u) for u in page_requests(self.base, t0, t1, True, step)]
                self.times.append(sum(t for t, _ in took))
            except OSError:
                self.errors += 1


MODES = {"without": "no dashboard",
         "live": "the page's 5 min window ending now (the benchmark's lines are stamped in 2025:"
                 " what it polls is the newest values, freshness, energy today)",
         "data": "a window over the data being written (every point in it still unsettled:"
                 " energy and series from the rows each second, the heaviest case)"}


def cost_under_load(tmp: Path, ticks: int, rounds: int) -> dict:
    from bench.run import BENCH_CONFIG, throughput

    conns = 10
    span = conns * ticks * STEP_US
    results: dict[str, list[int]] = {m: [] for m in MODES}
    poll_ms: dict[str, list[float]] = {m: [] for m in MODES}
    errors = 0
    for r in range(rounds):
        for mode in MODES:
            where = tmp / f"load-{r}-{mode}"
            where.mkdir()
            port = free_port()
            stack = Stack(where, dict(BENCH_CONFIG, dashboard={"port": port}))
            poller = None
            try:
                stack.start()
                if mode != "without":
                    stack.start("dashboard")
                stack.wait_ready()
                if mode != "without":
                    base = f"http://127.0.0.1:{port}"
                    wait_for(lambda b=base: _up(b), 60, "the dashboard answers")
                    poller = (Poller(base, span_s=300) if mode == "live"
                              else Poller(base, T0, T0 + span))
                    poller.thread.start()
                print(f"throughput, {MODES[mode]} (round {r + 1}) ...", flush=True)
                tp = throughput(stack, conns, ticks)
                results[mode].append(tp["readings_per_s"])
                print(f"  {tp['readings_per_s']:,} readings/s", flush=True)
            finally:
                if poller is not None:
                    poller.stop.set()
                    poller.thread.join()
                    poll_ms[mode] += poller.times
                    errors += poller.errors
                if "dashboard" in stack.procs:
                    stack.stop("dashboard")
                stack.close()
    base = statistics.median(results["without"])
    out = {"lines_per_run": conns * ticks * 5, "readings_per_s": results, "poll_errors": errors}
    for mode in MODES:
        med = statistics.median(results[mode])
        out[mode] = {"what": MODES[mode], "median_readings_per_s": med,
                     "cost_percent": round(100 * (1 - med / base), 1),
                     "polls": len(poll_ms[mode]),
                     "poll_ms_median": round(statistics.median(poll_ms[mode]), 1)
                     if poll_ms[mode] else None,
                     "poll_ms_max": round(max(poll_ms[mode]), 1) if poll_ms[mode] else None}
    return out


def _interrupt(_signum, _frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small runs (about a minute)")
    ap.add_argument("--rounds", type=int, default=2, help="side-by-side rounds under load")
    ap.add_argument("--ticks", type=int,
                    help="load: ticks per connection (x 5 lines x 10 connections; default "
                         "100000 = 5M lines as bench/run.py, --quick 4000)")
    ap.add_argument("--skip-load", action="store_true", help="only the serving times")
    ap.add_argument("--skip-serving", action="store_true", help="only the cost under load")
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "dashboard.json"))
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # stacks are stopped on the way out
    report = {"quick": args.quick}
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_serving:
            report["serving"] = serving(Path(tmp), args.quick)
        if not args.skip_load:
            ticks = args.ticks or (4_000 if args.quick else 100_000)
            report["under_load"] = cost_under_load(Path(tmp), ticks, args.rounds)
    print(json.dumps(report, indent=2))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
