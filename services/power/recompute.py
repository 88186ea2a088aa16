"""``wattflow power recompute``: rebuild the stored power of a range from the stored readings.

After a change of circuits or of ``power.max_time_diff``, or to repair a range: for each circuit
the points of [from, to] are computed again with the as-of join (asof.py) from the readings in
[from - max_time_diff, to], a chunk of meter time at a time, and replace what was stored there
(points no longer due go). Times are the meters' clocks, as stored (read as UTC).
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime

import numpy as np

from services.power.asof import points_in_range
from shared.config import Circuit, Config
from shared.db import open_database, storage_url

log = logging.getLogger("power.recompute")
CHUNK_US = 600_000_000  # ten minutes of meter time per transaction


def parse_time(text: str) -> int:
    """``2024-04-27 12:00:00[.ffffff]``, ISO 8601 or the meters' ``2024.04.27 12:00:00.5``
    (UTC, like the stored times) -> microseconds since 1970."""
    value = text.strip()
    date, _, rest = value.partition(" ") if " " in value else value.partition("T")
    try:
        when = datetime.fromisoformat(f"{date.replace('.', '-')}T{rest or '00:00:00'}")
    except ValueError:
        raise ValueError(f"not a time: {text!r} (expected e.g. 2024-04-27 12:00:00)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    delta = when - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def recompute(cfg: Config, t_from: int | None, t_to: int | None, names: list[str],
              progress: bool | None = None) -> int:
    circuits = [c for c in cfg.circuits if not names or c.name in names]
    unknown = set(names) - {c.name for c in cfg.circuits}
    if unknown:
        raise ValueError(f"no such circuit: {', '.join(sorted(unknown))} (configured: "
                         f"{', '.join(c.name for c in cfg.circuits) or 'none'})")
    db = open_database(storage_url(cfg.storage), cfg.meters, cfg.circuits, checkpoints=False)
    D = round(cfg.power["max_time_diff"] * 1_000_000)
    total = 0
    try:
        for c in circuits:
            meters = [c.voltage, c.current]
            lo = t_from if t_from is not None else min(db.oldest(meters).values(), default=None)
            hi = t_to if t_to is not None else max(db.newest(meters).values(), default=None)
            if lo is None or hi is None or hi < lo:
                log.info("circuit %s: no readings in the range", c.name)
                continue
            total += _one(db, c, lo, hi, D, progress)
    finally:
        db.close()
    return total


def _one(db, c: Circuit, lo: int, hi: int, D: int, progress: bool | None) -> int:
    from tqdm import tqdm

    points = 0
    show = sys.stderr.isatty() if progress is None else progress
    span_s = (hi - lo) / 1e6
    with tqdm(total=round(span_s), unit="s", desc=f"circuit {c.name}", disable=not show,
              file=sys.stderr) as bar:
        a = lo
        while a <= hi:
            b = min(a + CHUNK_US - 1, hi)
            v = db.readings([c.voltage], a - D, b)
            i = db.readings([c.current], a - D, b)
            p = points_in_range(v["ts_us"], v["value"], i["ts_us"], i["value"], a, b, D)
            n = len(p["ts_us"])
            name = np.array([c.name.encode()] * n, dtype="S") if n else np.empty(0, "S1")
            cols = {"circuit": name, "v_meter": np.array([c.voltage.encode()] * n, dtype="S"),
                    "a_meter": np.array([c.current.encode()] * n, dtype="S"), **p}
            db.replace_power(c, a, b, cols)
            points += n
            bar.update(round((b - lo + 1) / 1e6) - bar.n)
            a = b + 1
    log.info("circuit %s: %d points from %s to %s", c.name, points, _fmt(lo), _fmt(hi))
    return points


def _fmt(ts_us: int) -> str:
    return datetime.fromtimestamp(ts_us / 1e6, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
