"""The dashboard in a real headless Chromium, against a real stack with simulated meters: the
charts fill, the numbers are the database's, the time axis is in the configured zone, a stale
meter says so, the picture changes, a chosen range downloads the database's rows, history is
there after the service restarts, it fits a phone, and energy of a constant load is the
hand-computed value."""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
from datetime import datetime, timedelta
from pathlib import Path
from urllib.parse import parse_qs, urlparse
from zoneinfo import ZoneInfo

import numpy as np
import pytest

from shared.parsing import format_us
from tests.browser.conftest import (
    SIMULATED,
    STALE_S,
    TZ,
    close_stack,
    make_stack,
    start_dashboard,
)
from tests.integration.stack import wait_for

ZONE = ZoneInfo(TZ)
GAP_US = 5_000_000
PREFIX = {"G": 1e9, "M": 1e6, "k": 1e3, "": 1.0, "m": 1e-3}


def polls(b) -> int:
    return int(b.eval("document.body.dataset.polls || 0"))


def charts(b) -> dict:
    return b.eval("Object.fromEntries([...document.querySelectorAll('canvas')].map("
                  "c => [c.id, {points: +c.dataset.points, last: +(c.dataset.lastT || 0),"
                  " ticks: JSON.parse(c.dataset.ticks || '[]')}]))")


def charts_show_data(b) -> bool:
    return all(c["points"] > 0 for c in charts(b).values())


def status(b) -> str:
    return b.eval("document.getElementById('status').textContent")


def open_page(b, base: str, path: str = "/", **size) -> None:
    b.goto(base + path, **size)
    wait_for(lambda: charts_show_data(b) and polls(b) >= 2, 60,
             lambda: f"charts with data: {charts(b)}, status {status(b)}")


def si_value(text: str) -> float:
    number, unit = text.split()
    prefix = unit[:-1] if unit[-1] in "WVA" else unit[:-2]
    return float(number) * PREFIX[prefix]


def energy_ref(rows: list[tuple], a_us: int, b_us: int) -> float:
    """Wh over [a, b) of (ts, watts) rows of one circuit in time order: each point held to
    the next, not across gaps over 5 s (written here again, apart from the service's)."""
    if len(rows) < 2:
        return 0.0
    ts = np.array([r[0] for r in rows], np.int64)
    w = np.array([r[1] for r in rows])
    held = (ts[1:] - ts[:-1]) <= GAP_US
    lo, hi = np.maximum(ts[:-1], a_us), np.minimum(ts[1:], b_us)
    return float(np.sum(np.where(held & (hi > lo), w[:-1] * (hi - lo), 0.0))) / 3.6e9


def power_rows(stack, circuit: str, t0: int, t1: int) -> list[tuple]:
    return stack.query("SELECT ts_us, watts FROM power_view WHERE circuit = ? AND ts_us"
                       " BETWEEN ? AND ? ORDER BY ts_us", circuit, t0, t1)


def test_charts_fill_and_every_number_is_the_databases(live, browser):
    b = browser
    open_page(b, live.base)
    state = b.eval("window.wattflow.now")
    cards = b.eval("[...document.querySelectorAll('.circuit')].map(c => ({name: "
                   "c.dataset.circuit, w: c.querySelector('.watts').dataset.w, ts: "
                   "c.querySelector('.watts').dataset.ts, text: "
                   "c.querySelector('.watts').textContent, stale: c.dataset.stale}))")
    shown = [c for c in cards if c.get("ts")]
    assert len(shown) >= SIMULATED - 1, cards  # the simulated circuits have power
    for c in shown:  # the big number is the stored point's watts, exactly
        stored = live.query("SELECT watts FROM power_view WHERE circuit = ? AND ts_us = ?",
                            c["name"], int(c["ts"]))
        assert stored == [(float(c["w"]),)], c
        assert si_value(c["text"]) == pytest.approx(float(c["w"]), rel=0.01), c
    fresh = sum(v["watts"] for v in state["circuits"].values() if not v["stale"])
    total = b.eval("document.getElementById('total-w').dataset.w")
    assert float(total) == pytest.approx(fresh, rel=1e-12)
    rows = b.eval("[...document.querySelectorAll('#meters tr')].map(r => [r.dataset.meter, "
                  "r.dataset.ts, r.dataset.value])")
    for ip, ts, value in rows:
        if ts:
            assert live.query("SELECT value FROM readings_view WHERE meter = ? AND ts_us = ?",
                              ip, int(ts)) == [(float(value),)]
    # energy: today since local midnight in the configured zone, and the shown window
    now = datetime.fromtimestamp(state["now_us"] / 1e6, ZONE)
    midnight = datetime(now.year, now.month, now.day, tzinfo=ZONE)
    today = state["energy"]["today"]
    assert today["from_us"] == int(midnight.timestamp()) * 1_000_000
    time.sleep(0.5)  # let storage commit what power computed before the page asked
    for key in ("today", "window"):
        e = state["energy"][key]
        ref = slack = 0.0
        for name in e["wh"]:
            points = power_rows(live, name, e["from_us"] - GAP_US, e["to_us"] + GAP_US)
            ref += energy_ref(points, e["from_us"], e["to_us"])
            # points stored after the page asked may add up to 2 s at the newest end
            slack += max((w for _, w in points), default=0) * 2 / 3600
        assert abs(e["total_wh"] - ref) <= slack + 1e-9, (key, e, ref)
        shown_wh = b.eval(f"document.getElementById('energy-{key}').dataset.wh")
        assert float(shown_wh) > 0


def test_the_time_axis_and_clock_are_in_the_configured_zone(live, browser):
    open_page(browser, live.base)  # the browser itself runs in UTC
    clock = browser.eval("document.getElementById('clock').textContent")
    assert clock.endswith(TZ), clock
    shown = datetime.strptime(clock[:19], "%Y-%m-%d %H:%M:%S").replace(tzinfo=ZONE)
    assert abs((shown - datetime.now(ZONE)).total_seconds()) < 10, clock
    ticks = charts(browser)["chart-power"]["ticks"]
    assert len(ticks) >= 3, ticks
    for t_us, label, _day in ticks:
        local = datetime.fromtimestamp(t_us / 1e6, ZONE)
        assert label == local.strftime("%H:%M:%S" if len(label) == 8 else "%H:%M"), (
            t_us, label)
        assert local.microsecond == 0 and local.second % 5 == 0, (local, label)


def test_a_meter_that_stopped_is_shown_stale(live, browser):
    open_page(browser, live.base)

    def states() -> dict:
        return dict(browser.eval("[...document.querySelectorAll('#meters tr')].map(r => "
                                 "[r.dataset.meter, [r.dataset.stale, "
                                 "r.querySelector('.state').textContent]])"))

    wait_for(lambda: states()["10.0.0.5"][0] == "true", 30, lambda: f"stale: {states()}")
    got = states()
    assert "STALE" in got["10.0.0.5"][1]
    ages = browser.eval("[...document.querySelectorAll('#meters tr')].map(r => "
                        "[r.dataset.meter, +r.dataset.age])")
    assert dict(ages)["10.0.0.5"] > STALE_S
    for ip in ("10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"):  # the simulated ones
        assert got[ip] == ["false", "fresh"], got


def test_screenshot_is_not_blank_and_changes_over_time(live, browser, tmp_path):
    from PIL import Image, ImageChops

    open_page(browser, live.base)
    first = Image.open(browser.screenshot(tmp_path / "a.png")).convert("RGB")
    last = charts(browser)["chart-power"]["last"]
    before = polls(browser)
    wait_for(lambda: polls(browser) >= before + 3
             and charts(browser)["chart-power"]["last"] > last, 30, "the charts moved on")
    second = Image.open(browser.screenshot(tmp_path / "b.png")).convert("RGB")
    colours = first.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50, "a blank page"
    assert ImageChops.difference(first, second).getbbox() is not None, "nothing changed"
    if os.environ.get("WATTFLOW_DASHBOARD_SCREENSHOT"):  # for the README
        shutil.copy(tmp_path / "b.png", os.environ["WATTFLOW_DASHBOARD_SCREENSHOT"])


def test_a_chosen_range_shows_and_downloads_the_databases_rows(live, browser, tmp_path):
    b = browser
    open_page(b, live.base)
    newest = max(r[0] for r in live.query("SELECT max(ts_us) FROM power"))
    end = datetime.fromtimestamp(newest / 1e6 - 3, ZONE).replace(microsecond=0, tzinfo=None)
    start = end - timedelta(seconds=40)
    b.do("click", selector="#range-toggle")
    for sel, when in (("#range-from", start), ("#range-to", end)):
        b.eval(f"document.querySelector('{sel}').value = '{when.isoformat()}'")
    b.do("click", selector="#range-form button[type=submit]")
    t0 = int(start.replace(tzinfo=ZONE).timestamp()) * 1_000_000
    t1 = int(end.replace(tzinfo=ZONE).timestamp()) * 1_000_000
    wait_for(lambda: b.eval("window.wattflow.range") == {"from": t0, "to": t1}, 30,
             lambda: f"the range is shown: {b.eval('window.wattflow.range')}")
    wait_for(lambda: (b.eval("window.wattflow.now && window.wattflow.now.energy.window")
                      or {}).get("from_us") == t0, 30, "energy of the range")
    e = b.eval("window.wattflow.now.energy.window")
    circuits = list(e["wh"])
    for name in circuits:  # a past range: the stored points, exactly
        ref = energy_ref(power_rows(live, name, t0 - GAP_US, t1 + GAP_US), t0, t1)
        assert e["wh"][name] == pytest.approx(ref, rel=1e-9, abs=1e-12), name
    # downloads of the shown range: the database's rows, every one, as stored
    got = b.do("download", selector="#dl-power", path=str(tmp_path / "power.csv"))
    query = parse_qs(urlparse(got["url"]).query)
    assert query["from"] == [f"@{t0 // 1_000_000}.000000"] and query["power"] == ["1"]
    with open(got["path"], newline="") as f:
        rows = [(r["circuit"], int(r["ts_us"]), float(r["watts"]), float(r["volts"]),
                 float(r["amps"])) for r in csv.DictReader(f)]
    expected = []
    for name in circuits:
        expected += live.query("SELECT circuit, ts_us, watts, volts, amps FROM power_view"
                               " WHERE circuit = ? AND ts_us BETWEEN ? AND ? ORDER BY ts_us",
                               name, t0, t1)
    assert rows == expected and len(rows) > 100
    got = b.do("download", selector="#dl-readings", path=str(tmp_path / "readings.csv"))
    with open(got["path"], newline="") as f:
        rows = [(r["meter"], int(r["ts_us"]), float(r["value"])) for r in csv.DictReader(f)]
    expected = []
    for ip in ("10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5"):
        expected += live.query("SELECT meter, ts_us, value FROM readings_view WHERE meter = ?"
                               " AND ts_us BETWEEN ? AND ? ORDER BY ts_us, rowid", ip, t0, t1)
    assert rows == expected and len(rows) > 100
    got = b.do("download", selector="#dl-log", path=str(tmp_path / "power.log"))
    lines = Path(got["path"]).read_text().splitlines()
    by_time = sorted(((ts, w) for _, ts, w, *_ in (
        r for name in circuits for r in live.query(
            "SELECT circuit, ts_us, watts FROM power_view WHERE circuit = ? AND ts_us BETWEEN"
            " ? AND ? ORDER BY ts_us", name, t0, t1))), key=lambda r: r[0])
    assert [(float(w), t) for w, t in (ln.split("|") for ln in lines)] == [
        (w, format_us(ts).replace(".", "-", 2)) for ts, w in by_time]


def test_it_fits_a_phone(live, browser):
    open_page(browser, live.base, width=390, height=844)
    layout = browser.eval("({scroll: document.documentElement.scrollWidth, canvases: "
                          "[...document.querySelectorAll('canvas')].map(c => "
                          "c.getBoundingClientRect().right), big: parseFloat(getComputedStyle("
                          "document.getElementById('total-w')).fontSize)})")
    assert layout["scroll"] <= 390, layout  # nothing wider than the screen
    assert all(right <= 390 for right in layout["canvases"]), layout
    assert layout["big"] >= 20, layout


def test_history_is_there_after_the_dashboard_restarts(live, browser):
    b = browser
    open_page(b, live.base)
    before = b.eval("window.wattflow.series['circuit:10.0.0.2']")
    restarted_at = time.time_ns() // 1000
    live.stop("dashboard")
    wait_for(lambda: "not updating" in status(b), 30, "the page says it is not updating")
    start_dashboard(live)
    b.do("reload")
    wait_for(lambda: charts_show_data(b) and polls(b) >= 1, 60, "charts after the restart")
    b.do("errors")  # the polls that failed while it was down
    after = b.eval("window.wattflow.series['circuit:10.0.0.2']")
    t0, step = b.eval("[window.wattflow.t0, window.wattflow.step]")
    assert after["t"][0] <= t0 + 10_000_000  # the window is full from its start
    # what was shown before the restart is shown again, bucket for bucket
    old = dict(zip(before["t"], before["mean"], strict=True))
    common = [(t, m) for t, m in zip(after["t"], after["mean"], strict=True)
              if t in old and after["t"][0] < t < restarted_at - 10_000_000]
    assert len(common) > 100, (len(common), len(after["t"]))
    assert [m for _, m in common] == [old[t] for t, _ in common]


@pytest.fixture
def quiet(tmp_path, chromium_ready):
    """A stack with the dashboard and no simulated meters."""
    stack = make_stack(tmp_path)
    try:
        stack.start()
        stack.wait_ready()
        stack.base = start_dashboard(stack)
        yield stack
    finally:
        close_stack(stack)


def test_energy_of_a_constant_kilowatt_for_36_s_is_10_wh(quiet, browser):
    # 100 V and 10 A every 0.1 s for 36 s: 361 points of 1 kW, 360 intervals of 0.1 s
    start = (time.time_ns() // 1000 - 120_000_000) // 1_000_000 * 1_000_000
    lines = b"".join(b"10.0.0.1\t%s\t100\n10.0.0.5\t%s\t10\n" % (
        (format_us(start + k * 100_000).encode(),) * 2) for k in range(361))
    quiet.send(lines)
    wait_for(lambda: quiet.query("SELECT count(*), min(watts), max(watts) FROM power_view WHERE"
                                 " circuit = '10.0.0.5'")[0] == (361, 1000.0, 1000.0), 60,
             lambda: f"361 points of 1 kW: {quiet.query('SELECT count(*) FROM power')}")
    a = datetime.fromtimestamp(start / 1e6 - 30, ZONE).replace(microsecond=0, tzinfo=None)
    z = a + timedelta(minutes=2)
    browser.goto(f"{quiet.base}/#from={a.isoformat()}&to={z.isoformat()}")

    def window_wh() -> float | None:
        e = browser.eval("window.wattflow.range && window.wattflow.now"
                         " && window.wattflow.now.energy.window")
        return e["total_wh"] if e and e["from_us"] == int(a.replace(
            tzinfo=ZONE).timestamp()) * 1_000_000 else None

    wait_for(lambda: window_wh() is not None, 60, "the range's energy")
    assert window_wh() == pytest.approx(10.0, abs=1e-9)  # 1 kW x 36 s = 0.01 kWh
    text = browser.eval("document.getElementById('energy-window').textContent")
    assert text == "10.0 Wh", text
    # once the minutes are rolled up (settled 10 s after the last write), the same from them
    wait_for(lambda: quiet.query("SELECT count(*) FROM power_1m")[0][0] >= 1, 60,
             "rollups of those minutes")
    before = polls(browser)
    wait_for(lambda: polls(browser) >= before + 2, 30, "two more polls")
    assert window_wh() == pytest.approx(10.0, abs=1e-9)
    since = start // 1_000_000 - 1
    api = json.loads(browser.eval(f"fetch('/api/now?from=@{since}&to=now').then(r => r.text())"))
    assert api["energy"]["window"]["wh"]["10.0.0.5"] == pytest.approx(10.0, abs=1e-9)
    if api["energy"]["today"]["from_us"] <= start:  # (not when local midnight came between)
        assert api["energy"]["today"]["total_wh"] == pytest.approx(10.0, abs=1e-9)
