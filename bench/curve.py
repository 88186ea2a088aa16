"""What CURVE costs: end-to-end readings/s with ``bus.curve`` off and on, in the same run.

    python -m bench.curve              # 4 rounds of off/on, 5,000,000 lines each (minutes)
    python -m bench.curve --quick      # 1 round, 200,000 lines (the test suite runs this)

Each measurement is bench/run.py's throughput phase on a fresh stack (every service a process,
the load generator a process of its own, clock from its first byte until every line and its
power are in the database), with the bus on TCP loopback both times so only CURVE differs.
Rounds alternate off and on so drift on a shared machine hits both; the ratio per round, their
median, and best on / best off are reported. A bare reference too: MB/s through one PUSH/PULL
pair over TCP loopback, plain and CURVE.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.run import BENCH_CONFIG, ROOT, machine, throughput
from tests.integration.stack import Stack, free_port


def stack_config(tmp: Path, curve: bool) -> dict:
    """The bus on TCP loopback, the work queue too (the batches travel there: left out, it
    stayed on the test stack's ipc:// sockets)."""
    pub, sub, work_in, work_out = (f"tcp://127.0.0.1:{free_port()}" for _ in range(4))
    cfg = {k: dict(v) for k, v in BENCH_CONFIG.items()}
    cfg["bus"] = {"publish": pub, "subscribe": sub, "push": work_in, "pull": work_out,
                  "curve": curve, "keys_dir": str(tmp / "keys")}
    cfg["broker"] = {"xsub_bind": pub, "xpub_bind": sub, "work_in_bind": work_in,
                     "work_out_bind": work_out}
    return cfg


def measure(curve: bool, conns: int, ticks: int) -> dict:
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        if curve:
            subprocess.run([sys.executable, "-m", "services", "keys", "--dir", str(tmp / "keys")],
                           check=True, capture_output=True, cwd=ROOT,
                           env=dict(os.environ, PYTHONPATH=str(ROOT)))
        stack = Stack(tmp, stack_config(tmp, curve))
        try:
            stack.start()
            stack.wait_ready(60)
            result = throughput(stack, conns, ticks)
            result["broker_counters"] = stack.counters("broker")
        finally:
            stack.close()
    return result


def ref_transport(curve: bool, seconds: float, size: int = 1 << 16) -> float:
    """MB/s of ``size``-byte messages through one PUSH -> PULL pair over TCP loopback, with
    CURVE or without: what the encryption costs the bus bare (ZeroMQ's own threads)."""
    import threading

    import zmq

    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    if curve:
        server_public, server_secret = zmq.curve_keypair()
        pull.curve_server, pull.curve_secretkey = True, server_secret
        push.curve_serverkey = server_public
        push.curve_publickey, push.curve_secretkey = zmq.curve_keypair()
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push.connect(f"tcp://127.0.0.1:{port}")
    body, stop = b"x" * size, threading.Event()

    def send() -> None:
        while not stop.is_set():
            try:
                push.send(body, zmq.DONTWAIT)
            except zmq.Again:
                push.poll(100, zmq.POLLOUT)

    sender = threading.Thread(target=send)
    sender.start()
    pull.recv()  # connected (and the handshake done)
    got, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        got += len(pull.recv())
    elapsed = time.perf_counter() - start
    stop.set()
    sender.join()
    push.close(linger=0)
    pull.close(linger=0)
    ctx.term()
    return got / elapsed / 1e6


def summarize(report: dict) -> dict:
    """Ratios of the rounds: rates (wall clock: sensitive to whatever else runs) and CPU
    seconds of the services over the same lines (much less so)."""
    runs, bare = report["rounds"], report["bare_transport_mb_s"]
    rates = {m: [r[m]["readings_per_s"] for r in runs] for m in ("off", "on")}
    cpu = {m: {svc: statistics.median(r[m]["cpu_seconds"][svc] for r in runs)
               for svc in runs[0][m]["cpu_seconds"]} for m in ("off", "on")}
    total = {m: statistics.median(sum(r[m]["cpu_seconds"].values()) for r in runs)
             for m in ("off", "on")}
    return dict(report, median_ratio=round(statistics.median(r["ratio"] for r in runs), 3),
                best_ratio=round(max(rates["on"]) / max(rates["off"]), 3),
                median_cpu_seconds=cpu, median_cpu_seconds_total=total,
                cpu_ratio=round(total["on"] / total["off"], 3),
                bare_ratio=round(max(bare["on"]) / max(bare["off"]), 3))


def render(r: dict) -> str:
    out = [f"round {i}: CURVE off {p['off']['readings_per_s']:,} readings/s, on "
           f"{p['on']['readings_per_s']:,} readings/s: on/off {p['ratio']}"
           for i, p in enumerate(r["rounds"], 1)]
    cpu, total = r["median_cpu_seconds"], r["median_cpu_seconds_total"]
    out += [f"on/off over {len(r['rounds'])} rounds of {r['lines']:,} lines: readings/s median "
            f"of the rounds' ratios {r['median_ratio']}, best on / best off {r['best_ratio']}",
            f"CPU seconds of all services for those lines (median): off "
            f"{total['off']:.1f}, on {total['on']:.1f}"
            f" = {r['cpu_ratio']}; per service off / on: " + ", ".join(
                f"{s} {cpu['off'][s]:.2f} / {cpu['on'][s]:.2f}" for s in cpu["off"]),
            f"bare transport, 64 KB messages over TCP loopback (MB/s, 3 tries each): off "
            f"{r['bare_transport_mb_s']['off']}, on {r['bare_transport_mb_s']['on']}: best on / "
            f"best off {r['bare_ratio']}"]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one round of 200,000 lines")
    ap.add_argument("--rounds", type=int, help="off/on pairs (default 4; --quick: 1)")
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "curve.json"))
    args = ap.parse_args(argv)
    conns, ticks = 10, 4_000 if args.quick else 100_000
    rounds = args.rounds or (1 if args.quick else 4)
    print("bare transport ...", flush=True)
    bare: dict[str, list[float]] = {"off": [], "on": []}
    for _ in range(3):  # alternating, short: the best of each is the least disturbed
        for curve in (False, True):
            bare["on" if curve else "off"].append(round(ref_transport(curve, 1.0), 1))
    runs = []
    for i in range(rounds):
        pair = {}
        for curve in (False, True) if i % 2 == 0 else (True, False):
            print(f"round {i + 1}: CURVE {'on' if curve else 'off'} ...", flush=True)
            pair["on" if curve else "off"] = measure(curve, conns, ticks)
        pair["ratio"] = round(pair["on"]["readings_per_s"] / pair["off"]["readings_per_s"], 3)
        runs.append(pair)
    report = summarize({"machine": machine(), "quick": args.quick,
                        "lines": conns * ticks * 5, "rounds": runs,
                        "bare_transport_mb_s": bare})
    print(render(report))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
