"""bench/curve.py runs (--quick): the same lines stored with CURVE off and on, and on really
means CURVE (the broker authenticated the services). No timing is asserted here."""

import json
import subprocess
import sys

import pytest

from tests.integration.stack import ROOT


@pytest.mark.timeout(900)
def test_curve_benchmark_stores_every_line_both_ways(tmp_path):
    out = tmp_path / "curve.json"
    run = subprocess.run([sys.executable, "-m", "bench.curve", "--quick", "--json", str(out)],
                         cwd=ROOT, capture_output=True, timeout=600)
    assert run.returncode == 0, run.stderr.decode()[-3000:]
    report = json.loads(out.read_text())
    (pair,) = report["rounds"]
    for mode in ("off", "on"):
        r = pair[mode]
        assert r["lines_sent"] == r["readings_in_db"] == r["lines"] == report["lines"] > 0
        # (a point corrected by a late reading is published again: published >= stored)
        assert r["per_meter_ok"] and 0 < r["power_in_db"] <= r["power_published"]
        assert r["power_in_db"] == pair["off"]["power_in_db"]  # the same points both ways
    assert pair["on"]["broker_counters"]["auth_ok.publish"] >= 5
    assert pair["on"]["broker_counters"]["auth_refused.publish"] == 0
    assert "auth_ok.publish" not in pair["off"]["broker_counters"]
    assert pair["ratio"] > 0
