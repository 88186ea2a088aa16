"""``wattflow export`` as a real process on a real database: CSV, JSON lines and the power log
give back exactly the stored rows (several chunks each), time arguments in the configured
zone, a progress bar when asked, and clear errors."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest
import yaml

from bench.dashboard import CIRCUITS, fill
from shared.db import open_database
from tests.integration.stack import ROOT
from tests.pg import PostgresServer

END_US = 1_767_225_600_000_000  # 2026-01-01 00:00 UTC


def filled(tmp_path_factory, url: str | None):
    """Ten minutes of 10 readings/s per meter with their power, and a config for it: in a
    SQLite file (``url`` None) or the PostgreSQL database at ``url``."""
    tmp = tmp_path_factory.mktemp("export")
    target = url or str(tmp / "w.db")
    fill(target, 600, 10, END_US)
    config = tmp / "config.yaml"
    config.write_text(yaml.safe_dump({"storage": {"url": url} if url else {"path": target},
                                      "runtime": {"run_dir": str(tmp / "run")},
                                      "dashboard": {"timezone": "Europe/Berlin"}}))
    db = open_database(url or f"sqlite:///{target}", writer=False)
    return config, db


@pytest.fixture(scope="module")
def stored_sqlite(tmp_path_factory):
    config, db = filled(tmp_path_factory, None)
    yield config, db
    db.close()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def stored(request, tmp_path_factory, postgres_server):
    """The data and config of ``filled``, on SQLite, then on a fresh database of the session's
    PostgreSQL server (skipped, with the reason, where none can run)."""
    if request.param == "sqlite":
        yield request.getfixturevalue("stored_sqlite")
        return
    if postgres_server is None:
        pytest.skip(PostgresServer.missing())
    url = postgres_server.create_database()
    config, db = filled(tmp_path_factory, url)
    yield config, db
    db.close()
    postgres_server.drop_database(url)


def export(config, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "services", "export", "--config", str(config),
                           *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def stored_power(db, circuits, t0, t1) -> list[tuple]:
    cols = db.power(circuits, t0, t1)
    return list(zip(*(cols[c].tolist() for c in ("circuit", "ts_us", "watts", "volts", "amps")),
                    strict=True))


T0, T1 = END_US - 400_000_000, END_US - 100_000_000  # 5 minutes inside the data
RANGE = ("--from", f"@{T0 // 1_000_000}", "--to", f"@{T1 // 1_000_000}")


def test_csv_of_power_is_the_stored_points(stored):
    config, db = stored
    out = export(config, *RANGE, "--power", "--chunk", "997").stdout
    rows = [(r["circuit"].encode(), int(r["ts_us"]), float(r["watts"]), float(r["volts"]),
             float(r["amps"])) for r in csv.DictReader(io.StringIO(out))]
    assert rows == stored_power(db, CIRCUITS, T0, T1) and len(rows) == 4 * 3001
    first = next(csv.DictReader(io.StringIO(out)))
    assert first["time"] == datetime.fromtimestamp(T0 / 1e6, UTC).strftime(
        "%Y-%m-%d %H:%M:%S.%f")


def test_jsonl_of_readings_is_the_stored_readings(stored, tmp_path):
    config, db = stored
    target = tmp_path / "r.jsonl"
    export(config, *RANGE, "--meter", "10.0.0.3", "10.0.0.1", "--format", "jsonl",
           "--chunk", "1000", "-o", str(target))
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    cols = db.readings(["10.0.0.3", "10.0.0.1"], T0, T1)
    assert [(r["meter"], r["ts_us"], r["value"]) for r in rows] == [
        (m.decode(), t, v) for m, t, v in zip(*(cols[c].tolist() for c in (
            "meter", "ts_us", "value")), strict=True)]
    assert len(rows) == 2 * 3001


def test_power_log_is_the_original_format_in_time_order(stored):
    config, db = stored
    out = export(config, *RANGE, "--power-log", "--circuit", "10.0.0.2", "10.0.0.5",
                 "--chunk", "500").stdout
    points = sorted(stored_power(db, ["10.0.0.2", "10.0.0.5"], T0, T1),
                    key=lambda r: (r[1], r[0] != b"10.0.0.2"))
    assert out.splitlines() == [
        f"{w!r}|{datetime.fromtimestamp(t // 1_000_000, UTC).strftime('%Y-%m-%d %H:%M:%S')}"
        f".{t % 1_000_000:06d}" for _, t, w, _, _ in points]


def test_times_without_a_zone_are_read_in_the_configured_zone(stored):
    config, db = stored
    start = datetime.fromtimestamp(T0 / 1e6, ZoneInfo("Europe/Berlin")).replace(tzinfo=None)
    out = export(config, "--from", start.isoformat(), "--to", f"@{T0 // 1_000_000 + 10}",
                 "--power", "--format", "jsonl").stdout
    rows = [json.loads(line) for line in out.splitlines()]
    assert min(r["ts_us"] for r in rows) == T0 and len(rows) == 4 * 101


def test_progress_bar_when_asked(stored):
    config, _ = stored
    done = export(config, *RANGE, "--power", "--progress", "--chunk", "2000")
    assert "100%" in done.stderr and "12,004 rows" in done.stderr, done.stderr[-2000:]
    quiet = export(config, *RANGE, "--power")  # stderr is no terminal here: no bar
    assert "%|" not in quiet.stderr


@pytest.mark.parametrize("args,message", [
    (("--from", "yesterday-ish"), "bad time"),
    (("--from", "1h", "--meter", "10.9.9.9"), "unknown meter '10.9.9.9'"),
    (("--from", "1h", "--circuit", "pump"), "unknown circuit 'pump'"),
    (("--from", "1h", "--meter", "10.0.0.1", "--power"), "--meter is for readings"),
])
def test_bad_arguments_say_what_is_wrong(stored_sqlite, args, message):
    done = export(stored_sqlite[0], *args, check=False)
    assert done.returncode == 2 and message in done.stderr, done.stderr


def test_no_database_yet_is_an_error_not_a_crash(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"storage": {"path": str(tmp_path / "none.db")}}))
    done = export(config, "--from", "1h", check=False)
    assert done.returncode == 1 and "no database" in done.stderr, done.stderr
