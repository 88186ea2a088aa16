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
then CPU seconds and peak RSS of every service;
4. overload: a fresh stack offered twice the sustained rate, memory sampled: it stays flat
   (ingest stops reading its sockets at ``ingest.max_buffer_mb``) and every line is stored.
"""

from __future__ import annotations

import argparse
import contextlib
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

from bench.load import GROUP_SIZE, METERS, STEP_US, T0, make_payload
from shared import config, parsing, topics
from tests.integration.stack import SERVICES, Stack, wait_for

ROOT = Path(__file__).resolve().parents[1]
# the latency phase's readings start this much after the throughput phase's: all newer
LATENCY_T0 = T0 + 86_400 * 1_000_000
# the stack runs the default meters and circuits (V meter 10.0.0.1 with each A meter)
BENCH_CONFIG = {"runtime": {"stats_interval_s": 0.1}, "plotter": {"interval_s": 1.0},
                "storage": {"retention": {"readings_days": 0, "power_days": 0,
                                          "rejected_days": 0, "rollup_1m_days": 0}}}


def run_load(port: int, conns: int, ticks: int, rate: float | None = None,
             t0_us: int = T0) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "bench.load", "--port", str(port), "--connections", str(conns),
           "--ticks", str(ticks), "--t0-us", str(t0_us)]
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


def ref_executemany(rows: int, batch: int = 5000, per_statement: int = 1) -> float:
    """Rows/s into the storage schema's readings table, ``batch`` rows per transaction, by
    ``executemany`` of a one-row INSERT; or, with ``per_statement`` > 1, of an INSERT of that
    many rows (``VALUES (...), (...), ...``: what storage does)."""
    from shared.db.sqlite import SCHEMA

    sql = "INSERT INTO readings (meter_id, ts_us, value) VALUES " + ", ".join(
        ["(?, ?, ?)"] * per_statement)
    with tempfile.TemporaryDirectory() as tmp:
        conn = sqlite3.connect(Path(tmp) / "ref.db", isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(SCHEMA)
        # like the benchmark's data: the five meters, one tick of all five per millisecond
        data = [(i % GROUP_SIZE + 1, T0 + (i // GROUP_SIZE) * STEP_US, float(i % 97))
                for i in range(rows)]
        if per_statement > 1:
            flat = [x for row in data for x in row]
            step = 3 * per_statement
            data = [flat[k : k + step] for k in range(0, len(flat), step)]
            batch //= per_statement
        start = time.perf_counter()
        for k in range(0, len(data), batch):
            conn.execute("BEGIN")
            conn.executemany(sql, data[k : k + batch])
            conn.execute("COMMIT")
        rate = rows / (time.perf_counter() - start)
        conn.close()
    return rate


# ---- PostgreSQL (``--postgres URL``) ---------------------------------------------------------

def bench_rows(rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The benchmark's readings as columns (meter index, ts_us, value): the five meters, one
    tick of all five per millisecond, as in ``ref_executemany``."""
    i = np.arange(rows)
    return (i % GROUP_SIZE).astype(np.int64), T0 + (i // GROUP_SIZE) * STEP_US, \
        (i % 97).astype(np.float64)


@contextlib.contextmanager
def pg_database(admin_url: str):
    """A fresh database on the server ``admin_url`` reaches (whose user may create
    databases) with wattflow's schema and the partitions the benchmark's rows need: its
    conninfo; dropped afterwards."""
    import psycopg
    from psycopg.conninfo import make_conninfo

    from shared.db.postgres import PostgresDatabase

    name = f"wattflow_bench_{os.getpid()}_{time.monotonic_ns()}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_conninfo(admin_url, dbname=name)
    try:
        db = PostgresDatabase(url, [config.Meter(*m) for m in METERS])
        db.close()
        yield url
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def backend_cpu(conn) -> float | None:
    """CPU seconds of the server process serving ``conn`` so far (None: not on this host)."""
    try:
        return proc_usage(conn.info.backend_pid)[0]
    except OSError:
        return None


def _measure(conn, rows: int, run) -> dict:
    """Rows/s of ``run()``; the CPU seconds it took the server process serving ``conn`` and
    this process (per row: the server should be the bound)."""
    server0, client0 = backend_cpu(conn), time.process_time()
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    server1 = backend_cpu(conn)
    return {"rows_per_s": rows / seconds,
            "server_cpu_s": None if server0 is None else server1 - server0,
            "client_cpu_s": time.process_time() - client0}


def ref_copy(admin_url: str, rows: int, batch: int = 5000, write_row: bool = False) -> dict:
    """Bare binary COPY of the benchmark's readings into the storage schema's ``readings``
    (partitioned, indexed) on the server, ``batch`` rows per COPY, each COPY a transaction
    of its own (autocommit: no BEGIN or COMMIT to send), its payload made before the clock
    starts (the server's rate, not the client's); ``write_row``: psycopg's own ``write_row``
    per row instead (with ``set_types``). Rows/s and CPU seconds (``_measure``)."""
    import psycopg

    from shared.db.postgres import DAY_US, PostgresDatabase, copy_binary

    meter, ts, value = bench_rows(rows)
    with pg_database(admin_url) as url:
        db = PostgresDatabase(url, [config.Meter(*m) for m in METERS])
        db._ensure("readings", np.array([ts[0], ts[-1], ts[0] + DAY_US]))  # made beforehand
        ids = db.meter_ids[meter]
        db.close()
        spans = [(k, min(k + batch, rows)) for k in range(0, rows, batch)]
        payloads = [copy_binary([ids[a:b], ts[a:b], value[a:b]], ["int4", "int8", "float8"])
                    for a, b in spans]
        tuples = list(zip(ids.tolist(), ts.tolist(), value.tolist(), strict=True)) \
            if write_row else []
        sql = "COPY readings (meter_id, ts_us, value) FROM STDIN (FORMAT BINARY)"

        def run() -> None:
            for (a, b), payload in zip(spans, payloads, strict=True):
                with conn.cursor().copy(sql) as copy:
                    if write_row:
                        copy.set_types(["int4", "int8", "float8"])
                        for row in tuples[a:b]:
                            copy.write_row(row)
                    else:
                        copy.write(payload)

        with psycopg.connect(url, autocommit=True) as conn:
            return _measure(conn, rows, run)


def pg_write(admin_url: str, rows: int, batch: int = 5000, per_write: int = 1) -> dict:
    """``PostgresDatabase.write`` on the same readings in batches of ``batch`` rows as storage
    makes them (a key each, a base that raises the low mark, the per-minute and per-hour
    rollups upserted, totals), ``per_write`` batches per write (storage folds up to
    ``storage.batch_max`` when they queue up). Rows/s and CPU seconds (``_measure``)."""
    from shared.db import RawBatch
    from shared.db.postgres import PostgresDatabase

    meter, ts, value = bench_rows(rows)
    with pg_database(admin_url) as url:
        db = PostgresDatabase(url, [config.Meter(*m) for m in METERS])
        batches = [RawBatch("bench", seq, max(0, seq - 4), meter[k : k + batch],
                            ts[k : k + batch], value[k : k + batch])
                   for seq, k in enumerate(range(0, rows, batch))]

        def run() -> None:
            for k in range(0, len(batches), per_write):
                assert all(db.write(batches[k : k + per_write]))

        out = _measure(db.conn, rows, run)
        assert db.totals()["readings"] == rows
        db.close()
    return out


def run_postgres(url: str, rows: int, repeats: int = 3) -> dict:
    """The PostgreSQL measurements, alternated ``repeats`` times (the machine is shared):
    bare binary COPY, psycopg's write_row COPY, and storage's write. Rates: the best run of
    each; CPU per row (server process, client): the median run's."""
    names = ("copy_binary", "storage_write", "copy_write_row", "storage_write_10")
    runs: dict[str, list[dict]] = {k: [] for k in names}
    for _ in range(repeats):
        runs["copy_binary"].append(ref_copy(url, rows))
        runs["storage_write"].append(pg_write(url, rows))
        runs["copy_write_row"].append(ref_copy(url, rows, write_row=True))
        runs["storage_write_10"].append(pg_write(url, rows, per_write=10))
    best = {k: round(max(r["rows_per_s"] for r in v)) for k, v in runs.items()}

    def per_row_us(k: str, key: str) -> float | None:
        vals = [r[key] for r in runs[k] if r[key] is not None]
        return round(float(np.median(vals)) / rows * 1e6, 2) if vals else None

    return {"rows": rows, "batch_rows": 5000,
            "runs_rows_per_s": {k: [round(r["rows_per_s"]) for r in v] for k, v in runs.items()},
            "best_rows_per_s": best,
            "server_cpu_us_per_row": {k: per_row_us(k, "server_cpu_s") for k in names},
            "client_cpu_us_per_row": {k: per_row_us(k, "client_cpu_s") for k in names},
            "storage_write_vs_copy_binary": round(best["storage_write"] / best["copy_binary"], 3),
            "storage_write_10_vs_copy_binary": round(best["storage_write_10"]
                                                     / best["copy_binary"], 3),
            "storage_write_vs_copy_write_row": round(best["storage_write"]
                                                     / best["copy_write_row"], 3)}


def print_postgres(r: dict) -> None:
    b, srv, cli = r["best_rows_per_s"], r["server_cpu_us_per_row"], r["client_cpu_us_per_row"]
    print(f"\nPostgreSQL ({r['rows']:,} readings, {r['batch_rows']:,} per batch and COPY; rate:"
          f" best of {len(r['runs_rows_per_s']['copy_binary'])} alternated runs; CPU µs per row:"
          f" the median run's, server process / client):")
    for key, label in (("copy_binary", "bare binary COPY (payload made beforehand)"),
                       ("copy_write_row", "bare binary COPY, psycopg write_row"),
                       ("storage_write", "PostgresDatabase.write (storage's)"),
                       ("storage_write_10", "  the same, 10 batches per write")):
        print(f"  {label:<43} {b[key]:>10,} rows/s   CPU {srv[key]} / {cli[key]}")
    print(f"  storage's write = {r['storage_write_vs_copy_binary']:.3f} of bare binary COPY "
          f"({r['storage_write_vs_copy_write_row']:.3f} of write_row COPY); 10 batches per "
          f"write: {r['storage_write_10_vs_copy_binary']:.3f}")
    print("  every run (rows/s): " + "; ".join(f"{k} {v}"
                                             for k, v in r["runs_rows_per_s"].items()))


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


def expected_power(stack: Stack, split_us: int) -> tuple[int, int]:
    """Power points the as-of join gives over the stored readings: (before ``split_us``,
    from it on). Written out here on its own from the definition (README "Power"), independent
    of services/power: per meter one reading per timestamp (the highest value); for every
    timestamp t of a circuit's two meters, each meter's latest reading at or before t; a point
    when both exist and the older is at most max_time_diff (0.5 s) before t."""
    max_diff = 500_000
    ids = dict(stack.query("SELECT ip, id FROM meters"))
    counts = [0, 0]
    series = {}
    for ip, *_ in METERS:
        rows = np.array(stack.query("SELECT ts_us, max(value) FROM readings WHERE meter_id = ?"
                                    " GROUP BY ts_us ORDER BY ts_us", ids[ip]), np.float64)
        series[ip] = rows[:, 0].astype(np.int64) if len(rows) else np.empty(0, np.int64)
    v = series[METERS[0][0]]
    for a_ip, *_ in METERS[1:]:
        a = series[a_ip]
        t = np.union1d(v, a)
        i, j = np.searchsorted(v, t, "right") - 1, np.searchsorted(a, t, "right") - 1
        ok = (i >= 0) & (j >= 0)
        t, i, j = t[ok], i[ok], j[ok]
        point = t - np.minimum(v[i], a[j]) <= max_diff
        counts[0] += int((point & (t < split_us)).sum())
        counts[1] += int((point & (t >= split_us)).sum())
    return counts[0], counts[1]


def per_meter_ok(stack: Stack, t0_us: int, conns: int, ticks: int) -> bool:
    """Every meter's readings of a phase are found by meter and time range."""
    t1 = t0_us + (conns * ticks - 1) * STEP_US
    return all(stack.query("SELECT count(*) FROM readings_view WHERE meter = ? AND ts_us"
                           " BETWEEN ? AND ?", ip, t0_us, t1)[0][0] == conns * ticks
               for ip, *_ in METERS)


def all_through(stack: Stack, readings: int, power_before: int = 0) -> bool:
    """Storage stored ``readings`` readings, power has seen them all, and storage stored every
    power point power published (counters since start; the stack is fresh)."""
    s, p = stack.counters("storage"), stack.counters("power")
    return (s.get("readings_stored", 0) >= readings and p.get("readings_in", 0) >= readings
            and s.get("power_stored", 0) >= p.get("power_published", 0))


def throughput(stack: Stack, conns: int, ticks: int) -> dict:
    lines = conns * ticks * GROUP_SIZE
    before = {n: proc_usage(p.pid)[0] for n, p in stack.procs.items()}
    frames_before = stack.counters("plotter").get("frames", 0)
    load = run_load(stack.port, conns, ticks)
    wait_for(lambda: all_through(stack, lines), 600,
             lambda: f"{lines} readings and their power stored: {stack.describe()} power: "
                     f"{stack.stats().get('power')}", step=0.02)
    t_end = time.time()
    frames = stack.counters("plotter").get("frames", 0) - frames_before
    sent = json.loads(load.communicate(timeout=60)[0])
    elapsed = t_end - sent["t_first_byte"]
    cpu = {n: round(proc_usage(p.pid)[0] - before[n], 2) for n, p in stack.procs.items()}
    readings, power = stack.count("readings"), stack.count("power")
    return {"lines": lines, "lines_sent": sent["lines"], "connections": conns,
            "seconds": round(elapsed, 3), "readings_per_s": round(lines / elapsed),
            "readings_in_db": readings, "per_meter_ok": per_meter_ok(stack, T0, conns, ticks),
            "db_rows_per_s": round((readings + power) / elapsed),
            "power_published": stack.counters("power").get("power_published", 0),
            "power_in_db": power, "power_per_s": round(power / elapsed),
            "accept_seconds": round(sent["t_all_sent"] - sent["t_first_byte"], 3),
            # frames drawn while the run was on (stats lag by up to stats_interval_s)
            "plotter_frames": frames, "plotter_frames_per_s": round(frames / elapsed, 2),
            "cpu_seconds": cpu}


def latency(stack: Stack, conns: int, rate_total: float, seconds: float) -> dict:
    sub = stack.subscribe(topics.POWER)
    wait_for(lambda: stack.listening("power", "power"), 10, "bench subscribed to power")
    # where the time goes: each stage's send time minus the ingest receive time it carries
    stages_sub = stack.subscribe(topics.RAW, topics.READING)
    wait_for(lambda: stack.listening("raw", "ingest") and stack.listening("reading", "storage"),
             10, "bench subscribed to raw and reading")
    stage: dict[str, list[np.ndarray]] = {"ingest_sent": [], "storage_published": [],
                                          "power_published": []}
    per_conn = rate_total / conns
    ticks = int(per_conn * seconds / GROUP_SIZE)
    lines = conns * ticks * GROUP_SIZE
    readings_before = stack.counters("power").get("readings_in", 0)
    published_before = stack.counters("power").get("power_published", 0)
    frames_before = stack.counters("plotter").get("frames", 0)

    # Power messages are taken one at a time by a thread of their own, so each arrival time is
    # read as it arrives (the main loop below waits on stats and other topics).
    arrivals: list[tuple[float, object]] = []  # (arrival time, message)
    stop = threading.Event()

    def receive() -> None:
        while not stop.is_set():
            for msg in sub.recv_batch(50, 1):
                arrivals.append((time.time(), msg))

    receiver = threading.Thread(target=receive, name="power-receiver")
    receiver.start()
    load = run_load(stack.port, conns, ticks, rate=per_conn, t0_us=LATENCY_T0)
    timeline: list[tuple[float, int]] = []  # (time, plotter frames)
    deadline = time.monotonic() + seconds * 3 + 60
    try:
        while time.monotonic() < deadline:
            for msg in stages_sub.recv_batch(50, 10_000):
                key = "ingest_sent" if msg.topic == topics.RAW else "storage_published"
                stage[key].append(msg.t - np.asarray(msg.data["t_recv"], dtype=np.float64))
            p = stack.counters("power")
            timeline.append((time.time(), stack.counters("plotter").get("frames", 0)))
            got = sum(len(m.data["t_recv"]) for _, m in list(arrivals))
            if (p.get("readings_in", 0) - readings_before >= lines
                    and got >= p.get("power_published", 0) - published_before):
                break
    finally:
        stop.set()
        receiver.join()
    sent = json.loads(load.communicate(timeout=60)[0])
    lat = []
    for now, msg in arrivals:
        lat.append(now - msg.data["t_recv"])
        stage["power_published"].append(msg.t - msg.data["t_recv"])
    # distinct points received (a point computed again with a late reading comes again)
    got = len({(c, t) for _, m in arrivals
               for c, t in zip(m.data["circuit"].tolist(), m.data["ts_us"].tolist(),
                               strict=True)})
    frames = stack.counters("plotter").get("frames", 0) - frames_before
    # frames per second while power data flowed (the plotter draws only when data changed)
    fps, flow_s = 0.0, 0.0
    if len(arrivals) > 1:
        t0, t1 = arrivals[0][0], arrivals[-1][0]
        inside = [(t, f) for t, f in timeline if t0 <= t <= t1]
        if len(inside) > 1 and inside[-1][0] > inside[0][0]:
            flow_s = t1 - t0
            fps = (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])
    wait_for(lambda: all_through(stack, readings_before + lines), 600,  # (a slow stack: late)
             lambda: f"latency phase stored: {stack.describe()} power: "
                     f"{stack.stats().get('power')}")
    ms = np.concatenate(lat) * 1000 if lat else np.zeros(1)
    return {"offered_lines_per_s": rate_total, "connections": conns, "lines": lines,
            "lines_sent": sent["lines"], "power_points": got,
            "per_meter_ok": per_meter_ok(stack, LATENCY_T0, conns, ticks),
            "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p95_ms": round(float(np.percentile(ms, 95)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "max_ms": round(float(ms.max()), 2),
            "plotter_frames_per_s": round(fps, 2), "plotter_frames": frames,
            "seconds_with_data": round(flow_s, 2),
            # per stage, from ingest's receive time: p50 / p99 ms (raw: per chunk; reading and
            # power: per record)
            "stages_ms": {k: [round(float(np.percentile(np.concatenate(v) * 1000, q)), 2)
                              for q in (50, 99)] for k, v in stage.items() if v}}


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def overload(tmp: Path, rate_total: float, seconds: float, conns: int, cap_mb: float) -> dict:
    """A fresh stack whose ingest may hold ``cap_mb`` (``ingest.max_buffer_mb``), offered
    ``rate_total`` lines/s (twice the sustained rate) for ``seconds`` worth of lines. Every
    service's RSS is sampled while the lines go in: under overload ingest stops reading its
    sockets once it holds ``cap_mb`` (the load generator's sends then block, TCP
    backpressure), so memory stays flat instead of growing with the excess."""
    cfg = dict(BENCH_CONFIG, ingest={"max_buffer_mb": cap_mb})
    stack = Stack(tmp, cfg)
    try:
        stack.start()
        stack.wait_ready()
        per_conn = rate_total / conns
        ticks = max(1, int(per_conn * seconds / GROUP_SIZE))
        lines = conns * ticks * GROUP_SIZE
        load = run_load(stack.port, conns, ticks, rate=per_conn)
        samples: list[tuple[float, dict[str, int], int, int]] = []  # t, rss, buffered, frames
        deadline = time.monotonic() + seconds * 10 + 120
        while load.poll() is None and time.monotonic() < deadline:
            gauges = stack.stats().get("ingest", {}).get("gauges", {})
            samples.append((time.time(), {n: rss(p.pid) for n, p in stack.procs.items()},
                            gauges.get("buffered_bytes", 0),
                            stack.counters("plotter").get("frames", 0)))
            time.sleep(0.1)  # sampling period (the loop ends when the load generator does)
        sent = json.loads(load.communicate(timeout=60)[0])
        t0, t1 = sent["t_first_byte"], sent["t_all_sent"]
        wait_for(lambda: stack.counters("storage").get("readings_stored", 0) >= lines, 300,
                 lambda: f"overload lines stored: {stack.describe()}", step=0.05)
        drained = time.time() - t1
        inside = [s for s in samples if t0 <= s[0] <= t1]
        half = [s for s in inside if s[0] >= (t0 + t1) / 2]
        usage = {n: proc_usage(p.pid) for n, p in stack.procs.items()}
        ingest = stack.counters("ingest")
        frames_s = 0.0
        if len(inside) > 1 and inside[-1][0] > inside[0][0]:
            frames_s = (inside[-1][3] - inside[0][3]) / (inside[-1][0] - inside[0][0])
        return {
            "offered_lines_per_s": round(rate_total), "connections": conns, "lines": lines,
            "lines_sent": sent["lines"], "readings_in_db": stack.count("readings"),
            "max_buffer_mb": cap_mb, "send_seconds": round(t1 - t0, 2),
            "accepted_lines_per_s": round(lines / (t1 - t0)),
            "stored_seconds_after_last_byte": round(drained, 2),
            "ingest_held_max_mb": round(max((s[2] for s in inside), default=0) / 2**20, 1),
            "backpressure_pauses": ingest.get("backpressure_pauses", 0),
            "plotter_frames_per_s": round(frames_s, 2),
            # per service: RSS when the second half of the sending began, at its end, and the
            # peak over the whole run (MB)
            "rss_mb": {n: {"second_half_start": round(half[0][1][n] / 2**20, 1) if half else 0,
                           "end": round(inside[-1][1][n] / 2**20, 1) if inside else 0,
                           "peak": round(usage[n][1] / 2**20, 1)} for n in stack.procs},
        }
    finally:
        stack.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a small run (seconds)")
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "latest.json"))
    ap.add_argument("--soak", type=float, metavar="MINUTES",
                    help="instead: a soak of this many minutes (see bench/soak.py)")
    ap.add_argument("--rate", type=float, default=100_000,
                    help="with --soak: lines/s offered (default 100000)")
    ap.add_argument("--wal-max-mb", type=float, default=64,
                    help="with --soak: storage.wal_max_mb (default 64)")
    ap.add_argument("--postgres", metavar="URL",
                    help="instead: only the PostgreSQL measurements, on the server at URL (a user"
                         " who may create databases), or 'private' for a private server"
                         " (tests/pg.py, default settings)")
    ap.add_argument("--scale", action="store_true",
                    help="instead: 1, 2 and 3 storage replicas on SQLite and on PostgreSQL (a"
                         " private server; see bench/scale.py); with --quick, small")
    args = ap.parse_args(argv)
    if args.soak:
        return run_soak(args)
    if args.scale:
        return run_scale(args)
    if args.postgres:
        return run_postgres_only(args)
    conns, lat_conns = 10, 20
    ticks = 4_000 if args.quick else 100_000  # x5 lines x conns: 200k or 5M lines
    lat_rate, lat_s = (20_000, 2.0) if args.quick else (100_000, 10.0)
    report: dict = {"machine": machine(), "quick": args.quick}

    table = parsing.MeterTable([config.Meter(*m) for m in METERS])
    block = b"".join(make_payload(c, conns, ticks // 4) for c in range(conns))
    print("measuring references ...", flush=True)
    tcp = ref_tcp(conns, ticks)
    parse_fast, parse_strptime = ref_parse(block, table)
    ref_rows = 1_000_000 if not args.quick else 100_000
    insert = ref_executemany(ref_rows)
    insert_multi = ref_executemany(ref_rows, per_statement=1000)
    report["reference"] = {"tcp_lines_per_s": round(tcp), "parse_block_lines_per_s":
                           round(parse_fast), "strptime_lines_per_s": round(parse_strptime),
                           "executemany_rows_per_s": round(insert),
                           "multirow_insert_rows_per_s": round(insert_multi)}

    with tempfile.TemporaryDirectory() as tmp:
        stack = Stack(Path(tmp), BENCH_CONFIG)
        try:
            stack.start()
            stack.wait_ready()
            print("throughput ...", flush=True)
            report["throughput"] = throughput(stack, conns, ticks)
            print("latency ...", flush=True)
            report["latency"] = latency(stack, lat_conns, lat_rate, lat_s)
            tp, lat = report["throughput"], report["latency"]
            tp["power_expected"], lat["power_expected"] = expected_power(stack, LATENCY_T0)
            report["power_in_db_total"] = stack.count("power")
            report["services"] = {n: dict(zip(("cpu_s_total", "peak_rss_mb"), (
                round(u[0], 2), round(u[1] / 2**20, 1)), strict=True))
                for n, u in ((n, proc_usage(p.pid)) for n, p in stack.procs.items())}
        finally:
            stack.close()
        print("overload ...", flush=True)
        (Path(tmp) / "overload").mkdir()
        report["overload"] = overload(Path(tmp) / "overload",
                                      2 * report["throughput"]["readings_per_s"],
                                      2.0 if args.quick else 6.0, conns,
                                      8 if args.quick else 32)
    e2e = report["throughput"]["readings_per_s"]
    ref = report["reference"]
    report["ratios"] = {
        "vs_tcp": round(e2e / ref["tcp_lines_per_s"], 3),
        "vs_parse_block": round(e2e / ref["parse_block_lines_per_s"], 3),
        "vs_executemany": round(e2e / ref["executemany_rows_per_s"], 3),
        "db_rows_vs_executemany": round(report["throughput"]["db_rows_per_s"]
                                        / ref["executemany_rows_per_s"], 3),
        "db_rows_vs_multirow_insert": round(report["throughput"]["db_rows_per_s"]
                                            / ref["multirow_insert_rows_per_s"], 3),
        "vs_original_40k": round(e2e / 40_000, 2),
    }
    print_report(report)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"\nJSON: {args.json}")
    return 0


def run_soak(args) -> int:
    from bench.soak import print_soak, soak

    print(f"soak: {args.soak} min at {args.rate:,.0f} lines/s ...", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        report = {"machine": machine(), "soak": soak(Path(tmp), args.soak, args.rate,
                                                      args.wal_max_mb)}
    print_soak(report["soak"])
    out = Path(args.json).with_name("soak-latest.json") if args.json.endswith(
        "latest.json") else Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"\nJSON: {out}")
    return 0 if report["soak"]["exact"] else 1


def run_scale(args) -> int:
    from bench import scale

    out = Path(args.json).with_name("scale.json") if args.json.endswith(
        "latest.json") else Path(args.json)
    return scale.main((["--quick"] if args.quick else []) + ["--json", str(out)])


def run_postgres_only(args) -> int:
    rows = 200_000 if args.quick else 1_000_000
    print(f"PostgreSQL: {rows:,} readings ...", flush=True)
    with contextlib.ExitStack() as stack:
        url = args.postgres
        if url == "private":
            from tests.pg import PostgresServer

            url = stack.enter_context(PostgresServer(settings={})).url()
        report = {"machine": machine(), "postgres": run_postgres(url, rows)}
    print_postgres(report["postgres"])
    out = Path(args.json).with_name("postgres-latest.json") if args.json.endswith(
        "latest.json") else Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"\nJSON: {out}")
    return 0


def machine() -> dict:
    model = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                  if ln.startswith("model name")), "?")
    return {"cpus": os.cpu_count(), "cpu": model, "python": sys.version.split()[0],
            "when": datetime.now().isoformat(timespec="seconds")}


def print_report(r: dict) -> None:
    m, ref, tp, lat, ov = r["machine"], r["reference"], r["throughput"], r["latency"], r["overload"]
    print(f"\nwattflow benchmark ({'quick' if r['quick'] else 'full'}) on {m['cpus']} x "
          f"{m['cpu']}, Python {m['python']}")
    print(f"\nend to end: {tp['lines']:,} lines from {tp['connections']} connections in "
          f"{tp['seconds']} s = {tp['readings_per_s']:,} readings/s stored "
          f"({tp['readings_in_db']:,} in db; power {tp['power_in_db']:,} of "
          f"{tp['power_expected']:,} expected); ingest accepted all in {tp['accept_seconds']} s;"
          f" plotter {tp['plotter_frames_per_s']} frames/s")
    print(f"latency at {lat['offered_lines_per_s']:,} lines/s offered from {lat['connections']} "
          f"connections: p50 {lat['p50_ms']} ms, p95 {lat['p95_ms']} ms, p99 {lat['p99_ms']} ms,"
          f" max {lat['max_ms']} ms ({lat['power_points']:,} of {lat['power_expected']:,} power "
          f"points); plotter {lat['plotter_frames_per_s']} frames/s while data flowed "
          f"({lat['seconds_with_data']} s)")
    print("  from ingest's receive time to (p50 / p99 ms): " + ", ".join(
        f"{k.replace('_', ' ')} {v[0]} / {v[1]}" for k, v in lat["stages_ms"].items()))
    print(f"overload: {ov['offered_lines_per_s']:,} lines/s offered (2x) from "
          f"{ov['connections']} connections with ingest.max_buffer_mb {ov['max_buffer_mb']}: "
          f"accepted {ov['accepted_lines_per_s']:,} lines/s, ingest's buffer (lines it held, "
          f"sampled) at most {ov['ingest_held_max_mb']} MB; it paused reading "
          f"{ov['backpressure_pauses']} times;"
          f" all {ov['readings_in_db']:,} of {ov['lines']:,} stored "
          f"{ov['stored_seconds_after_last_byte']} s after the last byte; plotter "
          f"{ov['plotter_frames_per_s']} frames/s")
    print("  RSS MB (second half of the sending began / its end / peak): " + ", ".join(
        f"{n} {v['second_half_start']} / {v['end']} / {v['peak']}"
        for n, v in ov["rss_mb"].items()))
    print("\nreferences measured in this run:          rate/s     ours/ref")
    for key, label, ratio in (
            ("tcp_lines_per_s", "bare TCP line count", "vs_tcp"),
            ("parse_block_lines_per_s", "bare parse_block", "vs_parse_block"),
            ("strptime_lines_per_s", "strptime per line", None),
            ("executemany_rows_per_s", "bare executemany (same schema)", "vs_executemany"),
            ("multirow_insert_rows_per_s", "bare 1000-row INSERTs (same schema)", None)):
        rr = f"{r['ratios'][ratio]:>8.3f}" if ratio else ""
        print(f"  {label:<36} {ref[key]:>12,} {rr}")
    print(f"  {'original program (its README)':<36} {40_000:>12,} "
          f"{r['ratios']['vs_original_40k']:>8.2f}")
    print(f"  rows written by storage (readings + power): {tp['db_rows_per_s']:,}/s = "
          f"{r['ratios']['db_rows_vs_executemany']:.3f} of bare executemany, "
          f"{r['ratios']['db_rows_vs_multirow_insert']:.3f} of bare 1000-row INSERTs")
    print("\nper service:        CPU s (whole run)   peak RSS MB   CPU s (throughput phase)")
    for name in SERVICES:
        s = r["services"][name]
        print(f"  {name:<18} {s['cpu_s_total']:>10}   {s['peak_rss_mb']:>14}   "
              f"{tp['cpu_seconds'].get(name, 0):>10}")


if __name__ == "__main__":
    sys.exit(main())
