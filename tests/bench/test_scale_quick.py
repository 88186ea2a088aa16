"""bench/scale.py runs (``./run-bench --scale --quick``): 1, 2 and 3 storage replicas on
SQLite and on PostgreSQL, every line stored exactly once in each configuration, on SQLite by
the one writer (the others stand by), on PostgreSQL by the replicas together. No timing is
asserted here."""

import json
import subprocess
import sys

import pytest

from tests.integration.stack import ROOT
from tests.pg import PostgresServer


@pytest.mark.timeout(600)
def test_scale_benchmark_stores_every_line_once_per_configuration(tmp_path):
    out = tmp_path / "scale.json"
    run = subprocess.run([sys.executable, "-m", "bench.run", "--scale", "--quick", "--json",
                          str(out)], cwd=ROOT, capture_output=True, timeout=500)
    assert run.returncode == 0, run.stderr.decode()[-3000:]
    report = json.loads(out.read_text())
    assert report["exact"]
    backends = ["sqlite"] + ([] if PostgresServer.missing() else ["postgresql"])
    assert [(r["backend"], r["replicas"]) for r in report["runs"]] == [
        (b, n) for n in (1, 2, 3) for b in backends]
    for r in report["runs"]:
        lines = r["lines"]
        assert lines == report["lines"] > 0
        assert r["lines_sent"] == r["readings_in_db"] == r["distinct_readings_in_db"] == lines
        replicas = r["storage"]
        assert len(replicas) == r["replicas"]
        assert sum(v["readings_stored"] for v in replicas.values()) == lines
        roles = sorted(v["role"] for v in replicas.values())
        if r["backend"] == "sqlite":
            assert roles == ["standby"] * (r["replicas"] - 1) + ["writer"]
            assert sorted(v["readings_stored"] for v in replicas.values())[-1] == lines
        else:
            assert roles == ["writer"] * r["replicas"]
            assert r["cpu_seconds"]["postgres_server"] > 0
            assert r["db_rows_vs_copy"] > 0
        # (a point corrected by a late reading is published again: published >= stored;
        # duplicates (a batch resent by ingest, skipped) may be counted on a busy machine)
        assert 0 < r["power_in_db"] <= r["power_published"] and r["power_expected"] > 0
        assert all(v >= 0 for v in r["cpu_seconds"].values() if v is not None)
    if "postgresql" in backends:
        p = report["postgres"]
        assert p["copy_binary_rows_per_s"] > 0 and p["storage_write_rows_per_s"] > 0
    assert "every line stored exactly once in every configuration: True" in run.stdout.decode()
