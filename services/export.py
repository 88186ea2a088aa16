"""``wattflow export``: readings or power out of the database, streamed a chunk at a time (the
range is never held in memory), as CSV, JSON lines, or the original program's power log.

Formats (one row per stored reading or power point; times as stored: the meters' clock, UTC):

* ``csv``: a header, then ``meter,ts_us,time,value`` (readings) or
  ``circuit,ts_us,time,watts,volts,amps`` (power); ``time`` is ``YYYY-MM-DD HH:MM:SS.ffffff``.
* ``jsonl``: one JSON object per line with the same keys.
* ``power-log``: ``watts|YYYY-MM-DD HH:MM:SS.ffffff`` per line, like the original program's
  power log; the chosen circuits' points in time order (the log has no circuit column: choose
  one circuit with ``--circuit`` for one circuit's log).

Numbers are written as Python's shortest round-trip text, so reading an export back gives the
stored values exactly. Rows: by meter or circuit (in the order given), then time.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Iterator
from typing import TextIO

import numpy as np

from services.dashboard.history import utc_text

FORMATS = ("csv", "jsonl", "power-log")
SUFFIX = {"csv": "csv", "jsonl": "jsonl", "power-log": "log"}
CONTENT_TYPE = {"csv": "text/csv; charset=utf-8", "jsonl": "application/x-ndjson",
                "power-log": "text/plain; charset=utf-8"}
COLUMNS = {"readings": ("meter", "ts_us", "time", "value"),
           "power": ("circuit", "ts_us", "time", "watts", "volts", "amps")}
CHUNK = 50_000


def chunks(db, kind: str, names: list[str], t0_us: int, t1_us: int,
           chunk: int = CHUNK) -> Iterator[dict[str, np.ndarray]]:
    """The rows, as column dicts of at most ``chunk`` rows, by name then time."""
    if kind == "power":
        return db.iter_power(names, t0_us, t1_us, chunk)
    return db.iter_readings(names, t0_us, t1_us, chunk)


def by_time(db, circuits: list[str], t0_us: int, t1_us: int,
            chunk: int = CHUNK) -> Iterator[dict[str, np.ndarray]]:
    """Power of several circuits merged in time order (ties: in the order of ``circuits``),
    holding at most one chunk per circuit: each round emits every row up to the earliest
    "last time" among the circuits' current chunks, then refills the exhausted ones."""
    streams = [db.iter_power([c], t0_us, t1_us, chunk) for c in circuits]
    held: list[dict | None] = [next(s, None) for s in streams]
    while any(h is not None for h in held):
        cutoff = min(int(h["ts_us"][-1]) for h in held if h is not None)
        parts = []
        for i, h in enumerate(held):
            if h is None:
                continue
            k = int(np.searchsorted(h["ts_us"], cutoff, side="right"))
            parts.append({c: v[:k] for c, v in h.items()})
            rest = {c: v[k:] for c, v in h.items()}
            held[i] = rest if len(rest["ts_us"]) else next(streams[i], None)
        cols = {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}
        order = np.argsort(cols["ts_us"], kind="stable")
        yield {c: v[order] for c, v in cols.items()}


def header(kind: str, fmt: str) -> str:
    if fmt != "csv":
        return ""
    return ",".join(COLUMNS[kind]) + "\n"


def encode(cols: dict[str, np.ndarray], kind: str, fmt: str) -> str:
    """One chunk of rows as text in ``fmt``."""
    if not len(cols["ts_us"]):
        return ""
    when = utc_text(cols["ts_us"]).tolist()
    if fmt == "power-log":
        return "".join(f"{w!r}|{t}\n" for w, t in zip(cols["watts"].tolist(), when, strict=True))
    key = "meter" if kind == "readings" else "circuit"
    names = [b.decode() for b in cols[key].tolist()]
    values = [cols[c].tolist() for c in COLUMNS[kind][3:]]
    rows = zip(names, cols["ts_us"].tolist(), when, *values, strict=True)
    if fmt == "jsonl":
        keys = COLUMNS[kind]
        return "".join(json.dumps(dict(zip(keys, row, strict=True))) + "\n" for row in rows)
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    return out.getvalue()


def encoded(db, kind: str, names: list[str], t0_us: int, t1_us: int,
            fmt: str) -> Iterator[bytes]:
    """The whole export as UTF-8 pieces (for the dashboard's download)."""
    if head := header(kind, fmt):
        yield head.encode()
    source = by_time(db, names, t0_us, t1_us) if fmt == "power-log" else chunks(
        db, kind, names, t0_us, t1_us)
    for cols in source:
        yield encode(cols, kind, fmt).encode()


def write(db, kind: str, names: list[str], t0_us: int, t1_us: int, fmt: str, out: TextIO,
          progress: bool | None = None, chunk: int = CHUNK) -> int:
    """The export to ``out`` with a progress bar on stderr when it is a terminal (``progress``
    None) or when asked; returns the rows written. The bar counts data time covered."""
    from tqdm import tqdm

    span_s = (t1_us - t0_us) / 1e6
    unit_names = names if fmt != "power-log" else ["all"]
    bar = tqdm(total=round(span_s * len(unit_names), 1), unit="s", unit_scale=True,
               desc=f"{kind} ({len(names)} {'circuits' if kind == 'power' else 'meters'})",
               disable=None if progress is None else not progress, file=sys.stderr,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s of data "
                          "[{elapsed}<{remaining}{postfix}]")
    rows = 0
    done = 0.0  # data seconds covered by finished names
    current = None
    out.write(header(kind, fmt))
    source = by_time(db, names, t0_us, t1_us, chunk) if fmt == "power-log" else chunks(
        db, kind, names, t0_us, t1_us, chunk)
    try:
        for cols in source:
            out.write(encode(cols, kind, fmt))
            rows += len(cols["ts_us"])
            if fmt != "power-log":
                name = cols["meter" if kind == "readings" else "circuit"][-1]
                if current is not None and name != current:
                    done += span_s
                current = name
            bar.n = round(done + (int(cols["ts_us"][-1]) - t0_us) / 1e6, 1)
            bar.set_postfix_str(f"{rows:,} rows", refresh=False)
            bar.refresh()
        bar.n = bar.total
        bar.refresh()
    finally:
        bar.close()
    return rows
