"""Speed and memory of power's as-of stream: in-order and shuffled arrival, the recompute
from stored readings, the memory its lateness window holds.

    python -m bench.power [--seconds 400] [--repeat 3]

Reports, does not assert. Data: the five default meters (10.0.0.1 V; 10.0.0.2-5 A, four
circuits sharing the V meter), one reading per meter per millisecond, batches of 5,000.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from services.power.asof import Stream, points_in_range
from shared.config import Circuit

METERS = [f"10.0.0.{i}".encode() for i in range(1, 6)]
CIRCUITS = [Circuit(f"10.0.0.{i}", "10.0.0.1", f"10.0.0.{i}") for i in range(2, 6)]
D = 500_000
BATCH = 5000


def readings(n_ts: int, step_us: int, seed: int = 1):
    """n_ts timestamps step_us apart, the five meters at each (V first), as columns."""
    rng = np.random.default_rng(seed)
    ts = np.repeat(1_700_000_000_000_000 + np.arange(n_ts, dtype=np.int64) * step_us, 5)
    meter = np.tile(np.array(METERS, "S"), n_ts)
    value = rng.uniform(0.5, 100.0, len(ts))
    return meter, ts, value


def shuffled_within(cols, block: int, seed: int = 2):
    """Readings permuted within consecutive blocks of `block` readings."""
    rng = np.random.default_rng(seed)
    n = len(cols[1])
    order = np.arange(n)
    for i in range(0, n, block):
        rng.shuffle(order[i:i + block])
    return tuple(c[order] for c in cols)


def batches(cols):
    n = len(cols[1])
    return [tuple(c[i:i + BATCH] for c in cols) for i in range(0, n, BATCH)]


def run_stream(bs, lateness_us: int):
    s = Stream(CIRCUITS, D, lateness_us, 10**8)
    points = late = 0
    t = time.perf_counter()
    for b in bs:
        out, work = s.feed(*b)
        points += len(out["ts_us"])
        late += len(work)
    return time.perf_counter() - t, points, late, s


def rate(n: int, secs: list[float]) -> str:
    return f"{n / statistics.median(secs) / 1e6:5.2f}M readings/s (median of {len(secs)})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=400, help="seconds of data at 1 ms")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--lateness", type=float, default=10.0, help="seconds")
    args = ap.parse_args()
    cols = readings(args.seconds * 1000, 1000)
    n = len(cols[1])
    lateness = round(args.lateness * 1e6)
    print(f"{n:,} readings ({args.seconds} s of 5 meters at 1 ms), batches of {BATCH:,}, "
          f"D 0.5 s, lateness {args.lateness:g} s")
    cases = [("in order", batches(cols))]
    for block_s in (0.1, 1.0, 5.0):
        block = round(block_s * 1000) * 5
        cases.append((f"shuffled within {block_s:g} s blocks", batches(shuffled_within(cols,
                                                                                      block))))
    for name, bs in cases:
        res = [run_stream(bs, lateness) for _ in range(args.repeat)]
        _, points, late, s = res[0]
        print(f"{name:32s} Stream.feed  {rate(n, [r[0] for r in res])}, {points:,} points "
              f"emitted, {late} Late, held {s.held:,} readings / {s.memory_bytes / 1e6:.1f} MB")

    # recompute from storage: one circuit's two meters as fetched (sorted by ts), 1M each
    v_ts, a_ts = cols[1][0::5], cols[1][1::5]
    v_val, a_val = cols[2][0::5], cols[2][1::5]
    secs = []
    for _ in range(args.repeat):
        t = time.perf_counter()
        p = points_in_range(v_ts, v_val, a_ts, a_val, int(v_ts[0]), int(v_ts[-1]), D)
        secs.append(time.perf_counter() - t)
    print(f"points_in_range, one circuit, {2 * len(v_ts):,} readings in: "
          f"{rate(2 * len(v_ts), secs)}, {len(p['ts_us']):,} points")

    # memory for a 60 s lateness window at 20,000 readings/s per meter
    s = Stream(CIRCUITS, D, 60_000_000, 10**8)
    big = readings(70 * 20_000, 50, seed=3)
    t = time.perf_counter()
    for b in batches(big):
        s.feed(*b)
    secs = time.perf_counter() - t
    print(f"60 s lateness at 20,000 readings/s per meter (70 s fed in order, "
          f"{rate(len(big[1]), [secs]).split(' (')[0]}): held {s.held:,} readings, "
          f"{s.held * 16 / 1e6:.1f} MB of data, {s.memory_bytes / 1e6:.1f} MB allocated")


if __name__ == "__main__":
    main()
