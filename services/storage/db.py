"""SQLite persistence: one transaction per batch. The schema is documented in README.md."""

from __future__ import annotations

import functools
import queue
import sqlite3
import threading
from pathlib import Path

import numpy as np

from shared.config import Meter

CHECKPOINT_EVERY_S = 0.5
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
    amps       REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS power_circuit_ts ON power (circuit_id, ts_us);
CREATE VIEW IF NOT EXISTS power_view AS
    SELECT c.name AS circuit, p.ts_us AS ts_us,
           strftime('%Y-%m-%d %H:%M:%f', p.ts_us / 1e6, 'unixepoch') AS time,
           p.watts AS watts, p.volts AS volts, p.amps AS amps,
           c.v_meter AS v_meter, c.a_meter AS a_meter
    FROM power p JOIN circuits c ON c.id = p.circuit_id;
CREATE TABLE IF NOT EXISTS rejected (
    t_recv  REAL NOT NULL,              -- when ingest received the line (Unix seconds)
    peer    TEXT NOT NULL,              -- address:port of the sending connection
    reason  TEXT NOT NULL,              -- code: malformed, bad_timestamp, unknown_meter, ...
    message TEXT NOT NULL,              -- a sentence for people
    line    BLOB NOT NULL               -- the line as received
);
CREATE TABLE IF NOT EXISTS applied (
    source TEXT PRIMARY KEY,            -- an ingest run's id
    seq    INTEGER NOT NULL             -- its last raw batch applied (in the same transaction)
);
CREATE VIEW IF NOT EXISTS readings_view AS
    SELECT m.ip AS meter, m.unit AS unit, r.ts_us AS ts_us,
           strftime('%Y-%m-%d %H:%M:%f', r.ts_us / 1e6, 'unixepoch') AS time, r.value AS value
    FROM readings r JOIN meters m ON m.id = r.meter_id;
"""


class Database:
    def __init__(self, path: str, meters: tuple[Meter, ...]):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL: a commit survives a crash of this process (what acks promise); a power cut
        # may lose the last commits. The fsync happens at checkpoints, which a thread of their
        # own runs (with its own connection, outside the GIL), so commits never wait for one.
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.execute("PRAGMA wal_autocheckpoint=0")
        # parameters one statement may bind: 32766 since SQLite 3.32, 999 before
        self.max_params = self.conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
        self.path = path
        self._stop = threading.Event()
        self._checkpointer = threading.Thread(target=self._checkpoint_loop, name="checkpoint",
                                              daemon=True)
        self._checkpointer.start()
        self.conn.executescript(SCHEMA)
        self.conn.executemany(
            "INSERT INTO meters (ip, unit, range_start, range_stop) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (ip) DO UPDATE SET unit = excluded.unit,"
            " range_start = excluded.range_start, range_stop = excluded.range_stop",
            [(m.ip, m.unit, m.range_start, m.range_stop) for m in meters],
        )
        self.circuit_ids: dict[tuple[str, str, str], int] = {}
        ids = dict(self.conn.execute("SELECT ip, id FROM meters"))
        # meter index in the config's table -> row id in `meters`
        self.meter_ids = np.array([ids[m.ip] for m in meters], dtype=np.int64)

    def write(
        self,
        readings: tuple[np.ndarray, np.ndarray, np.ndarray] | None,
        power: list[dict] | None,
        rejected: list[tuple] | None,
        applied: dict[str, int] | None = None,
    ) -> None:
        """Everything of one batch in one transaction, with the raw sequence numbers it covers:
        after a crash the database holds a batch's rows exactly when it holds its number."""
        with self.conn:
            self.conn.execute("BEGIN")
            if applied:
                self.conn.executemany(
                    "INSERT INTO applied (source, seq) VALUES (?, ?)"
                    " ON CONFLICT (source) DO UPDATE SET seq = excluded.seq",
                    applied.items())
            if readings is not None and len(readings[0]):
                meter_idx, ts_us, value = readings
                self._insert("readings", ("meter_id", "ts_us", "value"),
                             (self.meter_ids[meter_idx], ts_us, value))
            for cols in power or ():
                self._insert("power", ("circuit_id", "ts_us", "watts", "volts", "amps"),
                             (self._circuit_ids(cols), *(cols[k] for k in
                                                         ("ts_us", "watts", "volts", "amps"))))
            if rejected:
                self.conn.executemany(
                    "INSERT INTO rejected (t_recv, peer, reason, message, line)"
                    " VALUES (?, ?, ?, ?, ?)", rejected)

    def _insert(self, table: str, names: tuple[str, ...], columns) -> None:
        """Insert rows given as columns, many rows per statement: one ``INSERT ... VALUES
        (...), (...), ...`` of a thousand rows costs SQLite (and the binding loop) far less
        than a thousand one-row executions: about 1.7x the rows/s of a plain ``executemany``
        (bench/run.py measures both). What is left of a batch goes in smaller statements, so
        only three statement shapes exist per table, all kept in the connection's cache."""
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
            if end > pos:
                self.conn.executemany(_insert_sql(table, names, rows),
                                      [values[i : i + step] for i in range(pos, end, step)])
                pos = end

    def _circuit_ids(self, cols) -> list[int]:
        """Row ids of the batch's circuits (name, V meter, A meter), made on first sight."""
        keys = list(zip(_pylist(cols["circuit"]), _pylist(cols["v_meter"]),
                        _pylist(cols["a_meter"]), strict=True))
        for key in set(keys) - self.circuit_ids.keys():
            self.conn.execute("INSERT OR IGNORE INTO circuits (name, v_meter, a_meter)"
                              " VALUES (?, ?, ?)", key)
            self.circuit_ids[key] = self.conn.execute(
                "SELECT id FROM circuits WHERE name = ? AND v_meter = ? AND a_meter = ?",
                key).fetchone()[0]
        ids = self.circuit_ids
        return [ids[k] for k in keys]

    def totals(self) -> dict[str, int]:
        """Rows in the database now, by table, and rejections by reason (read once at start)."""
        one = self.conn.execute
        totals = {"readings": one("SELECT count(*) FROM readings").fetchone()[0],
                  "power": one("SELECT count(*) FROM power").fetchone()[0],
                  "rejected": one("SELECT count(*) FROM rejected").fetchone()[0]}
        for reason, n in one("SELECT reason, count(*) FROM rejected GROUP BY reason"):
            totals[f"rejected.{reason}"] = n
        return totals

    def applied(self) -> dict[str, int]:
        return dict(self.conn.execute("SELECT source, seq FROM applied"))

    def _checkpoint_loop(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            while not self._stop.wait(CHECKPOINT_EVERY_S):
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        finally:
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._checkpointer.join()
        self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.conn.close()


class Writer:
    """``Database.write`` on a thread of its own. SQLite releases the GIL while it executes a
    statement (a thousand rows at a time here), so the next batch is parsed and published on
    the main thread while this one goes into the database: storage uses a second core.
    At most ``depth`` batches wait; ``submit`` blocks beyond that, so the bus queues instead
    (and ingest, whose unacked lines are capped, feels it). A failed write stops the thread;
    ``check`` (and ``submit``) raise it again in the caller's thread."""

    def __init__(self, db: Database, depth: int = 2):
        self.db = db
        self.jobs: queue.Queue = queue.Queue(maxsize=depth)
        self.done: queue.SimpleQueue = queue.SimpleQueue()
        self.in_flight = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="db-writer", daemon=True)
        self.thread.start()

    def submit(self, tag, *args) -> None:
        """Queue ``db.write(*args)``; ``tag`` comes back from ``completed`` once committed."""
        self._put((tag, args))
        self.in_flight += 1

    def completed(self) -> list:
        """The tags of the writes committed since the last call, in order (also after a
        failure: what was committed before it)."""
        tags = []
        while True:
            try:
                tags.append(self.done.get_nowait())
            except queue.Empty:
                self.in_flight -= len(tags)
                return tags

    def check(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"database write failed: {self.error!r}") from self.error

    def close(self) -> None:
        """Finish every queued write (``completed`` then returns the last tags); stops at once
        if the thread has failed."""
        try:
            self._put(None)
        except RuntimeError:
            pass  # the thread has stopped; ``check`` says why
        self.thread.join()

    def _put(self, item) -> None:
        """Put, blocking while the queue is full, unless the thread fails meanwhile (nobody
        would take from the queue again)."""
        while True:
            self.check()
            try:
                self.jobs.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            tag, args = job
            try:
                self.db.write(*args)
            except BaseException as exc:  # raised again on the main thread
                self.error = exc
                return
            self.done.put(tag)


@functools.cache
def _insert_sql(table: str, names: tuple[str, ...], rows: int) -> str:
    one = "(" + ", ".join("?" * len(names)) + ")"
    return f"INSERT INTO {table} ({', '.join(names)}) VALUES " + ", ".join([one] * rows)


def _pylist(col) -> list:
    if isinstance(col, np.ndarray):
        if col.dtype.kind == "S":
            return [b.decode() for b in col.tolist()]
        return col.tolist()
    return list(col)
