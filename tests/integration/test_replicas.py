"""Replicas that share the work exactly once: 2 ingest replicas on one port (SO_REUSEPORT) and
3 storage replicas on the work queue, under load, with a storage replica killed, one added,
and an ingest replica stopped with unacked batches. On SQLite one storage replica writes and
the others stand by (and take over); on PostgreSQL every storage replica writes, and each takes
a share of the work. Every valid line ends up stored once, every invalid one rejected once."""

from __future__ import annotations

import json
import signal
import subprocess
from collections import Counter

import pytest

from tests.integration.lines import Feeder
from tests.integration.stack import wait_for
from tests.pg import BOTH_BACKENDS


def stored(stack) -> Counter:
    return Counter(stack.query("SELECT meter, ts_us, value FROM readings_view"))


def ingests(stack) -> dict[str, dict]:
    return {src: s for src, s in stack.instances().items() if s["service"] == "ingest"}


def writers(stack) -> dict[str, dict]:
    return {src: s for src, s in stack.instances().items()
            if s["service"] == "storage" and s["gauges"].get("role") == "writer"}


@BOTH_BACKENDS
@pytest.mark.timeout(420)  # its own waits add up to more than the suite's 120 s
def test_two_ingest_three_storage_replicas_exactly_once(make_stack, database):
    every_replica_writes = database is not None  # PostgreSQL
    stack = make_stack()
    stack.start("broker", "power", "plotter", "storage", "storage-2", "storage-3", "ingest",
                "ingest-2")
    stack.wait_ready()
    wait_for(lambda: sum(s["service"] == "storage" for s in stack.instances().values()) == 3
             and sum(s["service"] == "ingest" for s in stack.instances().values()) == 2, 90,
             lambda: f"every replica reporting: {sorted(stack.instances())}")
    if every_replica_writes:  # PostgreSQL: all three write (once each has opened it)
        wait_for(lambda: len(writers(stack)) == 3, 30,
                 lambda: f"three writers: {sorted(writers(stack))}")
    else:
        assert len(writers(stack)) == 1  # SQLite: one writes, two stand by
    feeder = Feeder(stack.port, connections=120, ticks_per_conn=500, invalid_every=10,
                    pause_s=0.01, concurrent=False)  # 300,000 lines, a tenth invalid
    feeder.start()
    wait_for(lambda: feeder.progress() > 0.25, 120, "lines flowing")

    # kill -9 a storage replica that writes (on SQLite the one: a standby takes over)
    victim_src = next(iter(writers(stack)))
    victim = next(n for n in ("storage", "storage-2", "storage-3")
                  if stack.procs[n].pid == writers(stack)[victim_src]["pid"])
    stack.kill(victim)
    # the feeder waits while the replicas change (lines still in flight), so that it is not
    # done before the ingest part below however long the takeover takes on a loaded machine
    feeder.pause()
    wait_for(lambda: writers(stack) and victim_src not in writers(stack), 30,
             "a standby to take over (SQLite), the victim gone from the writers")
    stack.start("storage-4")  # a replica added mid-stream: reporting before the half-way mark
    wait_for(lambda: any(s["pid"] == stack.procs["storage-4"].pid and s["gauges"].get("role")
                         for s in stack.instances().values()), 60,
             "the added replica reporting with its role")
    assert feeder.progress() < 0.5, feeder.progress()
    feeder.resume()

    # an ingest replica stopped (kill -9) with unacked batches: storage held, lines sent to
    # both replicas, the feeder paused so nothing is on its way, then the kill; the other
    # replica adopts the journal and sends its batches
    wait_for(lambda: feeder.progress() > 0.5, 120, "more lines flowing")
    feeder.pause()
    storages = [n for n in stack.procs if n.startswith("storage")
                and stack.procs[n].poll() is None]
    for n in storages:
        stack.procs[n].send_signal(signal.SIGSTOP)
    try:
        feeder.resume()
        wait_for(lambda: len([s for s in ingests(stack).values()
                              if s["gauges"].get("unacked_lines", 0) > 0]) == 2, 60,
                 "both ingest replicas holding unacked lines")
        feeder.pause()
        wait_for(lambda: all(s["gauges"].get("connections") == 0
                             and s["gauges"].get("pending_lines") == 0
                             for s in ingests(stack).values()), 30, "nothing in flight")
        killed_ingest = next(src for src, s in ingests(stack).items()
                             if s["pid"] == stack.procs["ingest-2"].pid)
        stack.kill("ingest-2")
    finally:
        for n in storages:
            stack.procs[n].send_signal(signal.SIGCONT)
    feeder.resume()

    wait_for(feeder.done, 180, "the feeder to send everything")
    wait_for(lambda: stack.count("readings") + stack.count("rejected") >= feeder.lines, 180,
             lambda: f"{feeder.lines} lines in: {stack.describe()}")
    wait_for(lambda: not list((stack.tmp / "data" / "journal").glob("*/*.batch")), 60,
             "every journal emptied (adopted batches acked)")
    assert stored(stack) == Counter(feeder.expected)
    assert stack.count("rejected") == feeder.invalid
    assert stack.counters("ingest").get("streams_adopted", 0) >= 1

    status = subprocess.run(stack.wattflow("status", "--json"), env=stack.env, timeout=30,
                            capture_output=True, text=True)
    report = json.loads(status.stdout)
    storages = [src for src, s in report["services"].items() if s["service"] == "storage"]
    roles = sorted(report["services"][src]["gauges"].get("role") for src in storages)
    if every_replica_writes:  # each took a share of the work
        assert roles == ["writer"] * 3
        assert all(report["shares"].get(src, 0) > 0 for src in storages), report["shares"]
    else:
        assert roles == ["standby", "standby", "writer"]
    # the killed ones are named (a live one that reported late on a loaded machine may be too)
    assert {victim_src, killed_ingest} <= set(report["silent_instances"])
