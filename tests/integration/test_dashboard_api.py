"""``wattflow dashboard`` as a real process over HTTP, without a browser: it waits for storage's
database and then answers from it, says clearly what is wrong with a request, bounds the
points per series whatever is asked, streams downloads, stops on SIGTERM, and names the key
when its port is taken."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
import yaml

from bench.dashboard import CIRCUITS, fill
from services.dashboard.history import bucket_count, energy_reference
from shared.db import open_database
from shared.service import EXIT_CANNOT_START
from tests.integration.stack import ROOT, free_port, wait_for
from tests.pg import BOTH_BACKENDS

END_US = 1_767_225_600_000_000  # 2026-01-01 00:00 UTC
SERIES = "&".join([f"circuit={c}" for c in CIRCUITS] + ["meter=10.0.0.1"])


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=60) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture
def dashboard(tmp_path, database):
    """A running ``wattflow dashboard`` on a database storage has not made yet: yields its
    address, the database (a SQLite file's path, or with ``BOTH_BACKENDS`` the URL of a fresh
    PostgreSQL database: ``fill`` takes either), the process and its config."""
    port = free_port()
    target = database or str(tmp_path / "w.db")
    storage = {"url": database} if database else {"path": target}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "storage": storage, "runtime": {"run_dir": str(tmp_path / "run")},
        "bus": {"publish": f"ipc://{tmp_path}/nobody"},
        "dashboard": {"port": port, "max_points": 200}}))
    log = open(tmp_path / "dashboard.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "services", "dashboard", "--config",
                             str(config)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None, (tmp_path / "dashboard.log").read_text()
        try:
            return get(f"{base}/api/config")[0] == 200
        except OSError:
            return False

    wait_for(up, 60, "the dashboard answers")
    try:
        yield base, target, proc, config
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(30)
        log.close()


@BOTH_BACKENDS
def test_it_waits_for_the_database_then_answers_from_it(dashboard):
    base, target, _, _ = dashboard
    status, body = get(f"{base}/api/now")
    assert status == 503 and "no data yet" in json.loads(body)["error"]
    assert get(f"{base}/")[0] == 200 and b"<canvas" in get(f"{base}/")[1]
    fill(target, 600, 10, END_US)  # storage makes it (here: the same interface)
    status, body = get(f"{base}/api/history?{SERIES}&from=@{END_US // 10**6 - 300}"
                       f"&to=@{END_US // 10**6}")
    assert status == 200, body
    answer = json.loads(body)
    assert set(answer["series"]) == {f"circuit:{c}" for c in CIRCUITS} | {"meter:10.0.0.1"}
    for s in answer["series"].values():
        assert 0 < len(s["t"]) <= 200 and sum(s["n"]) == 3000  # 10/s
    # the newest points, and energy over a window not on minutes (rollups, rows and holds)
    a, b = END_US - 299_000_000, END_US
    status, body = get(f"{base}/api/now?from=@{a // 10**6}&to=@{b // 10**6}")
    assert status == 200, body
    now = json.loads(body)
    last = END_US - 100_000  # (the fill's last instant)
    assert {c: p["ts_us"] for c, p in now["circuits"].items()} == dict.fromkeys(CIRCUITS, last)
    assert {m["ts_us"] for m in now["meters"].values()} == {last}
    db = open_database(target if "://" in target else f"sqlite:///{target}", writer=False)
    try:
        for c in CIRCUITS:
            p = db.power([c], a - 10_000_000, b)
            assert now["circuits"][c]["watts"] == p["watts"][-1]
            assert now["energy"]["window"]["wh"][c] == pytest.approx(
                energy_reference(p["ts_us"], p["watts"], a, b), rel=1e-9)
    finally:
        db.close()


@pytest.mark.parametrize("query,message", [
    ("from=someday", "bad time 'someday'"),
    ("from=@100&to=@50", "the range is empty"),
    ("circuit=pump", "unknown circuit 'pump'"),
    ("meter=10.0.0.9", "unknown meter '10.0.0.9'"),
    ("step=fast", "step: expected an integer"),
])
def test_a_bad_request_says_what_is_wrong(dashboard, query, message):
    base, target, _, _ = dashboard
    fill(target, 60, 1, END_US)
    status, body = get(f"{base}/api/history?{query}")
    assert status == 400 and message in json.loads(body)["error"]


@BOTH_BACKENDS
def test_points_per_series_stay_bounded_whatever_step_is_asked(dashboard):
    base, target, _, _ = dashboard
    fill(target, 1800, 10, END_US)
    t0, t1 = END_US - 1_800_000_000, END_US
    for step in (1, 1000, 1_000_000, 10**12):
        body = json.loads(get(f"{base}/api/history?{SERIES}&from=@{t0 // 10**6}"
                              f"&to=@{t1 // 10**6}&step={step}")[1])
        assert bucket_count(t0, t1, body["step_us"]) <= 200
        assert all(len(s["t"]) <= 200 for s in body["series"].values())


@BOTH_BACKENDS
def test_download_streams_the_stored_rows(dashboard):
    base, target, _, _ = dashboard
    fill(target, 120, 10, END_US)
    status, body = get(f"{base}/api/export?from=@{END_US // 10**6 - 60}&to=@{END_US // 10**6}"
                       f"&circuit=10.0.0.3&format=jsonl")
    assert status == 200
    rows = [json.loads(line) for line in body.decode().splitlines()]
    assert len(rows) == 600 and {r["circuit"] for r in rows} == {"10.0.0.3"}
    assert [r["ts_us"] for r in rows] == sorted(r["ts_us"] for r in rows)
    assert get(f"{base}/api/export?from=1h&format=xml")[0] == 400


def test_sigterm_stops_it_cleanly(dashboard):
    _, _, proc, _ = dashboard
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0


def test_a_taken_port_names_the_key(dashboard):
    _, _, _, config = dashboard  # (the running one has the port)
    done = subprocess.run([sys.executable, "-m", "services", "dashboard", "--config",
                           str(config)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == EXIT_CANNOT_START
    assert "dashboard.port" in done.stderr and "WATTFLOW_DASHBOARD_PORT" in done.stderr


def test_an_unreadable_database_is_a_503_with_its_reason_and_is_opened_again(dashboard):
    base, target, proc, _ = dashboard
    with open(target, "wb") as f:  # not a database (as a read-only mount can fail to open)
        f.write(b"this is not a SQLite database" * 200)
    status, body = get(f"{base}/api/now")
    assert status == 503 and "database unavailable" in json.loads(body)["error"], body
    assert proc.poll() is None
    os.unlink(target)
    fill(target, 60, 10, END_US)  # a good one in its place: answered from it
    status, body = get(f"{base}/api/now")
    assert status == 200, body
