"""The benchmark runs (in --quick mode) and its counts add up. No timing is asserted here."""

import json
import subprocess
import sys

import pytest

from bench.load import METERS, STEP_US, T0, make_payload
from shared.parsing import format_us
from tests.integration.stack import ROOT


def payload_line_by_line(conn: int, conns: int, ticks: int, t0_us: int) -> bytes:
    lines = []
    for k in range(ticks):
        g = k * conns + conn
        stamp = format_us(t0_us + g * STEP_US).encode()
        for i, (ip, _, lo, hi) in enumerate(METERS):
            value = lo + (hi - lo) * (((g * 7 + i * 13) % 100) / 100)
            lines.append(b"%s\t%s\t%.3f\n" % (ip.encode(), stamp, value))
    return b"".join(lines)


@pytest.mark.parametrize("conn,conns,ticks,t0_us", [(0, 1, 1, T0), (3, 10, 1000, T0),
                                                    (19, 20, 777, T0 + 86_400_123_456)])
def test_load_payload_is_the_documented_lines(conn, conns, ticks, t0_us):
    assert make_payload(conn, conns, ticks, t0_us) == payload_line_by_line(conn, conns, ticks,
                                                                           t0_us)


@pytest.mark.timeout(900)
def test_quick_benchmark_reports_consistent_counts(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "-m", "bench.run", "--quick", "--json", str(out)],
                         cwd=ROOT, capture_output=True, timeout=600)
    assert run.returncode == 0, run.stderr.decode()[-3000:]
    report = json.loads(out.read_text())
    tp, lat = report["throughput"], report["latency"]
    # every line sent is stored, and found by meter and time
    assert tp["lines_sent"] == tp["readings_in_db"] == tp["lines"] > 0
    assert lat["lines_sent"] == lat["lines"] > 0
    assert tp["per_meter_ok"] and lat["per_meter_ok"]
    # power: every point of the as-of join over the stored readings (computed by the bench on
    # its own) is stored, published (a point corrected by a late reading is published again),
    # and seen by the benchmark's own subscriber in the latency phase
    assert tp["power_in_db"] == tp["power_expected"] > 0
    assert tp["power_published"] >= tp["power_expected"]
    assert lat["power_points"] == lat["power_expected"] > 0
    assert report["power_in_db_total"] == tp["power_expected"] + lat["power_expected"]
    assert 0 <= lat["p50_ms"] <= lat["p95_ms"] <= lat["p99_ms"] <= lat["max_ms"]
    assert all(v > 0 for v in report["reference"].values())
    assert set(report["services"]) == {"broker", "ingest", "storage", "power", "plotter"}
    assert all(s["peak_rss_mb"] > 0 for s in report["services"].values())
    # overload: everything offered is stored; what ingest holds stays within its cap plus one
    # read (64 KiB) per connection, the backpressure bound
    ov = report["overload"]
    assert ov["lines_sent"] == ov["readings_in_db"] == ov["lines"] > 0
    assert 0 < ov["ingest_held_max_mb"] <= ov["max_buffer_mb"] + ov["connections"] * 64 / 1024
    assert all(v["peak"] > 0 for v in ov["rss_mb"].values())
    assert b"readings/s stored" in run.stdout
