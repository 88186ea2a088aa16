"""A short hostile run (bench/hostile.py) against a live stack: honest meters beside random
bytes, 10 MB lines, idle and slow connections beyond ingest.max_connections, connection floods
and garbage on the bus ports. Every service stays up under its memory cap, honest meters keep
at least half their rate, every honest line is stored exactly once and the counters add up."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.integration.stack import ROOT


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_short_hostile_run_leaves_everything_up_and_every_honest_line_stored(tmp_path):
    out = tmp_path / "hostile.json"
    run = subprocess.run(
        [sys.executable, "-m", "bench.hostile", "--minutes", "0.35", "--json", str(out),
         "--max-connections", "400", "--idle", "500", "--slow", "50", "--honest-rate", "10000"],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
        timeout=380)
    assert out.exists(), run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["checks"] == dict.fromkeys(report["checks"], True), run.stdout[-3000:]
    assert run.returncode == 0 and report["ok"]
    # the attack really happened, and each kind was met where it should be
    hostile, ingest = report["hostile"], report["counters"]["ingest"]
    broker = report["counters"]["broker"]
    assert hostile["max_open_connections"] > 400 and ingest["connections_refused"] > 0
    assert hostile["long_lines"] >= 1 and ingest["rejected.line_too_long"] >= 1
    assert hostile["bus_garbage_connections"] > 0
    assert broker["handshakes_failed.publish"] + broker["handshakes_failed.subscribe"] > 0
    assert report["counters"]["storage"]["lines_rejected"] > 0  # random bytes, slow lines
    for phase in ("baseline", "attack"):
        assert report["stored_once"][phase]["in_db"] == report[phase]["lines"] > 0
