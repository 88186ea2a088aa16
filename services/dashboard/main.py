"""dashboard: a web page of live charts, history, energy and freshness, served over HTTP.

A service of its own (``wattflow dashboard``), not the plotter: it answers from the database
only, so it keeps no state of its own: a restart, or a second replica behind a proxy, shows the
past at once, and it can be started, scaled and published (port ``dashboard.port``) apart from
the pipeline. The page (``static/``: one HTML file, one stylesheet, one script of our own that
draws on canvas) polls ``/api/now`` about once a second for the latest values, freshness and
energy, and ``/api/history`` for the tail of its charts.

HTTP API (times: microseconds since 1970 UTC in answers; in arguments any form
``history.parse_time`` reads, e.g. ``-1h``, ``now``, ``2026-11-27 14:00``, ``@SECONDS``):

* ``GET /api/config``: circuits, meters, time zone, stale threshold, points per series.
* ``GET /api/history?circuit=NAME&meter=IP&from=T&to=T[&step=US|&points=N]``: per circuit its
  power and per meter its values in buckets (t, n, min, max, mean, gap), at most
  ``dashboard.max_points`` per series.
* ``GET /api/now[?from=T&to=T]``: each circuit's and meter's latest point and age, energy
  since local midnight and (with from/to) over that range.
* ``GET /api/export?from=T&to=T[&circuit=..|&meter=..][&power=1]&format=csv|jsonl|power-log``:
  a download streamed from the database a chunk at a time (services/export.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
from aiohttp import web

from services import export
from services.dashboard import history
from shared.config import Config
from shared.db import NotReady, open_database, storage_url
from shared.service import CannotStart, Port, Runtime

log = logging.getLogger("dashboard")
STATIC = Path(__file__).resolve().parent / "static"
DEFAULT_SPAN_US = 300 * history.SECOND_US


def _database_errors() -> tuple[type[BaseException], ...]:
    import sqlite3

    errors: list[type[BaseException]] = [sqlite3.OperationalError, sqlite3.DatabaseError]
    try:
        import psycopg

        errors.append(psycopg.OperationalError)
    except ImportError:
        pass
    return tuple(errors)


DATABASE_ERRORS = _database_errors()


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Dashboard:
    """The answers, from the database (opened when storage has made it)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.dc = cfg.dashboard
        self.tz = ZoneInfo(self.dc["timezone"])
        self.circuits = [c.name for c in cfg.circuits]
        self.meters = [m.ip for m in cfg.meters]
        self.db = None

    def database(self):
        if self.db is None:
            try:
                self.db = open_database(storage_url(self.cfg.storage), writer=False)
            except NotReady as exc:
                raise ApiError(503, f"no data yet: {exc}") from None
        return self.db

    def forget_database(self) -> None:
        db, self.db = self.db, None
        if db is not None:
            try:
                db.close()
            except Exception:  # noqa: BLE001 - it failed already; a new one is opened
                pass

    def config(self) -> dict:
        return {"circuits": [{"name": c.name, "voltage": c.voltage, "current": c.current}
                             for c in self.cfg.circuits],
                "meters": [{"ip": m.ip, "unit": m.unit} for m in self.cfg.meters],
                "timezone": self.dc["timezone"], "stale_after_s": self.dc["stale_after_s"],
                "max_points": self.dc["max_points"], "refresh_s": self.dc["refresh_s"],
                "gap_us": history.GAP_US}

    def names(self, query, key: str, known: list[str]) -> list[str]:
        names = query.getall(key, [])
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ApiError(400, f"unknown {key} {unknown[0]!r} (known: {', '.join(known)})")
        return names

    def range(self, query, now_us: int, default_span_us: int = DEFAULT_SPAN_US) -> tuple:
        try:
            t1 = history.parse_time(query.get("to", "now"), self.tz, now_us)
            t0 = (history.parse_time(query["from"], self.tz, now_us) if "from" in query
                  else t1 - default_span_us)
        except history.BadTime as exc:
            raise ApiError(400, str(exc)) from None
        if t1 <= t0:
            raise ApiError(400, "the range is empty: 'to' must be after 'from'")
        return t0, t1

    def history(self, query) -> dict:
        now = time.time_ns() // 1000
        t0, t1 = self.range(query, now)
        circuits = self.names(query, "circuit", self.circuits)
        meters = self.names(query, "meter", self.meters)
        most = self.dc["max_points"]
        points = _int(query.get("points", str(most)), "points")
        step = history.choose_step(t1 - t0, max(10, min(points, most)))
        if "step" in query:  # the page's tail requests: its window's step, on a short range
            asked = _int(query["step"], "step")
            if asked >= 1 and history.bucket_count(t0, t1, asked) <= most:
                step = asked
        db = self.database()
        out = {"from_us": t0, "to_us": t1, "step_us": step, "now_us": now, "series": {}}
        for kind, names, prefix in (("power", circuits, "circuit"), ("readings", meters, "meter")):
            if names:
                for name, cols in history.series(db, kind, names, t0, t1, step).items():
                    out["series"][f"{prefix}:{name}"] = {
                        "t": cols["t"].tolist(), "n": cols["n"].tolist(),
                        "gap": cols["gap"].tolist(),
                        **{k: _short(cols[k]) for k in ("min", "max", "mean")}}
        return out

    def now(self, query) -> dict:
        now = time.time_ns() // 1000
        db = self.database()
        stale = self.dc["stale_after_s"]
        out = {"now_us": now, "timezone": self.dc["timezone"], "circuits": {}, "meters": {}}
        p = db.latest("power", self.circuits)
        for name, ts, watts, volts, amps in zip(
                *(p[k].tolist() for k in ("name", "ts_us", "watts", "volts", "amps")),
                strict=True):
            age = max(0.0, (now - ts) / 1e6)
            out["circuits"][name.decode()] = {"ts_us": ts, "watts": watts, "volts": volts,
                                              "amps": amps, "age_s": round(age, 3),
                                              "stale": age > stale}
        out["total_w"] = sum(c["watts"] for c in out["circuits"].values() if not c["stale"])
        units = {m.ip: m.unit for m in self.cfg.meters}
        r = db.latest("readings", self.meters)
        seen = {n.decode(): (ts, v) for n, ts, v in zip(
            r["name"].tolist(), r["ts_us"].tolist(), r["value"].tolist(), strict=True)}
        for ip in self.meters:
            entry = {"unit": units[ip], "ts_us": None, "value": None, "age_s": None,
                     "stale": True}
            if ip in seen:
                ts, value = seen[ip]
                age = max(0.0, (now - ts) / 1e6)
                entry.update(ts_us=ts, value=value, age_s=round(age, 3), stale=age > stale)
            out["meters"][ip] = entry
        midnight = history.local_midnight_us(now, self.tz)
        out["energy"] = {"today": self._energy(db, midnight, now)}
        if "from" in query:
            t0, t1 = self.range(query, now)
            out["energy"]["window"] = self._energy(db, t0, min(t1, now))
        return out

    def _energy(self, db, a_us: int, b_us: int) -> dict:
        wh = history.energy_wh(db, self.circuits, a_us, b_us)
        return {"from_us": a_us, "to_us": b_us, "wh": wh, "total_wh": sum(wh.values())}

    def export_request(self, query) -> tuple[str, list[str], int, int, str]:
        now = time.time_ns() // 1000
        t0, t1 = self.range(query, now)
        fmt = query.get("format", "csv")
        if fmt not in export.FORMATS:
            raise ApiError(400, f"format: expected one of {', '.join(export.FORMATS)}")
        circuits = self.names(query, "circuit", self.circuits)
        meters = self.names(query, "meter", self.meters)
        power = query.get("power") in ("1", "true") or bool(circuits) or fmt == "power-log"
        if power and meters:
            raise ApiError(400, "choose circuits (power) or meters (readings), not both")
        kind = "power" if power else "readings"
        names = (circuits or self.circuits) if power else (meters or self.meters)
        return kind, names, t0, t1, fmt


def _int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ApiError(400, f"{what}: expected an integer, got {text!r}") from None


def make_app(dash: Dashboard, rt: Runtime | None = None) -> web.Application:
    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="db")
    counters = rt.counters if rt is not None else {}
    gauges = rt.gauges if rt is not None else {}

    async def answer(fn, request: web.Request, what: str) -> web.Response:
        started = time.perf_counter()
        try:
            body = await asyncio.get_running_loop().run_in_executor(pool, fn, request.query)
        except ApiError as exc:
            counters[f"{what}_errors"] = counters.get(f"{what}_errors", 0) + 1
            return web.json_response({"error": str(exc)}, status=exc.status)
        except DATABASE_ERRORS as exc:  # e.g. SQLite on a read-only mount with storage stopped
            counters[f"{what}_errors"] = counters.get(f"{what}_errors", 0) + 1
            dash.forget_database()  # opened afresh by the next request
            log.warning("database unavailable: %s", exc)
            return web.json_response({"error": f"database unavailable: {exc}"}, status=503)
        counters[f"{what}_requests"] = counters.get(f"{what}_requests", 0) + 1
        gauges[f"{what}_ms"] = round((time.perf_counter() - started) * 1000, 1)
        return web.Response(text=json.dumps(body, default=_jsonable),
                            content_type="application/json",
                            headers={"Cache-Control": "no-store"})

    async def index(_request):
        return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    async def config(request):
        return web.json_response(dash.config())

    async def api_history(request):
        return await answer(dash.history, request, "history")

    async def api_now(request):
        return await answer(dash.now, request, "now")

    async def api_export(request):
        loop = asyncio.get_running_loop()
        try:
            kind, names, t0, t1, fmt = dash.export_request(request.query)
            db = await loop.run_in_executor(pool, dash.database)
        except ApiError as exc:
            return web.json_response({"error": str(exc)}, status=exc.status)
        stamp = lambda us: history.utc_text(np.array([us]))[0][:19].replace(" ", "T")  # noqa: E731
        filename = f"wattflow-{kind}-{stamp(t0)}-{stamp(t1)}.{export.SUFFIX[fmt]}".replace(
            ":", "")
        resp = web.StreamResponse(headers={
            "Content-Type": export.CONTENT_TYPE[fmt],
            "Content-Disposition": f'attachment; filename="{filename}"'})
        await resp.prepare(request)
        chunks = export.encoded(db, kind, names, t0, t1, fmt)
        done = object()
        while (data := await loop.run_in_executor(pool, next, chunks, done)) is not done:
            await resp.write(data)
        counters["exports"] = counters.get("exports", 0) + 1
        await resp.write_eof()
        return resp

    app = web.Application()
    app.add_routes([web.get("/", index), web.get("/api/config", config),
                    web.get("/api/history", api_history), web.get("/api/now", api_now),
                    web.get("/api/export", api_export), web.static("/static", STATIC)])
    app.on_cleanup.append(lambda _app: _shutdown(pool))
    return app


async def _shutdown(pool: ThreadPoolExecutor) -> None:
    pool.shutdown(wait=True, cancel_futures=True)


def _short(values: np.ndarray) -> list[float]:
    """Chart values to 7 significant digits (a third of the bytes of full doubles)."""
    return [float(f"{v:.7g}") for v in values.tolist()]


def _jsonable(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"not JSON: {type(obj).__name__}")


def run(cfg: Config) -> int:
    rt = Runtime("dashboard", cfg)
    rt.install_signals()
    try:
        return asyncio.run(_serve(cfg, rt))
    finally:
        rt.close()


async def _serve(cfg: Config, rt: Runtime) -> int:
    dash = Dashboard(cfg)
    dc = cfg.dashboard
    runner = web.AppRunner(make_app(dash, rt), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, dc["host"], dc["port"]).start()
    except OSError as exc:
        await runner.cleanup()
        raise CannotStart(dashboard_port(cfg).explain(exc.strerror or str(exc))) from exc
    log.info("dashboard up: http://%s:%s/ (time zone %s)", dc["host"], dc["port"],
             dc["timezone"])
    try:
        while not rt.stopping.is_set():
            rt.tick()
            await asyncio.sleep(0.1)
    finally:
        await runner.cleanup()
        if dash.db is not None:
            dash.db.close()
    log.info("dashboard stopped")
    return 0


def dashboard_port(cfg: Config) -> Port:
    dc = cfg.dashboard
    return Port("dashboard (the web page's HTTP port)", dc["host"], dc["port"],
                key="dashboard.port")
