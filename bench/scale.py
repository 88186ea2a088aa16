"""How storage replicas scale: end-to-end readings/s with 1, 2 and 3 storage replicas, on
SQLite and on PostgreSQL, in one run.

    python -m bench.scale            # full run (a few minutes): 2,000,000 lines per configuration
    python -m bench.scale --quick    # 50,000 lines per configuration (the test suite runs this)
    ./run-bench --scale [--quick]    # the same

Each configuration is a fresh stack (every service a process, as bench/run.py's throughput
phase): broker, power, plotter, ingest and N storage replicas, the load generator a process of
its own sending flat out over 10 connections; the clock runs from its first byte until every
line is in the database and every power point power published is stored. On SQLite one replica
writes (it holds the database's lock) and the others stand by; on PostgreSQL (a private server,
tests/pg.py, default settings: fsync on) every replica writes a share. Per configuration: CPU
seconds of every storage replica and every other service over the measured span (from /proc,
bench/run.py's ``proc_usage``), of the load generator, and of the PostgreSQL server (every
process of it, exited backends included); counts: every line stored exactly once (rows, distinct
(meter, time) pairs, and the replicas' own counts add up to the lines). References on the same
PostgreSQL server, in the same run: bare binary COPY into the storage schema and storage's own
write called in-process (bench/run.py's ``ref_copy`` and ``pg_write``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

from bench.load import GROUP_SIZE
from bench.run import (
    BENCH_CONFIG,
    ROOT,
    expected_power,
    machine,
    pg_write,
    proc_usage,
    ref_copy,
    run_load,
)
from tests.integration.stack import SERVICES, Stack, wait_for

OTHERS = ("broker", "ingest", "power", "plotter")
SETTLE_S = 30.0  # after the clock: how long missing power points are waited for
CONNS = 10


def clk() -> int:
    return os.sysconf("SC_CLK_TCK")


def server_cpu(postmaster: int) -> float:
    """CPU seconds of a PostgreSQL server so far: the postmaster (with its exited, reaped
    children: backends of closed connections) and every live child process."""
    with open(f"/proc/{postmaster}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == postmaster:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / clk()


def storage_instances(stack: Stack) -> list[dict]:
    """The latest stats of every storage replica heard (the stack's services never stop
    during a measurement)."""
    stack.stats()
    return [s for s in stack.by_instance.values() if s["service"] == "storage"]


def stored_sum(stack: Stack, key: str) -> int:
    return sum(s["counters"].get(key, 0) for s in storage_instances(stack))


def ready(stack: Stack, replicas: int, all_write: bool) -> bool:
    """Every service reports; the replicas are there, the writers among them (one on SQLite,
    all on PostgreSQL) see a listener for ``ack`` (ingest) and ``reading`` (power)."""
    stack.check_alive()
    inst = stack.instances()
    services = {s["service"] for s in inst.values()}
    storages = [s for s in inst.values() if s["service"] == "storage"]
    writers = [s for s in storages if s["gauges"].get("role") == "writer"]
    return (services >= set(SERVICES) and len(storages) == replicas
            and len(writers) == (replicas if all_write else 1)
            and all({"ack", "reading"} <= set(s.get("subscribed", ())) for s in writers))


def all_through(stack: Stack, lines: int) -> bool:
    """Every line stored (the replicas' counts summed), power has seen every reading, and every
    power point power published is stored."""
    p = stack.counters("power")
    return (stored_sum(stack, "readings_stored") >= lines
            and p.get("readings_in", 0) >= lines
            and stored_sum(stack, "power_stored") >= p.get("power_published", 0))


DISTINCT_SQL = "SELECT count(*) FROM (SELECT DISTINCT meter_id, ts_us FROM readings) d"


def distinct_readings(stack: Stack, url: str | None) -> int:
    """Distinct (meter, time) pairs among the stored readings (every line of the load is one:
    equal to the lines when none is stored twice). On PostgreSQL with room to hash them in
    memory and no parallel workers: with the default work_mem and no statistics yet it plans
    for 40,000 groups, and the hash spills to disk (minutes on a busy machine)."""
    if url is None:
        return stack.query(DISTINCT_SQL)[0][0]
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET work_mem = '512MB'")
        conn.execute("SET max_parallel_workers_per_gather = 0")
        return conn.execute(DISTINCT_SQL).fetchone()[0]


def measure(tmp: Path, replicas: int, ticks: int, url: str | None = None,
            postmaster: int | None = None) -> dict:
    """One configuration on a fresh stack: ``replicas`` storage replicas on SQLite (``url``
    None) or on the PostgreSQL database ``url`` (its server's postmaster: ``postmaster``)."""
    lines = CONNS * ticks * GROUP_SIZE
    cfg = {k: dict(v) for k, v in BENCH_CONFIG.items()}
    if url:
        cfg["storage"]["url"] = url
    stack = Stack(tmp, cfg)
    storages = ["storage"] + [f"storage-{i}" for i in range(2, replicas + 1)]
    try:
        stack.start("broker", *storages, "power", "plotter", "ingest")
        wait_for(lambda: ready(stack, replicas, url is not None), 120,
                 lambda: f"{replicas} storage replicas ready: {sorted(stack.instances())}",
                 step=0.1)
        before = {n: proc_usage(p.pid)[0] for n, p in stack.procs.items()}
        srv0 = server_cpu(postmaster) if postmaster else None
        kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        load = run_load(stack.port, CONNS, ticks)
        wait_for(lambda: all_through(stack, lines), 600,
                 lambda: f"{lines} readings and their power stored: {stack.describe()}",
                 step=0.02)
        t_end = time.time()
        cpu = {n: round(proc_usage(p.pid)[0] - before[n], 2) for n, p in stack.procs.items()}
        srv1 = server_cpu(postmaster) if postmaster else None
        sent = json.loads(load.communicate(timeout=60)[0])
        kids1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # the load generator, reaped
        elapsed = t_end - sent["t_first_byte"]
        # who is who: the replicas' stats by pid
        by_pid = {s["pid"]: s for s in storage_instances(stack)}
        per_replica = {}
        for n in storages:
            s = by_pid.get(stack.procs[n].pid, {})
            c = s.get("counters", {})
            per_replica[n] = {"role": s.get("gauges", {}).get("role"), "cpu_s": cpu[n],
                              "readings_stored": c.get("readings_stored", 0),
                              "power_stored": c.get("power_stored", 0),
                              "transactions": c.get("transactions", 0),
                              "duplicates": c.get("duplicates", 0)}
        readings, power = stack.count("readings"), stack.count("power")
        # the points the as-of join gives over the stored readings; power's late work (answered
        # from storage) may still be adding some: given up to SETTLE_S more
        expected = sum(expected_power(stack, 1 << 62))
        settle_end = time.monotonic() + SETTLE_S
        settled = power
        while settled < expected and time.monotonic() < settle_end:
            time.sleep(0.5)  # polling the database with a deadline
            settled = stack.count("power")
        power_counters = stack.counters("power")
        distinct = distinct_readings(stack, url)
        published = stack.counters("power").get("power_published", 0)
        storage_cpu = sum(v["cpu_s"] for v in per_replica.values())
        return {
            "backend": "postgresql" if url else "sqlite", "replicas": replicas,
            "connections": CONNS, "lines": lines, "lines_sent": sent["lines"],
            "seconds": round(elapsed, 3), "readings_per_s": round(lines / elapsed),
            "accept_seconds": round(sent["t_all_sent"] - sent["t_first_byte"], 3),
            "readings_in_db": readings, "distinct_readings_in_db": distinct,
            "readings_stored_by_replicas": sum(v["readings_stored"]
                                              for v in per_replica.values()),
            "power_in_db": power, "power_published": published, "power_expected": expected,
            "power_in_db_settled": settled,
            "power_late_answered": power_counters.get("late_answered", 0),
            "power_catchup_chunks": power_counters.get("catchup_chunks", 0),
            "db_rows_per_s": round((readings + power) / elapsed),
            "storage": per_replica,
            "cpu_seconds": {"storage_total": round(storage_cpu, 2),
                            **{n: cpu[n] for n in OTHERS},
                            "load_generator": round(kids1.ru_utime + kids1.ru_stime
                                                    - kids0.ru_utime - kids0.ru_stime, 2),
                            "postgres_server": None if srv0 is None else round(srv1 - srv0, 2)},
        }
    finally:
        stack.close()


def per_reading_us(r: dict) -> dict:
    """CPU µs per reading of each part (what a bigger machine must supply per reading)."""
    c = r["cpu_seconds"]
    return {k: round(v / r["lines"] * 1e6, 2) for k, v in c.items() if v is not None}


def run(args) -> dict:
    from tests.pg import PostgresServer

    ticks = 1_000 if args.quick else 40_000  # x 5 lines x 10 connections: 50k or 2M lines
    ref_rows = 50_000 if args.quick else 1_000_000
    counts = [int(x) for x in args.replicas.split(",")]
    report: dict = {"machine": machine(), "quick": args.quick,
                    "load_average_start": os.getloadavg(), "lines": CONNS * ticks * GROUP_SIZE,
                    "runs": [], "postgres": None}
    backends = ["sqlite"]
    why = PostgresServer.missing()
    if why:
        print(f"PostgreSQL: skipped ({why})", flush=True)
        report["postgres_skipped"] = why
    else:
        backends.append("postgresql")
    server = None
    try:
        if "postgresql" in backends:
            server = PostgresServer(settings={}).start()
            report["postgres_settings"] = "server defaults (fsync on, synchronous_commit on)"
        # the configurations alternate between backends (drift on a shared machine hits both)
        for n in counts:
            for backend in backends:
                print(f"{backend}, {n} storage replica(s) ...", flush=True)
                with tempfile.TemporaryDirectory() as tmp:
                    if backend == "sqlite":
                        r = measure(Path(tmp), n, ticks)
                    else:
                        url = server.create_database()
                        try:
                            r = measure(Path(tmp), n, ticks, url, server.proc.pid)
                        finally:
                            server.drop_database(url)
                r["cpu_us_per_reading"] = per_reading_us(r)
                r["load_average"] = os.getloadavg()
                report["runs"].append(r)
        if server is not None:
            print("PostgreSQL references: bare binary COPY, storage's write in-process ...",
                  flush=True)
            admin = server.url()
            copies, writes = [], []
            for _ in range(1 if args.quick else 2):  # alternated; the best of each
                srv0 = server_cpu(server.proc.pid)
                copies.append(dict(ref_copy(admin, ref_rows),
                                   server_cpu_all_s=round(server_cpu(server.proc.pid) - srv0, 2)))
                writes.append(pg_write(admin, ref_rows))
            copy = max(c["rows_per_s"] for c in copies)
            write = max(w["rows_per_s"] for w in writes)
            report["postgres"] = {
                "rows": ref_rows, "batch_rows": 5000,
                "copy_binary_rows_per_s": round(copy), "storage_write_rows_per_s": round(write),
                "copy_binary_runs": [round(c["rows_per_s"]) for c in copies],
                "storage_write_runs": [round(w["rows_per_s"]) for w in writes],
                "copy_server_cpu_us_per_row": round(min(
                    c["server_cpu_all_s"] for c in copies) / ref_rows * 1e6, 2),
                "storage_write_vs_copy": round(write / copy, 3)}
            for r in report["runs"]:
                if r["backend"] == "postgresql":
                    r["db_rows_vs_copy"] = round(r["db_rows_per_s"] / copy, 3)
                    r["readings_vs_copy"] = round(r["readings_per_s"] / copy, 3)
    finally:
        if server is not None:
            server.stop()
    report["load_average_end"] = os.getloadavg()
    report["exact"] = all(r["readings_in_db"] == r["distinct_readings_in_db"] == r["lines"]
                          == r["lines_sent"] == r["readings_stored_by_replicas"]
                          for r in report["runs"])
    report["power_complete"] = all(r["power_in_db_settled"] == r["power_expected"]
                                   for r in report["runs"])
    return report


def render(r: dict) -> str:
    m = r["machine"]
    la = lambda x: " ".join(f"{v:.2f}" for v in x)  # noqa: E731
    out = [f"wattflow storage replicas ({'quick' if r['quick'] else 'full'}) on {m['cpus']} x "
           f"{m['cpu']}, Python {m['python']}, {m['when']}",
           f"{r['lines']:,} lines per configuration from {CONNS} connections (load generator"
           f" process, flat out); clock: first byte until every line and every power point is "
           f"stored. Load average (1/5/15 min) at start: {la(r['load_average_start'])}, at end:"
           f" {la(r['load_average_end'])}", ""]
    head = (f"{'backend':<11}{'repl':>4}{'readings/s':>12}{'s':>7}{'db rows/s':>11}"
            f"{'vs COPY':>8}  CPU s: {'storage (per replica)':<24}{'broker':>7}{'ingest':>7}"
            f"{'power':>7}{'plot':>6}{'pg srv':>7}{'load':>6}  load avg 1m")
    out.append(head)
    for x in r["runs"]:
        c = x["cpu_seconds"]
        per = "+".join(f"{v['cpu_s']:.1f}" for v in x["storage"].values())
        per = f"{c['storage_total']:.1f} ({per})" if x["replicas"] > 1 else f"{per}"
        pg = "" if c["postgres_server"] is None else f"{c['postgres_server']:.1f}"
        vs = f"{x['db_rows_vs_copy']:.3f}" if "db_rows_vs_copy" in x else ""
        out.append(f"{x['backend']:<11}{x['replicas']:>4}{x['readings_per_s']:>12,}"
                   f"{x['seconds']:>7.1f}{x['db_rows_per_s']:>11,}{vs:>8}  {'':7}{per:<24}"
                   f"{c['broker']:>7.1f}{c['ingest']:>7.1f}{c['power']:>7.1f}"
                   f"{c['plotter']:>6.1f}{pg:>7}{c['load_generator']:>6.1f}"
                   f"  {x['load_average'][0]:.2f}")
    out.append("")
    out.append("CPU µs per reading (storage all replicas / broker / ingest / power / plotter /"
               " pg server):")
    for x in r["runs"]:
        u = x["cpu_us_per_reading"]
        out.append(f"  {x['backend']:<11}{x['replicas']}: {u['storage_total']} / {u['broker']}"
                   f" / {u['ingest']} / {u['power']} / {u['plotter']}"
                   + (f" / {u['postgres_server']}" if "postgres_server" in u else ""))
    out.append("")
    out.append("who stored what (readings; role; duplicates skipped):")
    for x in r["runs"]:
        out.append(f"  {x['backend']:<11}{x['replicas']}: " + ", ".join(
            f"{n} {v['readings_stored']:,} ({v['role']}; {v['duplicates']})"
            for n, v in x["storage"].items())
                   + f"; in db {x['readings_in_db']:,} rows, {x['distinct_readings_in_db']:,}"
                   f" distinct; power points {x['power_in_db']:,} when the clock stopped,"
                   f" {x['power_in_db_settled']:,} after up to {SETTLE_S:.0f} s more, of "
                   f"{x['power_expected']:,} expected ({x['power_published']:,} published, "
                   f"late work {x['power_late_answered']:,})")
    p = r.get("postgres")
    if p:
        out += ["", f"PostgreSQL references on the same server ({p['rows']:,} readings, "
                    f"{p['batch_rows']:,} per COPY / batch, best of {len(p['copy_binary_runs'])}):"
                    f" bare binary COPY {p['copy_binary_rows_per_s']:,} rows/s "
                    f"(server CPU {p['copy_server_cpu_us_per_row']} µs/row), storage's write "
                    f"in-process {p['storage_write_rows_per_s']:,} rows/s "
                    f"= {p['storage_write_vs_copy']} of COPY"]
    elif r.get("postgres_skipped"):
        out += ["", f"PostgreSQL skipped: {r['postgres_skipped']}"]
    out.append(f"\nevery line stored exactly once in every configuration: {r['exact']}")
    out.append("every power point the stored readings give is stored in every configuration: "
               f"{r['power_complete']}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="50,000 lines per configuration")
    ap.add_argument("--replicas", default="1,2,3", help="storage replica counts (default 1,2,3)")
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "scale.json"))
    args = ap.parse_args(argv)
    start = time.monotonic()
    report = run(args)
    report["wall_seconds"] = round(time.monotonic() - start, 1)
    text = render(report)
    print(text)
    print(f"(whole run {report['wall_seconds']} s)")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"\nJSON: {args.json}")
    return 0 if report["exact"] else 1


if __name__ == "__main__":
    sys.exit(main())
