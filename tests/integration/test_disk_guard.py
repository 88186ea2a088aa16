"""Storage on a nearly full disk: it stops taking batches (ingest keeps them), says why in
`wattflow health storage` and `wattflow status`, and takes them again by itself when space
returns; every line is stored once. The database lives on a real small filesystem (tmpfs)."""

from __future__ import annotations

import contextlib
import os
import subprocess

import pytest

from tests.conftest import small_filesystem
from tests.integration.lines import RANGES, T0, in_range, line
from tests.integration.stack import Stack, wait_for

DISK_MB, MIN_FREE_MB = 64, 24


@pytest.fixture
def small_disk(tmp_path):
    with small_filesystem(tmp_path, DISK_MB) as mnt:
        yield mnt


def take_space(directory, leave_mb: float):
    """A file that leaves about ``leave_mb`` free on the filesystem of ``directory``."""
    st = os.statvfs(directory)
    size = st.f_bavail * st.f_frsize - int(leave_mb * (1 << 20))
    ballast = directory / "ballast"
    with open(ballast, "wb") as f, contextlib.suppress(OSError):
        chunk = b"\0" * (1 << 20)
        for _ in range(size >> 20):
            f.write(chunk)
    return ballast


def test_storage_pauses_on_a_nearly_full_disk_and_resumes_when_space_returns(tmp_path,
                                                                              small_disk):
    stack = Stack(tmp_path, {"storage": {"path": str(small_disk / "wattflow.db"),
                                         "min_free_mb": MIN_FREE_MB, "wal_max_mb": 8}})
    try:
        stack.start()
        stack.wait_ready()
        first = b"".join(line(m, T0 + k * 1000, in_range(m, k)) for k in range(200)
                         for m in RANGES)
        stack.send(first)
        wait_for(lambda: stack.settled(len(first.splitlines())), 60, stack.describe)

        ballast = take_space(small_disk, MIN_FREE_MB / 2)
        health = stack.wattflow("health", "storage")

        def says_paused() -> bool:
            done = subprocess.run(health, capture_output=True, text=True, env=stack.env)
            return done.returncode != 0 and "below storage.min_free_mb" in done.stderr

        wait_for(says_paused, 30, "`wattflow health storage` saying why it pauses")
        status = subprocess.run(stack.wattflow("status"), capture_output=True, text=True,
                                env=stack.env)
        assert any(row.startswith("! storage") and "below storage.min_free_mb" in row
                   for row in status.stdout.splitlines()), status

        second = b"".join(line(m, T0 + k * 1000, in_range(m, k)) for k in range(200, 2200)
                          for m in RANGES)
        stack.send(second)
        wait_for(lambda: stack.stats()["ingest"]["gauges"].get("unacked_lines", 0) > 0, 30,
                 "ingest holding the lines storage does not take")
        stored = stack.count("readings")
        assert stored == len(first.splitlines())  # nothing taken while paused
        stack.check_alive()

        ballast.unlink()
        total = len(first.splitlines()) + len(second.splitlines())
        wait_for(lambda: stack.settled(total), 90, stack.describe)
        assert stack.count("readings") == total
        assert stack.count("rejected") == 0
        assert stack.query("SELECT COUNT(*) FROM (SELECT DISTINCT meter, ts_us FROM"
                           " readings_view)") == [(total,)]
        wait_for(lambda: subprocess.run(health, capture_output=True,
                                        env=stack.env).returncode == 0,
                 30, "`wattflow health storage` fine again")
        assert "free disk space back" in stack.log("storage")
    finally:
        stack.close()
