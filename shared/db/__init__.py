"""The database behind wattflow, chosen by URL: one small interface, one module per backend.

``sqlite:///data/wattflow.db`` (a path relative to the working directory; ``sqlite:////abs``
for an absolute one, or a plain path) is the zero-set-up default; ``postgresql://...`` is for
replicas on several hosts. Both hold the same tables and views (README "Database").

What a backend does (``Database``):

* ``write(batches)``: one transaction for a list of batches (``RawBatch``: an ingest batch,
  parsed; ``PowerBatch``: power points). Each batch carries its idempotence key
  ``(source, seq)``, written in the same transaction as its rows: a batch whose key is already
  there is skipped, so whichever replica applies a batch, and however often it arrives, its rows
  are in the database once. Returns, per batch, whether it was applied now (False: it was
  there already).
* reads for power, the dashboard and export (``readings``, ``power``, ``rollup``; and bounded
  whatever the range: ``buckets``, ``held_wh``, ``latest``, ``iter_readings``, ``iter_power``,
  the same results on either backend: sqlite.py's docstrings define them), ``totals``;
* upkeep: ``retention_step`` (removes old rows a little at a time), ``free_bytes``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from shared.config import Circuit, Meter

MINUTE_US = 60_000_000
HOUR_US = 3_600_000_000


class NotReady(Exception):
    """A reader found no database (or an older schema) yet: storage has not made it."""


class DiskFull(Exception):
    """A write found the disk (or the server's) full; nothing of it was committed."""


@dataclass
class RawBatch:
    """One ingest batch, parsed: its readings as columns, its bad lines as rows."""

    source: str  # the ingest stream's id
    seq: int  # its number in that stream
    base: int  # every batch of the stream numbered below this one is applied (ingest said so)
    meter: np.ndarray  # int: index into the configured meters
    ts_us: np.ndarray  # int64
    value: np.ndarray  # float64
    rejected: list[tuple] = field(default_factory=list)  # (t_recv, peer, reason, message, line)
    t_recv: np.ndarray | None = None  # float64, per reading: when ingest received its line
    # The acknowledged mode: senders that number their lines (README), and per reading and
    # per rejected line the index of its sender in ``senders`` (-1: a plain connection) and
    # the line's number. A line whose number the database holds for its sender was resent
    # (after a reconnect) and is skipped; ``resent`` counts them once written.
    senders: list[str] = field(default_factory=list)
    reading_sender: np.ndarray | None = None
    reading_no: np.ndarray | None = None
    rejected_sender: list[int] = field(default_factory=list)
    rejected_no: list[int] = field(default_factory=list)
    resent: int = 0

    def drop_resent(self, covered) -> None:
        """Keep only the lines ``covered(sender, numbers) -> bool mask`` says are new."""
        if not self.senders:
            return
        keep = np.ones(len(self.meter), bool)
        keep_rej = np.ones(len(self.rejected), bool)
        rej_sender = np.array(self.rejected_sender, np.int64)
        rej_no = np.array(self.rejected_no, np.int64)
        for i, sender in enumerate(self.senders):
            mine, mine_rej = self.reading_sender == i, rej_sender == i
            seen = covered(sender, np.concatenate((self.reading_no[mine], rej_no[mine_rej])))
            keep[np.flatnonzero(mine)] = ~seen[: mine.sum()]
            keep_rej[np.flatnonzero(mine_rej)] = ~seen[mine.sum():]
        dropped = int((~keep).sum() + (~keep_rej).sum())
        if dropped:  # every column filtered alike: a write tried again sees a whole batch
            self.resent += dropped
            self.meter, self.ts_us, self.value = (self.meter[keep], self.ts_us[keep],
                                                  self.value[keep])
            self.reading_sender, self.reading_no = (self.reading_sender[keep],
                                                    self.reading_no[keep])
            if self.t_recv is not None:
                self.t_recv = self.t_recv[keep]
            flags = keep_rej.tolist()
            self.rejected = [r for r, k in zip(self.rejected, flags, strict=True) if k]
            self.rejected_sender = [x for x, k in zip(self.rejected_sender, flags, strict=True)
                                    if k]
            self.rejected_no = [x for x, k in zip(self.rejected_no, flags, strict=True) if k]


def line_ranges(numbers: np.ndarray, existing: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The union of ``existing`` inclusive ranges and the runs of ``numbers``, as few
    inclusive ranges as possible (adjacent ones joined)."""
    nos = np.unique(numbers)
    runs = []
    if len(nos):
        breaks = np.flatnonzero(np.diff(nos) != 1)
        starts = np.concatenate(([0], breaks + 1))
        ends = np.concatenate((breaks, [len(nos) - 1]))
        runs = list(zip(nos[starts].tolist(), nos[ends].tolist(), strict=True))
    merged: list[list[int]] = []
    for lo, hi in sorted(existing + runs):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return [(lo, hi) for lo, hi in merged]


@dataclass
class PowerBatch:
    """Power points as columns (upserted by circuit and time: a point computed again with new
    readings replaces the old one); ``source`` None: no idempotence key (the rows are
    idempotent by themselves)."""

    points: dict[str, np.ndarray]  # circuit, v_meter, a_meter (S), ts_us, watts, volts, amps
    source: str | None = None
    seq: int = 0
    base: int = 0
    # circuit -> a time up to which its stored points are final (power's checkpoint: where a
    # restarted or new power replica recomputes from); only ever raised
    progress: dict[str, int] = field(default_factory=dict)


ENERGY_GAP_US = 5_000_000  # power points further apart than this: a gap, no energy across it


@dataclass
class Retention:
    """How long rows are kept, in days (0: forever); what one step may remove."""

    readings_days: float = 30
    power_days: float = 30
    rejected_days: float = 30
    rollup_1m_days: float = 400
    rollup_1h_days: float = 0
    step_rows: int = 5000

    @classmethod
    def from_config(cls, storage: dict[str, Any]) -> Retention:
        r = storage.get("retention") or {}
        return cls(**{k: r[k] for k in r if k in cls.__dataclass_fields__})


class Database(Protocol):
    url: str

    def write(self, batches: list[RawBatch | PowerBatch]) -> list[bool]: ...
    def low_marks(self) -> dict[str, int]: ...
    def totals(self) -> dict[str, int]: ...
    def retention_step(self, now_us: int) -> dict[str, int]: ...
    def free_bytes(self) -> int | None: ...
    def readings(self, meters: list[str], t0_us: int, t1_us: int) -> dict[str, np.ndarray]: ...
    def power(self, circuits: list[str], t0_us: int, t1_us: int) -> dict[str, np.ndarray]: ...
    def upkeep_state(self) -> dict[str, Any]: ...
    def rollup_step(self, now_s: float) -> int: ...
    def progress(self) -> dict[str, int]: ...
    def newest(self, meters: list[str]) -> dict[str, int]: ...
    def oldest(self, meters: list[str], after: int | None = None) -> dict[str, int]: ...
    def newest_power(self, circuits: list[str]) -> dict[str, int]: ...
    def replace_power(self, circuit: Circuit, t0_us: int, t1_us: int,
                      points: dict[str, np.ndarray]) -> None: ...
    def rollup(self, kind: str, resolution: str, names: list[str], t0_us: int,
               t1_us: int) -> dict[str, np.ndarray]: ...
    def buckets(self, kind: str, names: list[str], t0_us: int, t1_us: int,
                step_us: int) -> dict[str, np.ndarray]: ...
    def held_wh(self, circuits: list[str], t0_us: int, t1_us: int) -> dict[str, float]: ...
    def latest(self, kind: str, names: list[str]) -> dict[str, np.ndarray]: ...
    def iter_readings(self, meters: list[str], t0_us: int, t1_us: int,
                      chunk: int = 50_000) -> Iterator[dict[str, np.ndarray]]: ...
    def iter_power(self, circuits: list[str], t0_us: int, t1_us: int,
                   chunk: int = 50_000) -> Iterator[dict[str, np.ndarray]]: ...
    def close(self) -> None: ...


def open_database(url: str, meters: tuple[Meter, ...] | list[Meter] = (),
                  circuits: tuple[Circuit, ...] | list[Circuit] = (),
                  retention: Retention | None = None, **options: Any) -> Database:
    """The backend for ``url`` (see the module docstring), schema made or migrated."""
    kind, _, rest = url.partition("://")
    if kind in ("postgresql", "postgres"):
        from shared.db.postgres import PostgresDatabase

        return PostgresDatabase(url, meters, circuits, retention or Retention(), **options)
    if kind == "sqlite" or not rest:
        from shared.db.sqlite import SqliteDatabase

        return SqliteDatabase(sqlite_path(url), meters, circuits, retention or Retention(),
                              **options)
    raise ValueError(f"unsupported database URL {url!r}: use sqlite:///PATH or postgresql://...")


def sqlite_path(url: str) -> str:
    """``sqlite:///rel/path`` -> ``rel/path``; ``sqlite:////abs`` -> ``/abs``; a path as is."""
    return url[len("sqlite:///"):] if url.startswith("sqlite:///") else url


def storage_url(storage: dict[str, Any]) -> str:
    """The database URL of a config's ``storage`` section (``url``, else the older ``path``)."""
    return storage.get("url") or f"sqlite:///{storage['path']}"


def bucket_stats(keys: np.ndarray, bucket: np.ndarray, value: np.ndarray) -> tuple:
    """Per (key, bucket) group: count, sum, min, max of ``value`` (for the rollups), as
    columns (key, bucket, n, sum, min, max) in group order."""
    order = np.lexsort((bucket, keys))
    k, b, v = keys[order], bucket[order], value[order]
    start = np.flatnonzero(np.concatenate(([True], (k[1:] != k[:-1]) | (b[1:] != b[:-1]))))
    n = np.diff(np.append(start, len(k)))
    return (k[start], b[start], n, np.add.reduceat(v, start), np.minimum.reduceat(v, start),
            np.maximum.reduceat(v, start))
