"""The whole pipeline with real processes: TCP in, SQLite, rejected, power, PNG, tap."""

from __future__ import annotations

import json
import random
import signal
import socket
import subprocess
import sys
import threading
from collections import Counter

import pytest

from shared import topics
from tests.integration.lines import A_METERS, RANGES, SECOND, T0, V_METER, in_range, line
from tests.integration.stack import ROOT, drain, wait_for
from tests.pg import BOTH_BACKENDS

METERS = list(RANGES)


def send_concurrently(port: int, payloads: list[bytes], seed: int = 1) -> None:
    """One connection per payload, all at once, each written in random-sized pieces."""
    errors: list[BaseException] = []

    def client(payload: bytes, rng: random.Random) -> None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                pos = 0
                while pos < len(payload):  # split anywhere, mid-line too
                    step = rng.randrange(1, 4096)
                    sock.sendall(payload[pos : pos + step])
                    pos += step
        except OSError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(p, random.Random(seed + i)))
               for i, p in enumerate(payloads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors


@BOTH_BACKENDS
def test_concurrent_meters_every_valid_line_stored_exactly_once(stack):
    expected: Counter = Counter()
    payloads = []
    for c in range(8):
        parts = []
        for i in range(600):
            meter = METERS[(c + i) % len(METERS)]
            ts = T0 + (c * 10_000 + i) * 1000
            value = in_range(meter, c * 600 + i)
            parts.append(line(meter, ts, value))
            expected[(meter, ts, value)] += 1
        parts.insert(100, line(METERS[0], T0, 1.0).replace(b"\n", b"\r\n"))  # CRLF counts too
        expected[(METERS[0], T0, 1.0)] += 1
        payloads.append(b"".join(parts))
    send_concurrently(stack.port, payloads)
    total = sum(expected.values())
    wait_for(lambda: stack.settled(total), 30, f"{total} lines settled")
    rows = stack.query("SELECT meter, ts_us, value FROM readings_view")
    assert Counter(rows) == expected
    assert stack.count("rejected") == 0


BAD = [
    (b"", "malformed"),
    (b"10.0.0.1\t2024.04.27 12:00:00.000000", "malformed"),
    (b"10.0.0.1\t2024.04.27 12:00:00.000000\t1\textra", "malformed"),
    (b"10.0.0.1\t2024.02.30 12:00:00.000000\t1", "bad_timestamp"),
    (b"10.0.0.1\t27.04.2024 12:00:00.000000\t1", "bad_timestamp"),
    (b"10.0.0.1\t2024.04.27 12:00:00.000000\tNaN", "bad_value"),
    (b"10.0.0.1\t2024.04.27 12:00:00.000000\tinf", "bad_value"),
    (b"10.0.0.1\t2024.04.27 12:00:00.000000\tabc", "bad_value"),
    (b"10.9.9.9\t2024.04.27 12:00:00.000000\t1", "unknown_meter"),
    (b"10.0.0.2\t2024.04.27 12:00:00.000000\t0.3 V", "wrong_unit"),
    (b"10.0.0.1\t2024.04.27 12:00:00.000000\t110.000001", "out_of_range"),
    (b"10.0.0.3\t2024.04.27 12:00:00.000000\t0.19", "out_of_range"),
    (b"10.0.0.1\t2024.04.27 12:00:00.000000\t\xff\xfe", "bad_encoding"),
]


def test_invalid_lines_rejected_with_reason_and_connection_stays_usable(stack):
    rejected_sub = stack.subscribe(topics.REJECTED)
    wait_for(lambda: stack.listening("rejected", "ingest", "storage"), 10, "our subscription")
    long_line = b"10.0.0.1\t2024.04.27 12:00:00.000000\t" + b"1" * 5000
    good = [line("10.0.0.1", T0 + k, 100) for k in range(3)]
    payload = (good[0] + b"\n".join(b for b, _ in BAD) + b"\n" + long_line + b"\n" + good[1]
               + long_line * 2 + b"\n" + good[2])
    stack.send(payload)
    got: list[tuple[bytes, str, str]] = []

    def all_rejects() -> bool:
        for msg in drain(rejected_sub, 50):
            got.extend(zip(msg.data["line"], msg.data["reason"], msg.data["message"],
                           strict=True))
        return len(got) >= len(BAD) + 2

    wait_for(all_rejects, 20, "every bad line on `rejected`")
    assert len(got) == len(BAD) + 2
    seen = {ln: (reason, message) for ln, reason, message in got}
    for bad, reason in BAD:
        assert seen[bad][0] == reason, (bad, seen[bad])
        assert seen[bad][1]  # a sentence for people
    too_long = [(ln, r) for ln, r, _ in got if r == "line_too_long"]
    assert len(too_long) == 2 and all(long_line.startswith(ln) for ln, _ in too_long)
    wait_for(lambda: stack.settled(3 + len(BAD) + 2), 20, "all lines settled")
    assert stack.count("readings") == 3
    stored_reasons = Counter(r for (r,) in stack.query("SELECT reason FROM rejected"))
    assert stored_reasons == Counter(reason for _, reason in BAD) + Counter(line_too_long=2)


def test_power_pairs_within_max_time_diff_only(stack):
    # one connection keeps the order: V first, then the A meters, tick by tick 2 s apart
    expected = set()
    parts = []
    for k in range(24):
        t_v = T0 + k * 2 * SECOND
        volts = in_range(V_METER, k)
        parts.append(line(V_METER, t_v, volts))
        offset = {0: SECOND // 2, 1: SECOND // 2 + 1}.get(k % 4, SECOND // 10)
        for j, meter in enumerate(A_METERS):
            amps = in_range(meter, k * 4 + j)
            parts.append(line(meter, t_v + offset, amps))
            if offset <= SECOND // 2:
                expected.add((meter, t_v + offset, volts, amps))
    stack.send(b"".join(parts))
    wait_for(lambda: stack.settled(len(parts)), 20, "lines settled")
    wait_for(lambda: stack.count("power") >= len(expected), 20,
             f"{len(expected)} power rows (have {stack.count('power')})")
    rows = stack.query("SELECT circuit, ts_us, volts, amps, watts, v_meter, a_meter"
                       " FROM power_view")
    assert len(rows) == len(expected)
    assert {(c, ts, v, a) for c, ts, v, a, _, _, _ in rows} == expected
    for circuit, _, volts, amps, watts, v_meter, a_meter in rows:
        assert watts == pytest.approx(volts * amps, rel=1e-12)
        assert (v_meter, a_meter) == (V_METER, circuit)


def test_original_demo_lines_store_all_and_power_for_every_current_meter(stack):
    demo = (
        b"10.0.0.1\t2024.04.27 14:23:55.123456\t100.5\n"
        b"10.0.0.2\t2024.04.27 14:23:55.223456\t0.25\n"
        b"10.0.0.3\t2024.04.27 14:23:55.323456\t0.75\n"
        b"10.0.0.4\t2024.04.27 14:23:55.423456\t2.5\n"
        b"10.0.0.5\t2024.04.27 14:23:55.523456\t7.5\n"
    )
    stack.send(demo)
    wait_for(lambda: stack.count("power") == 4, 20, "4 power rows")
    assert stack.count("readings") == 5
    rows = dict(stack.query("SELECT circuit, watts FROM power_view"))
    assert rows == pytest.approx({"10.0.0.2": 25.125, "10.0.0.3": 75.375, "10.0.0.4": 251.25,
                                  "10.0.0.5": 753.75})


def test_png_chart_appears(stack):
    stack.send(b"".join(line(V_METER, T0 + k * SECOND, 100) + line("10.0.0.4", T0 + k * SECOND, 2)
                        for k in range(20)))
    png = wait_for(lambda: stack.png_path.exists() and stack.png_path, 30, "plots/power.png")
    import matplotlib.image

    image = matplotlib.image.imread(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert image.shape[0] > 300 and image.shape[1] > 500
    assert not list(png.parent.glob(".*.tmp"))  # written beside, then renamed


def test_a_restarted_plotter_draws_the_stored_history_at_once(stack):
    stack.send(b"".join(line(V_METER, T0 + k * SECOND, 100) + line("10.0.0.4", T0 + k * SECOND, 2)
                        for k in range(20)))
    wait_for(lambda: stack.count("power") == 20, 30, "20 power points stored")
    assert stack.stop("plotter") == {"plotter": 0}
    stack.png_path.unlink(missing_ok=True)
    stack.start("plotter")  # nothing is sent from now on: what it draws comes from the database
    wait_for(lambda: "history: 20 power points" in stack.log("plotter"), 30,
             lambda: "the plotter reading history: " + stack.log("plotter")[-2000:])
    wait_for(lambda: stack.counters("plotter").get("frames", 0) >= 1, 30, "a frame drawn")
    assert stack.png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tap_prints_power_as_json(stack):
    tap = subprocess.Popen(stack.wattflow("tap", "power", "--count", "1", "--timeout", "30"),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=stack.env)
    k = 0

    def tap_done() -> bool:  # keep producing power until the tap (subscribing) has printed one
        nonlocal k
        k += 1
        t = T0 + k * 2 * SECOND
        stack.send(line(V_METER, t, 100) + line("10.0.0.4", t, 2))
        try:
            tap.wait(0.2)
        except subprocess.TimeoutExpired:
            return False
        return True

    wait_for(tap_done, 30, "tap to print a power message")
    out, err = tap.communicate(timeout=5)
    assert tap.returncode == 0, err
    msg = json.loads(out.decode().splitlines()[0])
    assert msg["topic"] == "power" and msg["src"].startswith("power-")
    assert msg["data"]["circuit"][0] == "10.0.0.4"
    assert msg["data"]["watts"][0] == pytest.approx(200.0)
    assert msg["data"]["volts"][0] == 100 and msg["data"]["amps"][0] == 2


def test_status_json_lists_every_service(stack):
    out = subprocess.run(stack.wattflow("status", "--json"), capture_output=True, env=stack.env,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["silent"] == []
    assert {s["service"] for s in report["services"].values()} >= {"ingest", "storage", "power",
                                                                   "plotter", "broker"}


def test_sigterm_flushes_in_flight_lines(stack):
    n = 5000
    stack.send(b"".join(line(METERS[i % 5], T0 + i, in_range(METERS[i % 5], i)) for i in range(n)))
    codes = stack.stop("ingest")
    assert codes["ingest"] == 0
    wait_for(lambda: stack.count("readings") == n, 20, f"{n} readings stored")
    codes = stack.stop("storage", "power", "plotter")
    assert codes == {"storage": 0, "power": 0, "plotter": 0}
    assert stack.count("readings") == n


def test_bad_config_stops_with_message_naming_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("ingest:\n  port: seventy\n")
    out = subprocess.run([sys.executable, "-m", "services", "ingest", "--config", str(bad)],
                         capture_output=True, timeout=30, cwd=ROOT)
    assert out.returncode == 2
    assert b"ingest.port" in out.stderr and b"seventy" in out.stderr


def test_wattflow_up_with_simulated_meters(make_stack):
    stack = make_stack()
    up = subprocess.Popen(stack.wattflow("up", "--simulate", "--rate", "50"), env=stack.env,
                          cwd=stack.tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: stack.png_path.exists(), 60, "a chart from `wattflow up --simulate`")
        wait_for(lambda: stack.count("power") > 0, 30, "power rows")
        assert stack.count("readings") > 0
    finally:
        up.send_signal(signal.SIGINT)
        out, _ = up.communicate(timeout=60)
    assert up.returncode == 0, out.decode()[-3000:]
    assert b"all stopped" in out
    for name in ("broker", "ingest", "storage", "power", "plotter"):
        assert f"{name:>8} | ".encode() in out
