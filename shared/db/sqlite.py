"""SQLite backend: one file in WAL mode, one writer at a time (see services/storage for how
replicas share it), the schema in README "Database".

The WAL stays bounded under any sustained write rate: a thread of its own checkpoints (PASSIVE)
every half second, and before a transaction the writer looks at the WAL's size; past
``wal_max_mb`` it runs a RESTART checkpoint itself (copying what is left and waiting for
readers), so the next transaction starts the WAL from its beginning, and ``journal_size_limit``
cuts the file back. A checkpoint that fails (a full disk) is retried with back-off and shows in
``upkeep_state``; a write that fails because the disk is full raises ``DiskFull`` after rolling
back, so the caller can wait and try again instead of losing the batch.
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from shared.config import Circuit, Meter
from shared.db import (
    ENERGY_GAP_US,
    HOUR_US,
    MINUTE_US,
    DiskFull,
    NotReady,
    PowerBatch,
    RawBatch,
    Retention,
    bucket_stats,
    line_ranges,
)

log = logging.getLogger("db")
SCHEMA_VERSION = 2
CHECKPOINT_EVERY_S = 0.5
MAX_CHECKPOINT_BACKOFF_S = 30.0
# rows per INSERT statement, largest first; the last must be 1 (anything fits)
ROWS_PER_STATEMENT = (1000, 50, 1)


SCHEMA = """
CREATE TABLE IF NOT EXISTS meters (
    id          INTEGER PRIMARY KEY,
    ip          TEXT NOT NULL UNIQUE,   -- the meter's id as it appears in its lines
    unit        TEXT NOT NULL,          -- 'V' or 'A'
    range_start REAL NOT NULL,
    range_stop  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS readings (
    meter_id INTEGER NOT NULL REFERENCES meters(id),
    ts_us    INTEGER NOT NULL,          -- measurement time, microseconds since 1970 (meter clock)
    value    REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS readings_meter_ts ON readings (meter_id, ts_us);
CREATE TABLE IF NOT EXISTS circuits (
    id      INTEGER PRIMARY KEY,
    name    TEXT NOT NULL,
    v_meter TEXT NOT NULL,              -- ip of the voltage meter
    a_meter TEXT NOT NULL,              -- ip of the current meter
    UNIQUE (name, v_meter, a_meter)
);
CREATE TABLE IF NOT EXISTS power (
    circuit_id INTEGER NOT NULL REFERENCES circuits(id),
    ts_us      INTEGER NOT NULL,        -- the later of the two readings' times
    watts      REAL NOT NULL,
    volts      REAL NOT NULL,
    amps       REAL NOT NULL,
    PRIMARY KEY (circuit_id, ts_us)     -- one point per circuit and time: writes are upserts
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS rejected (
    t_recv  REAL NOT NULL,              -- when ingest received the line (Unix seconds)
    peer    TEXT NOT NULL,              -- address:port of the sending connection
    reason  TEXT NOT NULL,              -- code: malformed, bad_timestamp, unknown_meter, ...
    message TEXT NOT NULL,              -- a sentence for people
    line    BLOB NOT NULL               -- the line as received
);
CREATE INDEX IF NOT EXISTS rejected_t_recv ON rejected (t_recv);
CREATE TABLE IF NOT EXISTS batches (    -- idempotence keys of applied batches above their low mark
    source TEXT NOT NULL,               -- a stream's id (an ingest journal, a power replica)
    seq    INTEGER NOT NULL,            -- a batch's number in it
    PRIMARY KEY (source, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sources (
    source TEXT PRIMARY KEY,
    low    INTEGER NOT NULL,            -- every batch numbered up to this one is applied
    t      REAL NOT NULL                -- when a batch of it was last written (Unix seconds)
);
CREATE TABLE IF NOT EXISTS sender_lines (  -- the acknowledged mode: line numbers applied
    sender TEXT NOT NULL,               -- a sender's id (its hello line)
    lo     INTEGER NOT NULL,            -- lines numbered lo..hi (inclusive) are in
    hi     INTEGER NOT NULL,
    PRIMARY KEY (sender, lo)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS totals (     -- row counts kept with every write (count(*) is slow)
    name TEXT PRIMARY KEY,              -- readings, rejected, rejected.<reason>, power_writes
    n    INTEGER NOT NULL               -- (power_writes: points written; a recomputed one again)
);
CREATE TABLE IF NOT EXISTS readings_1m (  -- per meter and minute (t: its start, µs)
    meter_id INTEGER NOT NULL, t INTEGER NOT NULL,
    n INTEGER NOT NULL, sum REAL NOT NULL, min REAL NOT NULL, max REAL NOT NULL,
    PRIMARY KEY (meter_id, t)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS readings_1h (
    meter_id INTEGER NOT NULL, t INTEGER NOT NULL,
    n INTEGER NOT NULL, sum REAL NOT NULL, min REAL NOT NULL, max REAL NOT NULL,
    PRIMARY KEY (meter_id, t)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS power_1m (   -- per circuit and minute: watts n/sum/min/max, energy
    circuit_id INTEGER NOT NULL, t INTEGER NOT NULL,
    n INTEGER NOT NULL, sum REAL NOT NULL, min REAL NOT NULL, max REAL NOT NULL,
    wh REAL NOT NULL,
    PRIMARY KEY (circuit_id, t)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS power_1h (
    circuit_id INTEGER NOT NULL, t INTEGER NOT NULL,
    n INTEGER NOT NULL, sum REAL NOT NULL, min REAL NOT NULL, max REAL NOT NULL,
    wh REAL NOT NULL,
    PRIMARY KEY (circuit_id, t)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS power_dirty (  -- minutes of power written since their rollup
    circuit_id INTEGER NOT NULL, t INTEGER NOT NULL,
    touched REAL NOT NULL,              -- when last written (Unix seconds)
    PRIMARY KEY (circuit_id, t)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS power_progress (  -- power's checkpoint per circuit
    circuit_id INTEGER PRIMARY KEY,
    final_through INTEGER NOT NULL      -- stored points up to this time are final
);
CREATE VIEW IF NOT EXISTS readings_view AS
    SELECT m.ip AS meter, m.unit AS unit, r.ts_us AS ts_us,
           strftime('%Y-%m-%d %H:%M:%f', r.ts_us / 1e6, 'unixepoch') AS time, r.value AS value
    FROM readings r JOIN meters m ON m.id = r.meter_id;
CREATE VIEW IF NOT EXISTS power_view AS
    SELECT c.name AS circuit, p.ts_us AS ts_us,
           strftime('%Y-%m-%d %H:%M:%f', p.ts_us / 1e6, 'unixepoch') AS time,
           p.watts AS watts, p.volts AS volts, p.amps AS amps,
           c.v_meter AS v_meter, c.a_meter AS a_meter
    FROM power p JOIN circuits c ON c.id = p.circuit_id;
"""

POWER_ROLLUP_ADD = """
INSERT INTO {table} (circuit_id, t, n, sum, min, max, wh) VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (circuit_id, t) DO UPDATE SET n = n + excluded.n, sum = sum + excluded.sum,
    min = min(min, excluded.min), max = max(max, excluded.max), wh = wh + excluded.wh
"""

ROLLUP_UPSERT = """
INSERT INTO {table} (meter_id, t, n, sum, min, max) VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT (meter_id, t) DO UPDATE SET n = n + excluded.n, sum = sum + excluded.sum,
    min = min(min, excluded.min), max = max(max, excluded.max)
"""


class SqliteDatabase:
    # power rollups (_write_power, _roll_power): a circuit's points further apart than
    # run_gap_us are rolled up and written apart; stored points read per new one at most
    run_gap_us = 250_000
    near_rows_per_point = 16
    near_rows_min = 4096  # (a run may read this many whatever its size)
    # a run with too many stored points among its own goes in halves while it has more points
    # than this; then its minutes go to the recompute
    halve_down_to = 8
    # a minute's min and max read again in the write at most this often (per process), then it
    # goes to the recompute: under a trend every rewrite of the newest point replaces the
    # extreme, and each read scans the minute (4 was too few at 100k lines/s of random values:
    # 8 minutes went to the recompute in 13 minutes, and the stack slowed down again)
    extremes_reads_per_minute = 32

    def __init__(self, path: str, meters: tuple[Meter, ...] | list[Meter] = (),
                 circuits: tuple[Circuit, ...] | list[Circuit] = (),
                 retention: Retention | None = None, wal_max_mb: float = 64,
                 busy_timeout_s: float = 10.0, checkpoints: bool = True, writer: bool = True):
        """``writer`` False: only reads (power, the dashboard, export): the schema must be
        there already (storage makes it; ``NotReady`` until then), nothing is written."""
        self.url = f"sqlite:///{path}"
        self.path = path
        self.dir = Path(path).resolve().parent
        self.retention = retention or Retention()
        self.wal_max = int(wal_max_mb * (1 << 20))
        self.busy_timeout_s = busy_timeout_s
        self._extremes_reads: dict[tuple[int, int], int] = {}  # (circuit, minute) -> reads
        self.state: dict[str, Any] = {"checkpoint_failing": None, "wal_restarts": 0,
                                      "wal_restart_busy": 0, "retention_deleted": 0}
        self._readers = threading.local()
        self._reader_conns: list[sqlite3.Connection] = []
        self._stop = threading.Event()
        self._checkpointer = None
        if not writer:
            if not Path(path).exists():
                raise NotReady(f"no database at {path} yet (storage makes it)")
            self.conn = self._reader()
            version = self.conn.execute("PRAGMA user_version").fetchone()[0]
            if version != SCHEMA_VERSION:
                self.conn.close()
                raise NotReady(f"{path} has schema {version}, not {SCHEMA_VERSION} (yet)")
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        self.conn = self._connect()
        self.max_params = self.conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
        self._migrate()
        self.meter_ids = self._meters(meters)
        self.circuit_ids: dict[tuple[str, str, str], int] = {}
        if checkpoints:
            self._checkpointer = threading.Thread(target=self._checkpoint_loop, daemon=True,
                                                  name="checkpoint")
            self._checkpointer.start()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                               timeout=self.busy_timeout_s)
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL: a commit survives a crash of this process (what acks promise); a power cut
        # may lose the last commits. The fsync happens at checkpoints.
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA wal_autocheckpoint=0")  # checkpoints are ours (see above)
        conn.execute(f"PRAGMA journal_size_limit={self.wal_max}")
        conn.execute("PRAGMA secure_delete=OFF")  # Debian builds it on: retention would rewrite
        return conn

    # ---- schema --------------------------------------------------------------------------

    def _migrate(self) -> None:
        c = self.conn
        version = c.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"{self.path} has schema version {version}; this wattflow knows "
                               f"up to {SCHEMA_VERSION}: upgrade wattflow")
        old = version < SCHEMA_VERSION and _has_table(c, "applied")
        c.execute("BEGIN IMMEDIATE")
        try:
            if old:  # schema 1: power without a key, `applied` instead of keys and low marks
                log.info("migrating %s to schema %d", self.path, SCHEMA_VERSION)
                c.execute("ALTER TABLE power RENAME TO power_v1")
                c.execute("DROP INDEX IF EXISTS power_circuit_ts")
                c.execute("DROP VIEW IF EXISTS power_view")
            for statement in _statements(SCHEMA):
                c.execute(statement)
            if old:
                c.execute("INSERT OR REPLACE INTO power SELECT circuit_id, ts_us, watts, volts,"
                          " amps FROM power_v1 ORDER BY rowid")
                c.execute("DROP TABLE power_v1")
                c.execute("INSERT OR IGNORE INTO sources (source, low, t) SELECT source, seq, 0"
                          " FROM applied")
                c.execute("DROP TABLE applied")
            if old or version == 0:
                c.execute("DELETE FROM totals")
                c.execute("INSERT INTO totals SELECT 'readings', count(*) FROM readings")
                c.execute("INSERT INTO totals SELECT 'power_writes', count(*) FROM power")
                c.execute("INSERT INTO totals SELECT 'rejected', count(*) FROM rejected")
                c.execute("INSERT INTO totals SELECT 'rejected.' || reason, count(*)"
                          " FROM rejected GROUP BY reason")
                if old:
                    self._rebuild_reading_rollups()
            c.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise

    def _rebuild_reading_rollups(self) -> None:
        for table, width in (("readings_1m", MINUTE_US), ("readings_1h", HOUR_US)):
            self.conn.execute(f"INSERT INTO {table} SELECT meter_id, ts_us - (ts_us % {width}),"
                              f" count(*), sum(value), min(value), max(value) FROM readings"
                              f" GROUP BY 1, 2")

    def _meters(self, meters) -> np.ndarray:
        self.conn.executemany(
            "INSERT INTO meters (ip, unit, range_start, range_stop) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (ip) DO UPDATE SET unit = excluded.unit,"
            " range_start = excluded.range_start, range_stop = excluded.range_stop",
            [(m.ip, m.unit, m.range_start, m.range_stop) for m in meters])
        ids = dict(self.conn.execute("SELECT ip, id FROM meters"))
        # meter index in the config's table -> row id in `meters`
        return np.array([ids[m.ip] for m in meters], dtype=np.int64)

    # ---- writing -------------------------------------------------------------------------

    def write(self, batches: list[RawBatch | PowerBatch]) -> list[bool]:
        """All of ``batches`` in one transaction; per batch, True if applied now, False if its
        key was there already (see shared/db)."""
        self._bound_wal()
        try:
            with self._transaction():
                fresh = [self._claim(b) for b in batches]
                self._advance_lows(batches)
                raws = [b for b, ok in zip(batches, fresh, strict=True)
                        if ok and isinstance(b, RawBatch)]
                for b in raws:
                    b.drop_resent(self._lines_seen)
                self._write_readings(raws)
                self._write_rejected([r for b in raws for r in b.rejected])
                powers = [b for b, ok in zip(batches, fresh, strict=True)
                          if ok and isinstance(b, PowerBatch)]
                self._write_power([b.points for b in powers])
                for b in powers:
                    self._write_progress(b.progress)
        except sqlite3.OperationalError as exc:
            if _is_full(exc):
                raise DiskFull(str(exc)) from exc
            raise
        return fresh

    def _claim(self, b: RawBatch | PowerBatch) -> bool:
        if b.source is None:
            return True
        row = self.conn.execute("SELECT low FROM sources WHERE source = ?", (b.source,))
        low = row.fetchone()
        if low is not None and b.seq <= low[0]:
            return False
        cur = self.conn.execute("INSERT INTO batches (source, seq) VALUES (?, ?)"
                                " ON CONFLICT DO NOTHING", (b.source, b.seq))
        return cur.rowcount == 1

    def _lines_seen(self, sender: str, numbers: np.ndarray) -> np.ndarray:
        """Which of a sender's line ``numbers`` are in already; then record them all."""
        lo, hi = int(numbers.min()), int(numbers.max())
        existing = self.conn.execute(
            "SELECT lo, hi FROM sender_lines WHERE sender = ? AND lo <= ? AND hi >= ?",
            (sender, hi + 1, lo - 1)).fetchall()
        seen = np.zeros(len(numbers), bool)
        for a, b in existing:
            seen |= (numbers >= a) & (numbers <= b)
        self.conn.executemany("DELETE FROM sender_lines WHERE sender = ? AND lo = ?",
                              [(sender, a) for a, _ in existing])
        self.conn.executemany("INSERT INTO sender_lines (sender, lo, hi) VALUES (?, ?, ?)",
                              [(sender, a, b) for a, b in line_ranges(numbers, existing)])
        return seen

    def _advance_lows(self, batches) -> None:
        """Every batch below a stream's ``base`` is applied (its sender had acks for them):
        raise the stream's low mark and forget the keys under it."""
        bases: dict[str, int] = {}
        for b in batches:
            if b.source is not None:
                bases[b.source] = max(bases.get(b.source, -1), b.base - 1)
        now = time.time()
        for source, low in bases.items():
            self.conn.execute("INSERT INTO sources (source, low, t) VALUES (?, ?, ?)"
                              " ON CONFLICT (source) DO UPDATE SET low = max(low, excluded.low),"
                              " t = excluded.t", (source, low, now))
            self.conn.execute("DELETE FROM batches WHERE source = ? AND seq <= ?", (source, low))

    def _write_readings(self, raws: list[RawBatch]) -> None:
        raws = [b for b in raws if len(b.meter)]
        if not raws:
            return
        meter = self.meter_ids[np.concatenate([b.meter for b in raws])]
        ts = np.concatenate([b.ts_us for b in raws])
        value = np.concatenate([b.value for b in raws])
        self._insert("readings", ("meter_id", "ts_us", "value"), (meter, ts, value))
        for table, width in (("readings_1m", MINUTE_US), ("readings_1h", HOUR_US)):
            stats = bucket_stats(meter, ts - ts % width, value)
            self.conn.executemany(ROLLUP_UPSERT.format(table=table),
                                  zip(*(col.tolist() for col in stats), strict=True))
        self._add_total("readings", len(ts))

    def _write_rejected(self, rows: list[tuple]) -> None:
        if not rows:
            return
        self.conn.executemany("INSERT INTO rejected (t_recv, peer, reason, message, line)"
                              " VALUES (?, ?, ?, ?, ?)", rows)
        self._add_total("rejected", len(rows))
        reasons: dict[str, int] = {}
        for r in rows:
            reasons[r[2]] = reasons.get(r[2], 0) + 1
        for reason, n in reasons.items():
            self._add_total(f"rejected.{reason}", n)

    def _write_power(self, batches: list[dict]) -> None:
        """Power batches' points (a point at a circuit and time already stored replaces it;
        of two in the batches, the later), with their rollups: per circuit, in runs of
        points less than ``run_gap_us`` apart, each run's rollups (``_roll_power``: it
        reads the stored points around the run) and then its rows, so that a run sees the
        ones before it (a meter that lags behind its circuit's other one makes a run of
        its own, apart from the newest points)."""
        batches = [cols for cols in batches if len(cols["ts_us"])]
        if not batches:
            return
        cid = np.concatenate([self._circuit_ids(cols) for cols in batches])
        ts, watts, volts, amps = (
            np.concatenate([np.asarray(cols[k], dtype) for cols in batches])
            for k, dtype in (("ts_us", np.int64), ("watts", np.float64),
                             ("volts", np.float64), ("amps", np.float64)))
        dirty: set[tuple[int, int]] = set()
        for c in np.unique(cid).tolist():
            at = np.flatnonzero(cid == c)
            at = at[np.argsort(ts[at], kind="stable")]
            at = at[np.append(ts[at][1:] != ts[at][:-1], True)]  # equal times: the later
            for run in np.split(at, np.flatnonzero(np.diff(ts[at]) > self.run_gap_us) + 1):
                self._write_run(c, ts[run], watts[run], volts[run], amps[run], dirty)
        self._add_total("power_writes", len(ts))
        if dirty:
            now = time.time()
            self.conn.executemany(
                "INSERT INTO power_dirty (circuit_id, t, touched) VALUES (?, ?, ?)"
                " ON CONFLICT DO UPDATE SET touched = excluded.touched",
                [(c, t, now) for c, t in sorted(dirty)])

    def _write_run(self, c: int, ts: np.ndarray, watts: np.ndarray, volts: np.ndarray,
                   amps: np.ndarray, dirty: set) -> None:
        """One run of a circuit's points (times sorted, distinct): rollups, then the rows. A
        run with too many stored points among its own (a few new points spread over many
        stored ones, as late work writes them) goes in halves, down to ``halve_down_to``
        points; a run that small with still too many goes to the recompute."""
        extremes = self._roll_power(c, ts, watts, dirty, len(ts) > self.halve_down_to)
        if extremes is None:
            self._count("rollup_runs_halved")
            half = len(ts) // 2
            for part in (slice(0, half), slice(half, None)):
                self._write_run(c, ts[part], watts[part], volts[part], amps[part], dirty)
            return
        self._insert("power", ("circuit_id", "ts_us", "watts", "volts", "amps"),
                     (np.full(len(ts), c), ts, watts, volts, amps),
                     upsert=("circuit_id", "ts_us"))
        self._refresh_extremes(c, extremes)

    def _roll_power(self, c: int, ts: np.ndarray, watts: np.ndarray, dirty: set,
                    may_halve: bool = False) -> set[int] | None:
        """Bring one circuit's rollups up to date with a run of its points (times sorted,
        distinct) about to be written. Each point's energy is its watts held until the next
        point (within ENERGY_GAP_US), so the points change only their own minutes and the
        energy of the stored points just before them. Read the stored points from the
        run's first time to its last (at most ``near_rows_per_point`` per point) and one on
        each side; add to each minute's and hour's rollup the new points' count, the change
        of sum, the new min and max, and the change of energy: the figures ``power_minute``
        computes from the stored points afterwards (a test compares them). Marked for that
        recompute instead: a minute waiting for it, and (with the minute before each) every
        minute of a run with more stored points between its first and last time than
        ``near_rows_per_point`` per new one (at least ``near_rows_min``), unless ``may_halve``
        and halves would read few enough: then None (nothing done). Returned: the minutes
        where a replaced point's old watts may have been the min or max
        (``_refresh_extremes`` reads them again once written)."""
        lo, hi = int(ts[0]), int(ts[-1])
        most = max(self.near_rows_per_point * len(ts), self.near_rows_min)
        near = self.conn.execute(
            "SELECT * FROM (SELECT ts_us, watts FROM power WHERE circuit_id = ?1"
            "  AND ts_us < ?2 ORDER BY ts_us DESC LIMIT 1)"
            " UNION ALL SELECT * FROM (SELECT ts_us, watts FROM power WHERE circuit_id = ?1"
            "  AND ts_us BETWEEN ?2 AND ?3 ORDER BY ts_us LIMIT ?4)"
            " UNION ALL SELECT * FROM (SELECT ts_us, watts FROM power WHERE circuit_id = ?1"
            "  AND ts_us > ?3 ORDER BY ts_us LIMIT 1)", (c, lo, hi, most + 1)).fetchall()
        minute = ts - ts % MINUTE_US
        inside = [t for t, _ in near if lo <= t <= hi]
        if len(inside) > most:
            # halves help while a run of halve_down_to points reads no more than near_rows_min
            # at the density read so far: stored points per new one up to the last one read
            density = len(inside) / int(np.searchsorted(ts, inside[-1], "right"))
            if may_halve and density * self.halve_down_to <= self.near_rows_min:
                return None
            marked = set(minute.tolist())
            self._count("rollup_recompute.too_many_near", len(marked))
            for m in marked:
                dirty.update(((c, m), (c, m - MINUTE_US)))
            return set()
        old_t = np.array([r[0] for r in near], np.int64)
        old_w = np.array([r[1] for r in near], np.float64)
        all_t = np.union1d(old_t, ts)
        old_at, new_at = np.searchsorted(all_t, old_t), np.searchsorted(all_t, ts)
        all_w = np.empty(len(all_t))
        all_w[old_at] = old_w
        all_w[new_at] = watts
        held = _held_wh(all_t, all_w)
        changed = held[old_at] - _held_wh(old_t, old_w)  # the stored points' energy
        at_old = np.minimum(np.searchsorted(old_t, ts), max(len(old_t) - 1, 0))
        replaced = (old_t[at_old] == ts) if len(old_t) else np.zeros(len(ts), bool)
        was = np.where(replaced, old_w[at_old] if len(old_t) else 0.0, 0.0)
        old_minute = old_t - old_t % MINUTE_US
        keys = np.unique(np.concatenate((minute, old_minute[changed != 0])))
        k_new = np.searchsorted(keys, minute)
        k_old = np.searchsorted(keys, old_minute[changed != 0])
        size = len(keys)
        n = np.bincount(k_new, weights=~replaced, minlength=size).astype(np.int64)
        total = np.bincount(k_new, weights=watts - was, minlength=size)
        wh = (np.bincount(k_new, weights=np.where(replaced, 0.0, held[new_at]), minlength=size)
              + np.bincount(k_old, weights=changed[changed != 0], minlength=size))
        low, high = np.full(size, np.inf), np.full(size, -np.inf)
        np.minimum.at(low, k_new, watts)
        np.maximum.at(high, k_new, watts)
        has_new = np.bincount(k_new, minlength=size) > 0
        first, last = int(keys[0]), int(keys[-1])
        waiting = {t for (t,) in self.conn.execute(
            "SELECT t FROM power_dirty WHERE circuit_id = ? AND t BETWEEN ? AND ?",
            (c, first, last))}
        unsure = set()  # minutes where a replaced point's old watts may be the min or max
        unknown = set()  # minutes with points replaced but no rollup (not expected: recompute)
        if replaced.any():
            stored = {t: (a, b) for t, a, b in self.conn.execute(
                "SELECT t, min, max FROM power_1m WHERE circuit_id = ? AND t BETWEEN ? AND ?",
                (c, first, last))}
            for m, old, new in zip(minute[replaced].tolist(), was[replaced].tolist(),
                                   watts[replaced].tolist(), strict=True):
                lo_w, hi_w = stored.get(m, (old, old))
                if m not in stored:
                    unknown.add(m)
                elif not ((old > lo_w or new <= old) and (old < hi_w or new >= old)):
                    unsure.add(m)
        adds = []
        for j, m in enumerate(keys.tolist()):
            if m in waiting or m in unknown:
                self._count("rollup_recompute." + ("waiting" if m in waiting else "no_rollup"))
                dirty.add((c, m))
            elif has_new[j]:
                adds.append((c, m, int(n[j]), float(total[j]), float(low[j]),
                             float(high[j]), float(wh[j])))
            elif not self._add_wh(c, m, float(wh[j])):
                self._count("rollup_recompute.energy_only")
                dirty.add((c, m))
        self._count("rollup_kept", len(adds))
        self.conn.executemany(POWER_ROLLUP_ADD.format(table="power_1m"), adds)
        self.conn.executemany(POWER_ROLLUP_ADD.format(table="power_1h"),
                              [(c, m - m % HOUR_US, *r) for c, m, *r in adds])
        extremes = set()
        for m in sorted(unsure - waiting):
            reads = self._extremes_reads.get((c, m), 0)
            if reads >= self.extremes_reads_per_minute:
                self._count("rollup_recompute.min_max")
                dirty.add((c, m))
            else:
                self._extremes_reads[(c, m)] = reads + 1
                extremes.add(m)
        if len(self._extremes_reads) > 100_000:  # (a budget, not a record: forget old ones)
            self._extremes_reads.clear()
        return extremes

    def _refresh_extremes(self, c: int, minutes: set[int]) -> None:
        """Min and max of these minutes read again from their stored points (a replaced
        point was perhaps the extreme), and of their hours from the hours' minutes: an
        aggregate over one minute's points, far cheaper than the recompute's window."""
        if not minutes:
            return
        self._count("rollup_extremes_read", len(minutes))
        for m in sorted(minutes):
            self.conn.execute(
                "UPDATE power_1m SET (min, max) = (SELECT min(watts), max(watts) FROM power"
                " WHERE circuit_id = ?1 AND ts_us >= ?2 AND ts_us < ?2 + ?3)"
                " WHERE circuit_id = ?1 AND t = ?2", (c, m, MINUTE_US))
        for h in sorted({m - m % HOUR_US for m in minutes}):
            self.conn.execute(
                "UPDATE power_1h SET (min, max) = (SELECT min(min), max(max) FROM power_1m"
                " WHERE circuit_id = ?1 AND t >= ?2 AND t < ?2 + ?3)"
                " WHERE circuit_id = ?1 AND t = ?2", (c, h, HOUR_US))

    def _count(self, what: str, n: int = 1) -> None:
        """Minutes' rollups kept in the write (``rollup_kept``) and marked for the recompute
        (``rollup_recompute.<why>``), shown among storage's gauges."""
        self.state[what] = self.state.get(what, 0) + n

    def _add_wh(self, c: int, minute: int, wh: float) -> bool:
        """Add ``wh`` to a minute's rollup and its hour's; False if the minute has none."""
        if not self.conn.execute("UPDATE power_1m SET wh = wh + ? WHERE circuit_id = ?"
                                 " AND t = ?", (wh, c, minute)).rowcount:
            return False
        return bool(self.conn.execute("UPDATE power_1h SET wh = wh + ? WHERE circuit_id = ?"
                                      " AND t = ?", (wh, c, minute - minute % HOUR_US)).rowcount)

    def _write_progress(self, progress: dict[str, int]) -> None:
        for name, through in progress.items():
            cid = self._circuit_id_by_name(name)
            if cid is None:
                continue
            self.conn.execute("INSERT INTO power_progress (circuit_id, final_through)"
                              " VALUES (?, ?) ON CONFLICT DO UPDATE SET final_through ="
                              " max(final_through, excluded.final_through)", (cid, int(through)))

    def _circuit_id_by_name(self, name: str) -> int | None:
        row = self.conn.execute("SELECT id FROM circuits WHERE name = ? ORDER BY id DESC",
                                (name,)).fetchone()
        return row[0] if row else None

    def _add_total(self, name: str, n: int) -> None:
        self.conn.execute("INSERT INTO totals (name, n) VALUES (?, ?)"
                          " ON CONFLICT (name) DO UPDATE SET n = n + excluded.n", (name, n))

    def _insert(self, table: str, names: tuple[str, ...], columns,
                upsert: tuple[str, ...] = ()) -> None:
        """Insert rows given as columns, many rows per statement: one ``INSERT ... VALUES
        (...), (...), ...`` of a thousand rows costs SQLite (and the binding loop) far less
        than a thousand one-row executions (about 1.7x the rows/s of a plain ``executemany``;
        bench/run.py measures both). What is left of a batch goes in smaller statements, so
        only three statement shapes exist per table, all kept in the connection's cache.
        ``upsert``: the key columns; a row whose key exists replaces that row's other columns
        (a point computed again)."""
        width = len(names)
        most = min(ROWS_PER_STATEMENT[0], self.max_params // width)  # SQLite's bound
        shapes = (most, *(r for r in ROWS_PER_STATEMENT[1:] if r < most))
        flat = np.empty(len(columns[0]) * width, dtype=object)
        for j, col in enumerate(columns):
            flat[j::width] = col.tolist() if isinstance(col, np.ndarray) else col
        values = flat.tolist()
        pos = 0  # in values
        for rows in shapes:
            step = rows * width
            end = pos + (len(values) - pos) // step * step
            if end > pos:  # (a key twice in one upsert statement: the later row wins)
                self.conn.executemany(_insert_sql(table, names, rows, upsert),
                                      [values[i : i + step] for i in range(pos, end, step)])
                pos = end

    def _circuit_ids(self, cols) -> np.ndarray:
        """Row ids of the batch's circuits (name, V meter, A meter), made on first sight
        (per distinct circuit of the batch, not per point)."""
        parts = [np.unique(np.asarray(cols[k]), return_inverse=True)
                 for k in ("circuit", "v_meter", "a_meter")]
        (names, n), (vs, v), (as_, a) = ((u, inv.ravel().astype(np.int64)) for u, inv in parts)
        combined, first, inverse = np.unique((n * len(vs) + v) * len(as_) + a,
                                             return_index=True, return_inverse=True)
        ids = np.empty(len(combined), np.int64)
        for j, i in enumerate(first.tolist()):
            key = tuple(_text(u[k[i]]) for u, k in ((names, n), (vs, v), (as_, a)))
            if key not in self.circuit_ids:
                self.conn.execute("INSERT OR IGNORE INTO circuits (name, v_meter, a_meter)"
                                  " VALUES (?, ?, ?)", key)
                self.circuit_ids[key] = self.conn.execute(
                    "SELECT id FROM circuits WHERE name = ? AND v_meter = ? AND a_meter = ?",
                    key).fetchone()[0]
            ids[j] = self.circuit_ids[key]
        return ids[inverse.ravel()]

    # ---- upkeep --------------------------------------------------------------------------

    def _bound_wal(self) -> None:
        """Past ``wal_max``: checkpoint what is left and make the next write restart the WAL."""
        try:
            size = os.stat(self.path + "-wal").st_size
        except FileNotFoundError:
            return
        if size <= self.wal_max:
            return
        try:
            busy, _, _ = self.conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
        except sqlite3.OperationalError as exc:
            if _is_full(exc):
                raise DiskFull(str(exc)) from exc
            raise
        self.state["wal_restarts" if not busy else "wal_restart_busy"] += 1

    def _checkpoint_loop(self) -> None:
        """PASSIVE checkpoints every half second from a connection of its own (so commits never
        wait for an fsync). A failure (a full disk) is logged once, retried with back-off, and
        shown in ``upkeep_state`` until a checkpoint succeeds again."""
        conn = None
        pause = CHECKPOINT_EVERY_S
        while not self._stop.wait(pause):
            try:
                if conn is None:
                    conn = sqlite3.connect(self.path, isolation_level=None,
                                           check_same_thread=False, timeout=1.0)
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            except sqlite3.Error as exc:
                if self.state["checkpoint_failing"] is None:
                    log.error("WAL checkpoint failed: %s; retrying with back-off", exc)
                self.state["checkpoint_failing"] = str(exc)
                self.state["checkpoint_failures"] = self.state.get("checkpoint_failures", 0) + 1
                pause = min(pause * 2, MAX_CHECKPOINT_BACKOFF_S)
                continue
            if self.state["checkpoint_failing"] is not None:
                log.warning("WAL checkpoints work again")
                self.state["checkpoint_failing"] = None
            pause = CHECKPOINT_EVERY_S
        if conn is not None:
            conn.close()

    def retention_step(self, now_us: int) -> dict[str, int]:
        """Remove at most ``step_rows`` rows past their retention from each table, in short
        transactions of their own (one meter or circuit at a time, by index range). Returns
        the rows removed per table; a table that hit the limit has more waiting."""
        r = self.retention
        day = 86_400_000_000
        done: dict[str, int] = {}
        plans = (("readings", "meter_id", "ts_us", r.readings_days, "meters"),
                 ("power", "circuit_id", "ts_us", r.power_days, "circuits"),
                 ("readings_1m", "meter_id", "t", r.rollup_1m_days, "meters"),
                 ("power_1m", "circuit_id", "t", r.rollup_1m_days, "circuits"),
                 ("readings_1h", "meter_id", "t", r.rollup_1h_days, "meters"),
                 ("power_1h", "circuit_id", "t", r.rollup_1h_days, "circuits"))
        for table, key, ts, days, owners in plans:
            if days <= 0:
                continue
            cutoff = now_us - int(days * day)
            ids = [row[0] for row in self.conn.execute(f"SELECT id FROM {owners} ORDER BY id")]
            removed = 0
            for owner in ids:
                removed += self._delete(
                    f"DELETE FROM {table} WHERE {key} = ? AND {ts} IN (SELECT {ts} FROM {table}"
                    f" WHERE {key} = ? AND {ts} < ? ORDER BY {ts} LIMIT ?)",
                    (owner, owner, cutoff, r.step_rows - removed), table)
                if removed >= r.step_rows:
                    break
            done[table] = removed
        if r.rejected_days > 0:
            done["rejected"] = self._delete_rejected(now_us / 1e6 - r.rejected_days * 86_400,
                                                     r.step_rows)
        self.state["retention_deleted"] += sum(done.values())
        return done

    def _delete(self, sql: str, params: tuple, table: str) -> int:
        with self._transaction():
            n = self.conn.execute(sql, params).rowcount
            if n and table == "readings":  # counted table: count what goes
                self._add_total(table, -n)
        return n

    def _delete_rejected(self, cutoff_s: float, most: int) -> int:
        pick = ("SELECT rowid FROM rejected WHERE t_recv < ? ORDER BY t_recv LIMIT ?")
        with self._transaction():
            by_reason = self.conn.execute(f"SELECT reason, count(*) FROM rejected WHERE rowid"
                                          f" IN ({pick}) GROUP BY reason", (cutoff_s, most))
            for reason, n in by_reason.fetchall():
                self._add_total(f"rejected.{reason}", -n)
            n = self.conn.execute(f"DELETE FROM rejected WHERE rowid IN ({pick})",
                                  (cutoff_s, most)).rowcount
            self._add_total("rejected", -n)
        return n

    @contextlib.contextmanager
    def _transaction(self):
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def rollup_step(self, now_s: float, settle_s: float = 10.0, most: int = 50) -> int:
        """Per-minute and per-hour power rollups (n, sum, min, max of watts; energy in Wh:
        each point's watts held until the next point, unless that is more than ENERGY_GAP_US
        away) for minutes marked for it (``_roll_power`` keeps the others up to date) and then
        left alone for ``settle_s``, recomputed from the stored points. Returns minutes done.
        Storage runs the reading part on a thread of its own and hands the writing to its
        writer."""
        read_at = time.time()
        rows = [(cid, t, self.power_minute(cid, t))
                for cid, t in self.dirty_power_minutes(now_s - settle_s, most)]
        self.store_power_rollups(rows, read_at)
        return len(rows)

    def dirty_power_minutes(self, touched_before_s: float, most: int = 50) -> list[tuple]:
        """(circuit id, minute) of power written to, last before ``touched_before_s``."""
        return self._reader().execute("SELECT circuit_id, t FROM power_dirty WHERE touched < ?"
                                      " ORDER BY t LIMIT ?", (touched_before_s, most)).fetchall()

    def power_minute(self, cid: int, t: int) -> tuple | None:
        """A minute's power rollup from the stored points (a read): n, sum, min, max, wh."""
        row = self._reader().execute(
            "SELECT count(*), sum(watts), min(watts), max(watts),"
            " sum(CASE WHEN nxt - ts_us <= ? THEN watts * (nxt - ts_us) ELSE 0 END) / 3.6e9"
            " FROM (SELECT ts_us, watts, LEAD(ts_us) OVER (ORDER BY ts_us) AS nxt FROM power"
            "       WHERE circuit_id = ? AND ts_us >= ? AND ts_us < ?) WHERE ts_us < ?",
            (ENERGY_GAP_US, cid, t, t + MINUTE_US + ENERGY_GAP_US, t + MINUTE_US)).fetchone()
        return row if row[0] else None

    def store_power_rollups(self, rows: list[tuple], read_at: float) -> None:
        """Store minutes computed by ``power_minute`` (None: no points left) and their hours;
        a minute written to again after ``read_at`` stays dirty (it is done again)."""
        if not rows:
            return
        with self._transaction():
            for cid, t, agg in rows:
                if agg is None:
                    self.conn.execute("DELETE FROM power_1m WHERE circuit_id = ? AND t = ?",
                                      (cid, t))
                else:
                    self.conn.execute("INSERT OR REPLACE INTO power_1m (circuit_id, t, n, sum,"
                                      " min, max, wh) VALUES (?, ?, ?, ?, ?, ?, ?)",
                                      (cid, t, *agg))
                self.conn.execute("DELETE FROM power_dirty WHERE circuit_id = ? AND t = ?"
                                  " AND touched < ?", (cid, t, read_at))
            for cid, hour in sorted({(cid, t - t % HOUR_US) for cid, t, _ in rows}):
                self.conn.execute("DELETE FROM power_1h WHERE circuit_id = ? AND t = ?",
                                  (cid, hour))
                self.conn.execute(
                    "INSERT INTO power_1h (circuit_id, t, n, sum, min, max, wh)"
                    " SELECT circuit_id, ?, sum(n), sum(sum), min(min), max(max), sum(wh)"
                    " FROM power_1m WHERE circuit_id = ? AND t >= ? AND t < ?"
                    " GROUP BY circuit_id", (hour, cid, hour, hour + HOUR_US))

    def newest(self, meters: list[str]) -> dict[str, int]:
        """The latest stored reading's time of each meter that has one."""
        out = {}
        for ip in meters:
            row = self._reader().execute(
                "SELECT max(r.ts_us) FROM readings r JOIN meters m ON m.id = r.meter_id"
                " WHERE m.ip = ?", (ip,)).fetchone()
            if row[0] is not None:
                out[ip] = row[0]
        return out

    def oldest(self, meters: list[str], after: int | None = None) -> dict[str, int]:
        """The earliest stored reading's time (after ``after``, if given) of each meter that
        has one."""
        out = {}
        for ip in meters:
            row = self._reader().execute(
                "SELECT min(r.ts_us) FROM readings r JOIN meters m ON m.id = r.meter_id"
                " WHERE m.ip = ? AND r.ts_us > ?",
                (ip, -(2**63) if after is None else after)).fetchone()
            if row[0] is not None:
                out[ip] = row[0]
        return out

    def newest_power(self, circuits: list[str]) -> dict[str, int]:
        """The latest stored power point's time of each circuit that has one."""
        # (by ``latest``: an index seek per circuit row; a max() over a join scanned the whole
        # table, seconds at a million points, during which power sent no stats)
        newest = self.latest("power", circuits)
        return {n.decode(): int(t) for n, t in zip(newest["name"].tolist(),
                                                   newest["ts_us"].tolist(), strict=True)}

    def progress(self) -> dict[str, int]:
        """Each circuit's checkpoint: stored points up to this time are final."""
        return dict(self._reader().execute(
            "SELECT c.name, max(p.final_through) FROM power_progress p"
            " JOIN circuits c ON c.id = p.circuit_id GROUP BY c.name"))

    def replace_power(self, circuit: Circuit, t0_us: int, t1_us: int,
                      points: dict[str, np.ndarray]) -> None:
        """The power of ``circuit`` in [t0, t1] becomes exactly ``points`` (a recompute after
        a change of circuits or of max_time_diff: stale points go)."""
        with self._transaction():
            cid = int(self._circuit_ids({"circuit": [circuit.name], "v_meter": [circuit.voltage],
                                         "a_meter": [circuit.current]})[0])
            marked = self.conn.execute(  # the minutes that had points (and the minute
                # before each: its last point's energy reaches into them): rollups change too
                "INSERT INTO power_dirty (circuit_id, t, touched) SELECT DISTINCT circuit_id,"
                " ts_us - ts_us % ? - d, ? FROM power, (SELECT 0 AS d UNION ALL SELECT ?)"
                " WHERE circuit_id = ? AND ts_us BETWEEN ? AND ?"
                " ON CONFLICT DO UPDATE SET touched = excluded.touched",
                (MINUTE_US, time.time(), MINUTE_US, cid, t0_us, t1_us)).rowcount
            self._count("rollup_recompute.replace_power", max(marked, 0))
            gone = self.conn.execute("DELETE FROM power WHERE circuit_id = ? AND ts_us"
                                     " BETWEEN ? AND ?", (cid, t0_us, t1_us)).rowcount
            self.state["power_replaced"] = self.state.get("power_replaced", 0) + gone
            self._write_power([points])

    def free_bytes(self) -> int:
        st = os.statvfs(self.dir)
        return st.f_bavail * st.f_frsize

    def upkeep_state(self) -> dict[str, Any]:
        try:
            wal = os.stat(self.path + "-wal").st_size
        except FileNotFoundError:
            wal = 0
        try:
            size = os.stat(self.path).st_size
        except FileNotFoundError:
            size = 0
        return dict(self.state, wal_bytes=wal, db_bytes=size)

    # ---- reading -------------------------------------------------------------------------

    def _reader(self) -> sqlite3.Connection:
        """A connection of the calling thread's own for reads (the writer's connection may be
        inside a transaction on its thread)."""
        conn = getattr(self._readers, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                   timeout=self.busy_timeout_s)
            self._readers.conn = conn
            self._reader_conns.append(conn)
        return conn

    def low_marks(self) -> dict[str, int]:
        return dict(self._reader().execute("SELECT source, low FROM sources"))

    def totals(self) -> dict[str, int]:
        totals = {"readings": 0, "power_writes": 0, "rejected": 0}
        totals.update(self._reader().execute("SELECT name, n FROM totals"))
        return totals

    def readings(self, meters: list[str], t0_us: int, t1_us: int) -> dict[str, np.ndarray]:
        """Stored readings of ``meters`` with t0 <= ts_us <= t1, by meter then time."""
        rows = []
        for ip in meters:
            rows += self._reader().execute(
                "SELECT m.ip, r.ts_us, r.value FROM readings r JOIN meters m ON m.id = r.meter_id"
                " WHERE m.ip = ? AND r.ts_us BETWEEN ? AND ? ORDER BY r.ts_us",
                (ip, t0_us, t1_us)).fetchall()
        return _columns(rows, ("meter", "ts_us", "value"), ("S", np.int64, np.float64))

    def power(self, circuits: list[str], t0_us: int, t1_us: int) -> dict[str, np.ndarray]:
        """Stored power points of ``circuits`` with t0 <= ts_us <= t1, by circuit then time."""
        rows = []
        for name in circuits:
            rows += self._reader().execute(
                "SELECT c.name, p.ts_us, p.watts, p.volts, p.amps FROM power p"
                " JOIN circuits c ON c.id = p.circuit_id WHERE c.name = ?"
                " AND p.ts_us BETWEEN ? AND ? ORDER BY p.ts_us", (name, t0_us, t1_us)).fetchall()
        return _columns(rows, ("circuit", "ts_us", "watts", "volts", "amps"),
                        ("S", np.int64, np.float64, np.float64, np.float64))

    def rollup(self, kind: str, resolution: str, names: list[str], t0_us: int,
               t1_us: int) -> dict[str, np.ndarray]:
        """Per-minute (``1m``) or per-hour (``1h``) aggregates of ``readings`` (by meter) or
        ``power`` (by circuit; with ``wh``, energy) whose bucket starts in [t0, t1]: columns
        name, t (bucket start), n, sum, min, max[, wh], by name then time."""
        if kind not in ("readings", "power") or resolution not in ("1m", "1h"):
            raise ValueError(f"no rollup {kind}_{resolution}")
        owner, key, col = (("meters", "meter_id", "ip") if kind == "readings"
                           else ("circuits", "circuit_id", "name"))
        extra = ", r.wh" if kind == "power" else ""
        rows = []
        for name in names:
            rows += self._reader().execute(
                f"SELECT o.{col}, r.t, r.n, r.sum, r.min, r.max{extra} FROM {kind}_{resolution} r"
                f" JOIN {owner} o ON o.id = r.{key} WHERE o.{col} = ? AND r.t BETWEEN ? AND ?"
                f" ORDER BY r.t", (name, t0_us, t1_us)).fetchall()
        names_ = ("name", "t", "n", "sum", "min", "max") + (("wh",) if extra else ())
        types = ("S", np.int64, np.int64) + (np.float64,) * (len(names_) - 3)
        return _columns(rows, names_, types)

    # ---- history and export (the dashboard, `wattflow export`) ---------------------------
    # Reads that return a bounded result whatever the range: rows aggregated into buckets, the
    # rollups' energy over any range, and every row of a range a chunk at a time.

    def buckets(self, kind: str, names: list[str], t0_us: int, t1_us: int,
                step_us: int) -> dict[str, np.ndarray]:
        """Stored ``readings`` (``value``, by meter) or ``power`` (``watts``, by circuit) with
        t0 <= ts_us <= t1, aggregated in buckets of ``step_us`` aligned to 1970 (a row is in
        the bucket starting at ts_us - ts_us % step_us): one row per name and bucket that holds
        rows, columns name, t (bucket start), n, sum, min, max, first, last (the earliest and
        latest ts_us in the bucket), by name (in the order given) then t."""
        if kind not in ("readings", "power") or step_us < 1:
            raise ValueError(f"no buckets of {kind} by {step_us} us")
        value, owner = (("value", "meter_id IN (SELECT id FROM meters WHERE ip = ?)")
                        if kind == "readings" else
                        ("watts", "circuit_id IN (SELECT id FROM circuits WHERE name = ?)"))
        sql = (f"SELECT ts_us - ts_us % ? AS b, count(*), sum({value}), min({value}),"
               f" max({value}), min(ts_us), max(ts_us) FROM {kind} WHERE {owner}"
               f" AND ts_us BETWEEN ? AND ? GROUP BY b ORDER BY b")
        rows = []
        for name in names:
            rows += [(name, *r) for r in self._reader().execute(
                sql, (step_us, name, t0_us, t1_us))]
        return _columns(rows, ("name", "t", "n", "sum", "min", "max", "first", "last"),
                        ("S", np.int64, np.int64, np.float64, np.float64, np.float64,
                         np.int64, np.int64))

    def held_wh(self, circuits: list[str], t0_us: int, t1_us: int) -> dict[str, float]:
        """Energy in Wh of each circuit's points with t0 <= ts_us < t1, as the rollups count
        it: each point's watts held until the circuit's next point (which may lie after t1),
        nothing when that is more than ENERGY_GAP_US away or there is none yet. (A minute's
        ``wh`` in ``power_1m`` is held_wh over that minute.) Circuits without points: 0."""
        out = {}
        for name in circuits:
            row = self._reader().execute(
                "SELECT total(CASE WHEN nxt - ts_us <= ? THEN watts * (nxt - ts_us) END) / 3.6e9"
                " FROM (SELECT ts_us, watts, LEAD(ts_us) OVER (PARTITION BY circuit_id"
                "       ORDER BY ts_us) AS nxt FROM power WHERE circuit_id IN"
                "       (SELECT id FROM circuits WHERE name = ?) AND ts_us >= ? AND ts_us < ?)"
                " WHERE ts_us < ?",
                (ENERGY_GAP_US, name, t0_us, t1_us + ENERGY_GAP_US, t1_us)).fetchone()
            out[name] = row[0]
        return out

    def latest(self, kind: str, names: list[str]) -> dict[str, np.ndarray]:
        """The newest stored row of each name that has one: columns name, ts_us, and value
        (``readings``, by meter) or watts, volts, amps (``power``, by circuit), in the order
        given. (An index seek per meter or circuit row, whatever the table's size.)"""
        if kind == "readings":
            cols, owners, sql = ("value",), "SELECT id FROM meters WHERE ip = ?", (
                "SELECT ts_us, value FROM readings WHERE meter_id = ? ORDER BY ts_us DESC"
                " LIMIT 1")
        elif kind == "power":
            cols, owners, sql = ("watts", "volts", "amps"), (
                "SELECT id FROM circuits WHERE name = ?"), (
                "SELECT ts_us, watts, volts, amps FROM power WHERE circuit_id = ?"
                " ORDER BY ts_us DESC LIMIT 1")
        else:
            raise ValueError(f"no latest {kind}")
        rows = []
        for name in names:
            found = [r for (oid,) in self._reader().execute(owners, (name,)).fetchall()
                     for r in self._reader().execute(sql, (oid,)).fetchall()]
            if found:
                rows.append((name, *max(found)))
        return _columns(rows, ("name", "ts_us", *cols),
                        ("S", np.int64) + (np.float64,) * len(cols))

    def iter_readings(self, meters: list[str], t0_us: int, t1_us: int,
                      chunk: int = 50_000) -> Iterator[dict[str, np.ndarray]]:
        """``readings(meters, t0, t1)`` a chunk at a time: column dicts of at most ``chunk``
        rows (meter, ts_us, value), by meter (in the order given) then time (rows of one
        time in the order stored). Each chunk is a query of its own (no read transaction is
        held between chunks), continuing after the last row given: rows written meanwhile
        may or may not appear, none appears twice."""
        for ip in meters:
            ids = [r[0] for r in self._reader().execute("SELECT id FROM meters WHERE ip = ?",
                                                        (ip,))]
            if not ids:
                continue
            last_ts, last_row = t0_us - 1, -1
            while True:
                rows = self._reader().execute(
                    "SELECT rowid, ts_us, value FROM readings WHERE meter_id = ? AND ts_us >= ?"
                    " AND ts_us <= ? AND (ts_us > ? OR rowid > ?) ORDER BY ts_us, rowid"
                    " LIMIT ?", (ids[0], max(last_ts, t0_us), t1_us, last_ts, last_row,
                                 chunk)).fetchall()
                if not rows:
                    break
                last_row, last_ts = rows[-1][0], rows[-1][1]
                yield _columns([(ip, ts, v) for _, ts, v in rows], ("meter", "ts_us", "value"),
                               ("S", np.int64, np.float64))
                if len(rows) < chunk:
                    break

    def iter_power(self, circuits: list[str], t0_us: int, t1_us: int,
                   chunk: int = 50_000) -> Iterator[dict[str, np.ndarray]]:
        """``power(circuits, t0, t1)`` a chunk at a time: column dicts of at most ``chunk``
        rows (circuit, ts_us, watts, volts, amps), by circuit (in the order given) then time.
        Each chunk is a query of its own, as for ``iter_readings``."""
        names = ("circuit", "ts_us", "watts", "volts", "amps")
        types = ("S", np.int64, np.float64, np.float64, np.float64)
        for name in circuits:
            ids = [r[0] for r in self._reader().execute(
                "SELECT id FROM circuits WHERE name = ? ORDER BY id", (name,))]
            # a name several circuit rows carry (its meters changed): their points by time
            rows = heapq.merge(*(self._power_rows(cid, t0_us, t1_us, chunk) for cid in ids))
            while part := [(name, *r) for _, r in zip(range(chunk), rows, strict=False)]:
                yield _columns(part, names, types)

    def _power_rows(self, cid: int, t0_us: int, t1_us: int, chunk: int) -> Iterator[tuple]:
        last = t0_us - 1
        while True:
            rows = self._reader().execute(
                "SELECT ts_us, watts, volts, amps FROM power WHERE circuit_id = ? AND ts_us > ?"
                " AND ts_us <= ? ORDER BY ts_us LIMIT ?", (cid, last, t1_us, chunk)).fetchall()
            yield from rows
            if len(rows) < chunk:
                return
            last = rows[-1][0]

    def close(self) -> None:
        self._stop.set()
        if self._checkpointer is not None:
            self._checkpointer.join()
            try:
                self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.OperationalError as exc:  # a full disk: the WAL stays, nothing lost
                log.warning("final WAL checkpoint failed: %s", exc)
        for conn in self._reader_conns:
            conn.close()
        if self.conn not in self._reader_conns:
            self.conn.close()


def _has_table(conn: sqlite3.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                        (name,)).fetchone() is not None


def _statements(script: str) -> list[str]:
    """The statements of a script (``executescript`` would commit the open transaction)."""
    out, current = [], []
    for line in script.splitlines():
        current.append(line)
        if sqlite3.complete_statement("\n".join(current)):
            out.append("\n".join(current))
            current = []
    return out


def _is_full(exc: sqlite3.Error) -> bool:
    return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "full" in str(exc)


@functools.cache
def _insert_sql(table: str, names: tuple[str, ...], rows: int, upsert: tuple[str, ...]) -> str:
    one = "(" + ", ".join("?" * len(names)) + ")"
    sql = f"INSERT INTO {table} ({', '.join(names)}) VALUES " + ", ".join([one] * rows)
    if upsert:
        rest = [n for n in names if n not in upsert]
        sql += (f" ON CONFLICT ({', '.join(upsert)}) DO UPDATE SET "
                + ", ".join(f"{n} = excluded.{n}" for n in rest))
    return sql


def _held_wh(ts: np.ndarray, watts: np.ndarray) -> np.ndarray:
    """Each point's energy (Wh) held until the next one of ``ts`` (sorted), unless that is
    more than ENERGY_GAP_US away; the last one's: 0 (its next is not in ``ts``)."""
    if not len(ts):
        return np.empty(0, np.float64)
    gap = np.diff(ts)
    return np.append(np.where(gap <= ENERGY_GAP_US, watts[:-1] * gap, 0.0) / 3.6e9, 0.0)


def _text(x) -> str:
    return x.decode() if isinstance(x, bytes | np.bytes_) else str(x)


def _columns(rows: list[tuple], names: tuple[str, ...], dtypes: tuple) -> dict[str, np.ndarray]:
    cols = list(zip(*rows, strict=True)) if rows else [()] * len(names)
    out = {}
    for name, dtype, col in zip(names, dtypes, cols, strict=True):
        if dtype == "S":
            out[name] = np.array([s.encode() for s in col], dtype="S") if col else \
                np.empty(0, "S1")
        else:
            out[name] = np.array(col, dtype=dtype)
    return out
