"""plotter: a rolling window of ``power`` per circuit, drawn to PNG once per interval.

One figure, ``<dir>/power.png``: power per circuit and in total (top), voltage per voltage
meter (middle), current per circuit (bottom). Files are written beside the target and renamed
over it, so a viewer never reads half a file.

A frame's cost is bounded whatever the input rate or the number of circuits: at most
``MAX_LINES`` circuits are drawn one by one (those with the most power now; the total covers
all), each thinned so a panel holds about ``max_points`` points; and the window itself keeps at
most ``4 x max_points`` points per circuit, thinning evenly when it grows past that.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np

from shared import topics
from shared.config import Config
from shared.service import CannotStart, Runtime

log = logging.getLogger("plotter")


MAX_LINES = 10  # circuits drawn individually
_EPOCH_DAYS = 0.0  # 1970-01-01 in Matplotlib date numbers (set once Matplotlib is loaded)


class Window:
    """Per-circuit columns (ts_us, watts, volts, amps, v_meter), trimmed to the last
    ``window_s`` and to ``keep`` points per circuit."""

    def __init__(self, window_s: float, keep: int = 12_000):
        self.window_us = int(window_s * 1_000_000)
        self.keep = keep
        self.v_meter: dict[str, str] = {}
        self.data: dict[str, list[np.ndarray]] = {}
        self.pending: dict[str, list[tuple[np.ndarray, ...]]] = {}

    def add(self, cols: dict) -> None:
        circuits = cols["circuit"]
        for name in np.unique(circuits).tolist():
            sel = circuits == name
            if "v_meter" in cols:
                self.v_meter[name.decode()] = cols["v_meter"][sel][0].decode()
            self.pending.setdefault(name.decode(), []).append(
                tuple(cols[k][sel] for k in ("ts_us", "watts", "volts", "amps")))

    def series(self) -> dict[str, list[np.ndarray]]:
        """Fold in what arrived, sort by time, drop what fell out of the window."""
        for name, parts in self.pending.items():
            old = self.data.get(name)
            merged = [np.concatenate(([old[i]] if old else []) + [p[i] for p in parts])
                      for i in range(4)]
            order = np.argsort(merged[0], kind="stable")
            ts = merged[0][order]  # a point computed again (corrected) replaces the old one
            order = order[np.r_[ts[1:] != ts[:-1], True]]
            if len(order) > self.keep:  # bound memory: thin evenly, keep the newest point
                order = order[np.linspace(0, len(order) - 1, self.keep // 2).astype(np.int64)]
            self.data[name] = [col[order] for col in merged]
        self.pending.clear()
        if self.data:
            newest = max(int(d[0][-1]) for d in self.data.values() if len(d[0]))
            for name, d in self.data.items():
                keep = np.searchsorted(d[0], newest - self.window_us)
                self.data[name] = [col[keep:] for col in d]
        return self.data


def thin(ts: np.ndarray, *cols: np.ndarray, max_points: int) -> tuple[np.ndarray, ...]:
    if len(ts) <= max_points:
        return (ts, *cols)
    idx = np.linspace(0, len(ts) - 1, max_points).astype(np.int64)
    return (ts[idx], *(c[idx] for c in cols))


def total_power(series: dict[str, list[np.ndarray]], step_us: int) -> tuple[np.ndarray, np.ndarray]:
    """Sum of circuits' power on a common time grid (each circuit's last value per step, held)."""
    if not series:
        return np.empty(0), np.empty(0)
    lo = min(int(d[0][0]) for d in series.values() if len(d[0]))
    hi = max(int(d[0][-1]) for d in series.values() if len(d[0]))
    grid = np.arange(lo - lo % step_us, hi + step_us, step_us)
    total = np.zeros(len(grid))
    for ts, watts, *_ in series.values():
        idx = np.searchsorted(ts, grid, side="right") - 1
        total += np.where(idx >= 0, watts[np.maximum(idx, 0)], 0.0)
    return grid, total


class Renderer:
    """One figure kept for the life of the process: each frame only replaces the lines' data,
    rescales, and writes the PNG. Margins are fixed (no tight_layout per frame) and the legend
    is rebuilt only when the set of lines changes, so a frame costs one draw and one encode."""

    def __init__(self, out_dir: str, max_points: int):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.dates as mdates
        import matplotlib.pyplot as plt

        global _EPOCH_DAYS
        _EPOCH_DAYS = float(mdates.date2num(np.datetime64("1970-01-01T00:00:00")))
        self.plt, self.mdates = plt, mdates
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.max_points = max_points
        self.fig = None
        self.lines: dict[tuple[str, str], object] = {}  # (panel, label) -> Line2D
        self.legend_keys: tuple = ()
        self.waiting = None  # the "waiting for data" text, while there is none

    def _setup(self) -> None:
        fig, axes = self.plt.subplots(3, 1, figsize=(11, 8.5), sharex=True,
                                      gridspec_kw={"height_ratios": [2, 1, 1]})
        fig.subplots_adjust(left=0.08, right=0.98, top=0.95, bottom=0.08, hspace=0.12)
        self.fig, self.axes = fig, dict(zip(("p", "v", "i"), axes, strict=True))
        ax_p, ax_v, ax_i = axes
        ax_p.set_ylabel("power, W")
        ax_v.set_ylabel("voltage, V")
        ax_i.set_ylabel("current, A")
        ax_i.set_xlabel("measurement time (UTC of the meters' clock)")
        for ax in axes:
            ax.grid(True, alpha=0.3)
            ax.xaxis_date()
        locator = self.mdates.AutoDateLocator()
        ax_i.xaxis.set_major_locator(locator)
        ax_i.xaxis.set_major_formatter(self.mdates.ConciseDateFormatter(locator))

    def _line(self, panel: str, label: str, **style):
        line = self.lines.get((panel, label))
        if line is None:
            (line,) = self.axes[panel].plot([], [], label=label, **style)
            self.lines[(panel, label)] = line
        return line

    def _waiting(self, empty: bool) -> None:
        """Before the first power point: say so on the chart, so a new user sees it works."""
        if empty and self.waiting is None:
            now_us = time.time_ns() // 1000
            self.axes["p"].set_xlim(_mpl_days(np.array([now_us - 300_000_000, now_us])))
            for ax in self.axes.values():
                ax.set_ylim(0, 1)
                ax.set_yticklabels([])
            self.waiting = self.axes["p"].text(
                0.5, 0.5, "waiting for data: no power points yet\n"
                f"(since {time.strftime('%H:%M:%S')}; point meters at the ingest port)",
                transform=self.axes["p"].transAxes, ha="center", va="center", fontsize=13,
                color="0.35")
        elif not empty and self.waiting is not None:
            self.waiting.remove()
            self.waiting = None
            for ax in self.axes.values():
                ax.autoscale(enable=True)
                ax.yaxis.set_major_formatter(self.plt.matplotlib.ticker.ScalarFormatter())

    def render(self, series: dict[str, list[np.ndarray]],
               v_meters: dict[str, str] | None = None) -> Path:
        if self.fig is None:
            self._setup()
        series = {k: v for k, v in series.items() if len(v[0])}
        self._waiting(not series)
        span = max((d[0][-1] - d[0][0] for d in series.values()), default=0)
        step = max(int(span / 600), 100_000)
        shown = sorted(series, key=lambda k: -float(series[k][1][-1]))[:MAX_LINES]
        per_line = max(200, self.max_points // max(1, len(shown)))
        used: set[tuple[str, str]] = set()
        voltage_drawn: set[str] = set()
        for name in sorted(shown):
            t, w, v, a = thin(*series[name], max_points=per_line)
            when = _mpl_days(t)
            for panel, label, y in (("p", f"circuit {name}", w), ("i", f"circuit {name}", a)):
                self._line(panel, label, lw=1).set_data(when, y)
                used.add((panel, label))
            v_meter = (v_meters or {}).get(name, name)
            if v_meter not in voltage_drawn:  # circuits sharing a V meter share its line
                voltage_drawn.add(v_meter)
                self._line("v", f"meter {v_meter}", lw=1).set_data(when, v)
                used.add(("v", f"meter {v_meter}"))
        if len(series) > 1:
            grid, total = total_power(series, step)
            self._line("p", "total", lw=1.6, color="black").set_data(_mpl_days(grid), total)
            used.add(("p", "total"))
        for key in [k for k in self.lines if k not in used]:  # circuits no longer shown
            self.lines.pop(key).remove()
        title = "wattflow: power per circuit and total" if series else "wattflow: no data yet"
        if len(series) > len(shown):
            title += f" ({len(shown)} of {len(series)} circuits drawn; total covers all)"
        self.axes["p"].set_title(title)
        for ax in self.axes.values():
            ax.relim()
            ax.autoscale_view()
        keys = tuple(sorted(used))
        if keys != self.legend_keys:
            self.legend_keys = keys
            for panel in ("p", "v"):
                ax = self.axes[panel]
                if ax.get_legend() is not None:
                    ax.get_legend().remove()
                if any(k[0] == panel for k in keys):
                    ax.legend(loc="upper left", fontsize="small", ncol=4)
        target = self.out / "power.png"
        tmp = self.out / f".power.png.{os.getpid()}.tmp"
        # fast zlib level: the encode was a third of a frame at the default level
        self.fig.savefig(tmp, dpi=90, format="png", pil_kwargs={"compress_level": 1})
        os.replace(tmp, target)
        return target


def _mpl_days(ts_us: np.ndarray) -> np.ndarray:
    """Microseconds since 1970 as Matplotlib date numbers (days since its epoch)."""
    return _EPOCH_DAYS + ts_us / 86_400e6


class History:
    """Fills the window from the database at start, so a restarted plotter draws the last
    ``window_s`` at once instead of an empty chart. Until storage has made the database (or
    while it cannot be read) it tries again every ``RETRY_S``; once loaded it is done."""

    RETRY_S = 5.0

    def __init__(self, cfg: Config, window: Window):
        self.cfg, self.window = cfg, window
        self.done, self.next_try, self.tries = False, 0.0, 0
        self.v_meter = {c.name: c.voltage for c in cfg.circuits}

    def fill(self) -> int:
        """One attempt (if due); the number of points added."""
        if self.done or time.monotonic() < self.next_try:
            return 0
        from shared.db import open_database, storage_url

        self.next_try = time.monotonic() + self.RETRY_S
        self.tries += 1
        say = log.info if self.tries == 1 else log.debug  # said once, not every 5 s
        names = list(self.v_meter)
        try:
            db = open_database(storage_url(self.cfg.storage), writer=False)
        except Exception as exc:  # not made yet, not mounted, PostgreSQL not reachable: live
            say("no history to draw yet (%s); trying again every %.0f s", exc, self.RETRY_S)
            return 0  # data still draws
        added = 0
        try:
            newest = db.latest("power", names)
            if len(newest["ts_us"]):
                t1 = int(newest["ts_us"].max())
                for part in db.iter_power(names, t1 - self.window.window_us, t1):
                    part["v_meter"] = np.array(
                        [self.v_meter[c.decode()].encode() for c in part["circuit"]], "S")
                    self.window.add(part)
                    self.window.series()  # (folds in and thins chunk by chunk)
                    added += len(part["ts_us"])
            self.done = True
            log.info("history: %d power points of the last %.0f s drawn from the database",
                     added, self.window.window_us / 1e6)
        except Exception as exc:
            say("cannot read history: %s; trying again every %.0f s", exc, self.RETRY_S)
        finally:
            db.close()
        return added


def run(cfg: Config) -> int:
    # Drawing is the one heavy job that can wait: yield the CPU to the data path under load.
    os.nice(10)
    rt = Runtime("plotter", cfg)
    rt.install_signals()
    pc = cfg.plotter
    window = Window(pc["window_s"], keep=4 * pc["max_points"])
    try:
        renderer = Renderer(pc["dir"], pc["max_points"])
        if not os.access(renderer.out, os.W_OK):
            raise PermissionError(f"no write permission on {renderer.out.resolve()}")
    except OSError as exc:
        rt.close()
        raise CannotStart(f"plotter cannot write charts to {pc['dir']} as uid {os.getuid()}: "
                          f"{exc}; give that folder to this user or set plotter.dir") from exc
    sub = rt.subscriber([topics.POWER])
    log.info("plotter up: %s/power.png every %ss, window %ss", pc["dir"], pc["interval_s"],
             pc["window_s"])
    changed, next_draw = False, 0.0
    history = History(cfg, window)
    try:
        renderer.render({})  # "waiting for data" until the first power point
        while not rt.stopping.is_set():
            if not history.done and history.fill():
                changed = True
            for msg in sub.recv_batch(50, 1000):
                window.add(msg.data)
                rt.counters["power_in"] += len(msg.data["ts_us"])
                changed = True
            now = time.monotonic()
            if changed and now >= next_draw:
                started = time.perf_counter()
                renderer.render(window.series(), window.v_meter)
                rt.counters["frames"] += 1
                rt.gauges["last_frame_ms"] = round((time.perf_counter() - started) * 1000, 1)
                changed, next_draw = False, now + pc["interval_s"]
            rt.tick()
        if changed:
            renderer.render(window.series(), window.v_meter)
    finally:
        rt.close()
    log.info("plotter stopped after %d frames", rt.counters["frames"])
    return 0
