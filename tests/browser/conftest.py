"""Fixtures of the browser tests: a real stack with the dashboard and simulated meters, and a
real headless Chromium. Where Chromium or node is missing they skip, saying what to install,
except in CI (CI=true), where .ci/run installs them and a missing one is a failure."""

from __future__ import annotations

import math
import os
import subprocess
import time
import urllib.request

import pytest

from shared.parsing import format_us
from tests.browser.browser import Browser, missing
from tests.integration.stack import Stack, free_port, wait_for

TZ = "Asia/Kathmandu"  # UTC+5:45: a time axis aligned to whole UTC hours would show it
STALE_S = 3.0
SIMULATED = 4  # the simulator runs the first four meters; 10.0.0.5 sends a little, then stops


@pytest.fixture(scope="session")
def chromium_ready():
    why = missing()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"browser tests cannot run: {why}")
        pytest.skip(f"browser tests need: {why}")


def start_dashboard(stack: Stack) -> str:
    stack.start("dashboard")
    base = f"http://127.0.0.1:{stack.config['dashboard']['port']}"
    wait_for(lambda: _answers(base, stack), 60, lambda: f"the dashboard at {base} answers:\n"
             + stack.log("dashboard"))
    return base


def _answers(base: str, stack: Stack) -> bool:
    stack.check_alive()
    try:
        with urllib.request.urlopen(f"{base}/api/config", timeout=5) as resp:
            return resp.status == 200
    except OSError:
        return False


def make_stack(tmp_path, **dashboard) -> Stack:
    return Stack(tmp_path, {"dashboard": {"port": free_port(), "timezone": TZ,
                                          "stale_after_s": STALE_S, **dashboard}})


def close_stack(stack: Stack) -> None:
    if "dashboard" in stack.procs:
        stack.stop("dashboard")
    stack.close()


def backfill(stack: Stack, now_us: int, seconds: int = 270, hole: tuple = (150, 120)) -> None:
    """The simulated meters' last ``seconds`` (10 readings/s, slow waves) with no readings
    from ``hole[0]`` to ``hole[1]`` seconds ago: history with a gap, before the live data."""
    meters = [("10.0.0.1", 0, 110), ("10.0.0.2", 0, 0.5), ("10.0.0.3", 0.2, 1),
              ("10.0.0.4", 1, 5)][:SIMULATED]
    lines = []
    for k in range(seconds * 10):
        ago_s = seconds - k / 10
        if hole[1] < ago_s < hole[0]:
            continue
        ts = format_us(now_us - int(ago_s * 1e6)).encode()
        for i, (ip, lo, hi) in enumerate(meters):
            wave = 0.5 + 0.4 * math.sin(2 * math.pi * k / (900 + 170 * i) + i)
            lines.append(b"%s\t%s\t%.4f\n" % (ip.encode(), ts, lo + (hi - lo) * wave))
    stack.send(b"".join(lines))


@pytest.fixture(scope="module")
def live(tmp_path_factory, chromium_ready):
    """A stack with simulated meters (10 lines/s each, and their last four and a half minutes
    sent at the start, with a 30 s hole) and the dashboard; 10.0.0.5 has a few readings at
    the start and then none (stale)."""
    stack = make_stack(tmp_path_factory.mktemp("live"))
    try:
        stack.start()
        stack.wait_ready()
        backfill(stack, time.time_ns() // 1000)
        stack.procs["simulate"] = subprocess.Popen(
            [*stack.wattflow("simulate"), "--meters", str(SIMULATED), "--rate", "10"],
            env=stack.env, cwd=stack.tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        now = time.time_ns() // 1000
        stack.send(b"".join(b"10.0.0.5\t%s\t5.0\n" % format_us(now + k * 100_000).encode()
                            for k in range(5)))
        stack.base = start_dashboard(stack)
        wait_for(lambda: stack.count("power") > 50, 90, "power points stored")
        yield stack
    finally:
        close_stack(stack)


@pytest.fixture
def browser(chromium_ready):
    b = Browser(timezone="UTC")  # the browser's own zone differs from the dashboard's
    try:
        yield b
        errors = b.do("errors")
        assert not errors, f"the page logged errors: {errors}"
    finally:
        b.close()
