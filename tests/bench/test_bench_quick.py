"""The benchmark runs (in --quick mode) and its counts add up. No timing is asserted here."""

import json
import subprocess
import sys

from tests.integration.stack import ROOT


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
    # power for every eligible pair (the pairing rules replayed over the stored readings),
    # published, stored, and seen by the benchmark's own subscriber in the latency phase
    assert tp["power_in_db"] == tp["power_published"] == tp["power_expected"] > 0
    assert lat["power_points"] == lat["power_expected"] > 0
    assert report["power_in_db_total"] == tp["power_expected"] + lat["power_expected"]
    assert 0 <= lat["p50_ms"] <= lat["p95_ms"] <= lat["p99_ms"] <= lat["max_ms"]
    assert all(v > 0 for v in report["reference"].values())
    assert set(report["services"]) == {"broker", "ingest", "storage", "power", "plotter"}
    assert all(s["peak_rss_mb"] > 0 for s in report["services"].values())
    assert b"readings/s stored" in run.stdout
