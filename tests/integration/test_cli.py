"""The commands people type: `wattflow up` with a taken port and with a crashing service, and
every long-running command stopped by SIGTERM as a container runtime would."""

from __future__ import annotations

import json
import select
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from services.supervisor import FIRST_PAUSE_S
from shared.service import EXIT_CANNOT_START
from tests.integration.lines import T0, V_METER, line
from tests.integration.stack import wait_for


@pytest.fixture
def taken_port():
    """A port some other program holds (listening, as a server would)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_up_fails_fast_naming_the_taken_port(make_stack, taken_port):
    stack = make_stack(ingest={"port": taken_port})
    out = subprocess.run(stack.wattflow("up"), env=stack.env, cwd=stack.tmp, timeout=60,
                         capture_output=True, text=True)
    assert out.returncode == 2, out.stdout + out.stderr
    text = out.stdout + out.stderr
    assert f"127.0.0.1:{taken_port}" in text
    assert "ingest.port" in text and "WATTFLOW_INGEST_PORT" in text
    assert not (stack.tmp / "data").exists()  # nothing was started


def test_service_that_cannot_bind_exits_once_with_the_reason(make_stack, taken_port):
    stack = make_stack(ingest={"port": taken_port})
    out = subprocess.run(stack.wattflow("ingest"), env=stack.env, cwd=stack.tmp, timeout=60,
                         capture_output=True, text=True)
    assert out.returncode == EXIT_CANNOT_START, out.stderr
    assert "ingest.port" in out.stderr and "address already in use" in out.stderr.lower()


def children(pid: int) -> dict[str, int]:
    """The services `wattflow up` runs: name -> pid (from /proc)."""
    found = {}
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        try:
            argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        except FileNotFoundError:
            continue
        if b"services" in argv:
            found[argv[argv.index(b"services") + 1].decode()] = int(child)
    return found


def test_up_restarts_a_crashed_service_and_status_counts_it(make_stack):
    stack = make_stack()
    up = subprocess.Popen(stack.wattflow("up"), env=stack.env, cwd=stack.tmp,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        stack.wait_ready()
        first = children(up.pid)["power"]
        started = time.monotonic()
        stack.procs.clear()  # `up` owns them; the stack only listens
        subprocess.run(["kill", "-9", str(first)], check=True)
        wait_for(lambda: stack.stats().get("power", {}).get("restarts") == 1, 30,
                 lambda: f"power restarted once: {stack.stats().get('power')}")
        assert children(up.pid)["power"] != first
        assert time.monotonic() - started >= FIRST_PAUSE_S  # it waited before restarting
        status = subprocess.run(stack.wattflow("status", "--json"), env=stack.env, timeout=30,
                                capture_output=True, text=True)
        services = json.loads(status.stdout)["services"].values()
        assert [s["restarts"] for s in services if s["service"] == "power"] == [1]
        table = subprocess.run(stack.wattflow("status"), env=stack.env, timeout=30,
                               capture_output=True, text=True).stdout
        assert "RESTARTS" in table.splitlines()[0]
    finally:
        up.send_signal(signal.SIGINT)
        out, _ = up.communicate(timeout=60)
    assert up.returncode == 0, out.decode()[-3000:]
    assert b"power exited with code -9 (crash 1): restarting in 1s" in out


@pytest.mark.parametrize("command", [
    ("simulate", "--rate", "20"),
    ("tap", "reading", "power"),
    ("status", "--watch"),
])
def test_long_running_commands_stop_on_sigterm(stack, command):
    proc = subprocess.Popen(stack.wattflow(*command, "--port", str(stack.port))
                            if command[0] == "simulate" else stack.wattflow(*command),
                            env=stack.env, cwd=stack.tmp, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        if command[0] == "simulate":
            wait_for(lambda: stack.count("readings") > 0, 30, "simulated readings stored")
        else:
            def printed() -> bool:
                if command[0] == "tap":  # something to print
                    stack.send(line(V_METER, T0, 100) + line("10.0.0.4", T0, 2))
                return bool(select.select([proc.stdout], [], [], 0.2)[0])
            wait_for(printed, 30, f"wattflow {command[0]} printing")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)  # promptly, even on a loaded machine
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err.decode()[-2000:]
    assert b"Traceback" not in err
