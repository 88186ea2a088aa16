"""Power as a function of the stored readings alone: whatever the arrival order, lateness,
crashes and replicas, the stored power equals an as-of join computed here independently, in
SQL over the stored readings (window functions: each meter's latest reading at or before each
timestamp; the same SQL on SQLite and PostgreSQL), row for row. The tests of a read path run
with storage on SQLite and on PostgreSQL (power reads there, recompute writes there)."""

from __future__ import annotations

import random
import socket
import subprocess
import threading

import pytest

from tests.integration.lines import A_METERS, RANGES, SECOND, T0, V_METER, line
from tests.integration.stack import wait_for
from tests.pg import BOTH_BACKENDS

pytestmark = pytest.mark.timeout(600)
D_US = 500_000  # power.max_time_diff, the default
ASOF_SQL = """
WITH v AS (SELECT ts_us, max(value) AS val FROM readings WHERE meter_id = :v GROUP BY ts_us),
     a AS (SELECT ts_us, max(value) AS val FROM readings WHERE meter_id = :a GROUP BY ts_us),
     t AS (SELECT ts_us FROM v UNION SELECT ts_us FROM a),
     j AS (SELECT t.ts_us AS t, max(v.ts_us) OVER w AS vt, max(a.ts_us) OVER w AS at
           FROM t LEFT JOIN v ON v.ts_us = t.ts_us LEFT JOIN a ON a.ts_us = t.ts_us
           WINDOW w AS (ORDER BY t.ts_us ROWS UNBOUNDED PRECEDING))
SELECT j.t, v.val * a.val, v.val, a.val FROM j JOIN v ON v.ts_us = j.vt JOIN a ON a.ts_us = j.at
WHERE j.t - CASE WHEN j.vt < j.at THEN j.vt ELSE j.at END <= :d ORDER BY j.t
"""


def expected_power(stack) -> dict[str, list[tuple]]:
    ids = dict(stack.query("SELECT ip, id FROM meters"))
    out = {}
    for a_meter in A_METERS:  # the default circuits: the V meter with each A meter
        out[a_meter] = stack.query(ASOF_SQL.replace(":v", str(ids[V_METER]))
                                   .replace(":a", str(ids[a_meter])).replace(":d", str(D_US)))
    return out


def stored_power(stack) -> dict[str, list[tuple]]:
    rows = stack.query("SELECT circuit, ts_us, watts, volts, amps FROM power_view"
                       " ORDER BY circuit, ts_us")
    out = {a: [] for a in A_METERS}
    for circuit, *rest in rows:
        out.setdefault(circuit, []).append(tuple(rest))
    return out


def assert_power_is_the_asof_join(stack, timeout: float = 120) -> None:
    def same() -> bool:
        return stored_power(stack) == expected_power(stack)

    def differ() -> str:
        got, want = stored_power(stack), expected_power(stack)
        parts = []
        for c in want:
            mine = got.get(c, [])
            first = next((pair for pair in zip(mine, want[c], strict=False)
                          if pair[0] != pair[1]), None)
            parts.append(f"{c}: {len(mine)} stored / {len(want[c])} expected, first "
                         f"difference {first}")
        return "stored power == SQL as-of join: " + "; ".join(parts)

    wait_for(same, timeout, differ, step=0.5)
    assert sum(len(v) for v in expected_power(stack).values()) > 0


def readings(n_ticks: int, t0: int = T0, step_us: int = 1000, meters=RANGES, seed: int = 1):
    """(meter, ts, value) for ``n_ticks`` instants ``step_us`` apart, every meter at each, with
    a little jitter so V and A are not always simultaneous."""
    rng = random.Random(seed)
    out = []
    for k in range(n_ticks):
        for m in meters:
            lo, hi = RANGES[m]
            t = t0 + k * step_us + (rng.randrange(0, step_us // 2) if m != V_METER else 0)
            out.append((m, t, round(rng.uniform(lo, hi), 3)))
    return out


def send_over(stack, payloads: list[bytes]) -> None:
    """Each payload over a connection of its own, all at once."""
    def one(p: bytes) -> None:
        with socket.create_connection(("127.0.0.1", stack.port), timeout=60) as s:
            s.sendall(p)

    threads = [threading.Thread(target=one, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def as_bytes(rows) -> bytes:
    return b"".join(line(m, t, v) for m, t, v in rows)


@BOTH_BACKENDS
def test_shuffled_arrival_over_many_connections(stack):
    rows = readings(4000)
    rng = random.Random(7)
    rng.shuffle(rows)
    # ten connections, each carrying some meters' readings in bursts
    by_meter = {m: [r for r in rows if r[0] == m] for m in RANGES}
    payloads = [as_bytes(by_meter[m][k::2]) for m in RANGES for k in range(2)]
    send_over(stack, payloads)
    wait_for(lambda: stack.count("readings") == len(rows), 60, stack.describe)
    assert_power_is_the_asof_join(stack)


@BOTH_BACKENDS  # (late work answered from storage's readings)
def test_an_hour_of_one_meter_delivered_ten_minutes_late(make_stack):
    stack = make_stack(power={"lateness_s": 30})
    stack.start()
    stack.wait_ready()
    late_meter = "10.0.0.5"
    others = [m for m in RANGES if m != late_meter]
    hour = readings(3600, step_us=SECOND, meters=others, seed=2)  # one reading a second
    send_over(stack, [as_bytes(hour)])
    more = readings(600, t0=T0 + 3600 * SECOND, step_us=SECOND, meters=[V_METER], seed=3)
    send_over(stack, [as_bytes(more)])  # the others move on ten minutes
    wait_for(lambda: stack.count("readings") == len(hour) + len(more), 60, stack.describe)
    late = readings(3600, step_us=SECOND, meters=[late_meter], seed=4)
    send_over(stack, [as_bytes(late[:1800]), as_bytes(late[1800:])])  # then its hour, at once
    wait_for(lambda: stack.count("readings") == len(hour) + len(more) + len(late), 60,
             stack.describe)
    assert_power_is_the_asof_join(stack)
    assert stack.counters("power").get("late_answered", 0) > 0  # it took the storage path


@BOTH_BACKENDS  # (caught up from the stored checkpoints and readings)
def test_kill_9_of_power_mid_stream_is_caught_up(stack):
    rows = readings(6000, seed=5)
    chunks = [as_bytes(rows[k::6]) for k in range(6)]
    send_over(stack, chunks[:2])
    wait_for(lambda: stack.count("power") > 100, 60, stack.describe)
    stack.kill("power")
    send_over(stack, chunks[2:4])  # while power is down
    stack.start("power")
    send_over(stack, chunks[4:])
    wait_for(lambda: stack.count("readings") == len(rows), 60, stack.describe)
    assert_power_is_the_asof_join(stack)


def test_two_power_replicas_split_the_circuits_and_survive_a_kill(stack):
    stack.start("power-2")

    def split() -> bool:  # (rendezvous hashing: any split, 2/2 or 3/1 or 4/0, by the ids)
        owned = [s["gauges"].get("circuits", []) for s in stack.instances().values()
                 if s["service"] == "power"]
        return len(owned) == 2 and sorted(owned[0] + owned[1]) == sorted(A_METERS)

    wait_for(split, 60, lambda: f"the circuits split between the two: {stack.instances()}")
    rows = readings(6000, seed=6)
    send_over(stack, [as_bytes(rows[:12000])])
    victim = "power-2"
    stack.kill(victim)
    wait_for(lambda: [len(s["gauges"].get("circuits", [])) for s in stack.instances().values()
                      if s["service"] == "power"] == [4], 60, "the survivor took all four")
    send_over(stack, [as_bytes(rows[12000:])])
    wait_for(lambda: stack.count("readings") == len(rows), 60, stack.describe)
    assert_power_is_the_asof_join(stack)


@BOTH_BACKENDS  # (replace_power)
def test_recompute_rebuilds_a_range_after_a_config_change(stack):
    rows = readings(3000, seed=8)
    send_over(stack, [as_bytes(rows)])
    wait_for(lambda: stack.count("readings") == len(rows), 60, stack.describe)
    assert_power_is_the_asof_join(stack)
    stack.stop("power")
    # a narrower window, recomputed: fewer points, exactly the join with the new window
    stack.config["power"] = {"max_time_diff": 0.0002}
    stack.rewrite_config()
    out = subprocess.run(stack.wattflow("power", "recompute"), env=stack.env, cwd=stack.tmp,
                         timeout=120, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    global D_US
    old, D_US = D_US, 200
    try:
        assert_power_is_the_asof_join(stack, timeout=10)
    finally:
        D_US = old
