"""storage: validate ``raw`` lines, persist good readings and ``power``, publish ``reading`` and
``rejected``, and ``ack`` to ingest what is committed.

Many bus messages go into one database transaction when they queue up; a writer thread commits
it while the main thread parses and publishes the next (acks follow the commit). Every batch
carries its key (its stream's id and its number), written in the same transaction as its rows:
a batch that comes again (resent by ingest, or applied meanwhile by another replica) is skipped,
so a crash at any point leaves the database consistent with what was acked, and ingest resends
the rest. Below ``storage.min_free_mb`` of free disk, storage takes no new batches (ingest
keeps them journaled) until space returns; ``wattflow status`` and ``wattflow health storage``
say why.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time

import numpy as np

from services.storage.writer import Writer
from shared import parsing, topics
from shared.config import Config
from shared.db import PowerBatch, RawBatch, Retention, open_database, sqlite_path, storage_url
from shared.messages import Message
from shared.service import Runtime

log = logging.getLogger("storage")
POWER_COLUMNS = ("circuit", "ts_us", "watts", "volts", "amps", "v_meter", "a_meter")
DRAIN_QUIET_MS = 300  # on stop: wait this long with no message before closing
GUARD_EVERY_S = 1.0  # free disk space looked at this often


class Storage:
    def __init__(self, rt: Runtime):
        self.rt = rt
        cfg = rt.cfg.storage
        self.table = parsing.MeterTable(rt.cfg.meters)
        self.db = open_database(storage_url(cfg), rt.cfg.meters, rt.cfg.circuits,
                                Retention.from_config(cfg), wal_max_mb=cfg["wal_max_mb"])
        self.work = rt.puller()  # raw and power batches: a share of the work queue
        self.pub = rt.publisher()
        self.batch_max = cfg["batch_max"]
        self.writer = Writer(self.db)
        self.rollups = Rollups(self.db, self.writer, rt)
        # stream -> every batch numbered up to this one is in the database (a cache: the
        # database decides; this only spares parsing what is surely there)
        self.lows = self.db.low_marks()
        # what the database holds in all (counters restart with the process; these do not)
        self.totals = self.db.totals()
        self.min_free = int(cfg["min_free_mb"] * (1 << 20))
        self.paused: str | None = None
        self.next_guard = 0.0
        rt.gauges["db"] = self.totals

    def step(self, timeout_ms: int) -> int:
        if self.writer.in_flight:  # come back soon to ack what the writer commits
            timeout_ms = min(timeout_ms, 2)
        self.guard()
        msgs: list[Message] = []
        if self.paused or self.writer.disk_full:
            time.sleep(timeout_ms / 1000)
        else:
            msgs = self.work.recv_batch(timeout_ms, self.batch_max)
        if msgs:
            self.handle(msgs)
        self.finish(self.writer.completed())
        self.writer.check()  # a failed write ends the service (ingest resends what it lost)
        return len(msgs)

    def guard(self) -> None:
        """Below ``min_free_mb`` of free disk: take no new batches until space returns."""
        now = time.monotonic()
        if now < self.next_guard:
            return
        self.next_guard = now + GUARD_EVERY_S
        free = self.db.free_bytes()
        state = self.db.upkeep_state()
        self.rt.gauges.update(state)
        # the database's totals (other replicas write too); what this one stored is counted
        self.totals = self.rt.gauges["db"] = self.db.totals()
        if free is None:
            return
        self.rt.gauges["free_mb"] = round(free / (1 << 20), 1)
        if not self.paused and free < self.min_free:
            self.paused = (f"paused: {free / (1 << 20):.0f} MB free on the database's disk, "
                           f"below storage.min_free_mb ({self.min_free / (1 << 20):.0f} MB)")
            log.error("%s; ingest keeps the batches until space returns", self.paused)
        elif self.paused and free >= self.min_free * 1.1 + (1 << 20):
            log.warning("free disk space back (%.0f MB): taking batches again", free / (1 << 20))
            self.paused = None
        problem = self.paused or (f"disk full: {self.writer.disk_full}"
                                  if self.writer.disk_full else None)
        self.rt.problem = problem
        self.rt.gauges["paused"] = problem

    def handle(self, msgs: list[Message]) -> None:
        batches: list[RawBatch | PowerBatch] = []
        known: list[tuple[str, int]] = []  # raw batches surely in the database already
        for msg in msgs:
            if msg.seq <= self.lows.get(msg.src, -1):
                known.append((msg.src, msg.seq))
            elif msg.topic == topics.POWER:
                d = msg.data
                batches.append(PowerBatch({k: d[k] for k in POWER_COLUMNS}, msg.src, msg.seq,
                                          d.get("base", 0), d.get("progress", {})))
            else:
                batches.append(self.parse(msg))
        if known:
            self.rt.counters["duplicates"] += len(known)
            self.ack(known)
        if not batches:
            return
        # Readings go out before the commit: power need not wait for the disk. Should this
        # process die before committing, ingest resends the batch; power's result depends on
        # the set of readings, not on how often one arrives.
        self.publish([b for b in batches if isinstance(b, RawBatch)])
        self.writer.submit(batches, batches)

    def parse(self, msg: Message) -> RawBatch:
        cols = msg.data
        batch = RawBatch(msg.src, msg.seq, cols.get("base", 0), _EMPTY_I, _EMPTY_I, _EMPTY_F)
        framed = cols.get("rejected") or {}
        senders = sorted({s for s in (*cols.get("sender", ()), *framed.get("sender", ()))
                          if s is not None})
        index = {s: i for i, s in enumerate(senders)}
        batch.senders = senders
        if framed:  # ingest's framing decided these; stored and published like the rest
            batch.rejected.extend(
                (float(t), peer, reason, message, ln) for ln, reason, message, peer, t in
                zip(framed["line"], framed["reason"], framed["message"], framed["peer"],
                    framed["t_recv"], strict=True))
            if senders:
                batch.rejected_sender = [index.get(x, -1) for x in framed["sender"]]
                batch.rejected_no = [-1 if n is None else n for n in framed["line_no"]]
        blocks = cols["data"]
        if not blocks:
            batch.reading_sender, batch.reading_no = _EMPTY_I, _EMPTY_I
            return batch
        # one parse per message: the chunks (each from one connection) joined
        counts = [b.count(b"\n") for b in blocks]
        chunk_of_line = np.repeat(np.arange(len(blocks)), counts)
        parsed = parsing.parse_block(b"".join(blocks), self.table)
        t_recv = cols["t_recv"]
        batch.meter, batch.ts_us, batch.value = parsed.meter, parsed.ts_us, parsed.value
        batch.t_recv = t_recv[chunk_of_line[parsed.line]]
        if senders:  # the acknowledged mode: each line's sender and number
            line_sender = np.repeat([index.get(x, -1) for x in cols["sender"]], counts)
            line_no = np.concatenate([np.full(n, -1, np.int64) if nos is None else nos
                                      for nos, n in zip(cols["line_no"], counts, strict=True)])
            batch.reading_sender = line_sender[parsed.line]
            batch.reading_no = line_no[parsed.line]
        for (line, r), i in zip(parsed.rejects, parsed.reject_lines, strict=True):
            chunk = chunk_of_line[i]
            batch.rejected.append((float(t_recv[chunk]), cols["peer"][chunk], r.reason,
                                   r.message, line))
            if senders:
                batch.rejected_sender.append(int(line_sender[i]))
                batch.rejected_no.append(int(line_no[i]))
        return batch

    def publish(self, raws: list[RawBatch]) -> None:
        with_readings = [b for b in raws if len(b.meter)]
        if with_readings:
            meter_idx = np.concatenate([b.meter for b in with_readings])
            self.pub.send(topics.READING, {
                "meter": self.table.names[meter_idx],
                "unit": self.table.units[meter_idx],
                "ts_us": np.concatenate([b.ts_us for b in with_readings]),
                "value": np.concatenate([b.value for b in with_readings]),
                "t_recv": np.concatenate([b.t_recv for b in with_readings]),
            })
        rejected = [r for b in raws for r in b.rejected]
        if rejected:
            t_recv, peer, reason, message, line = zip(*rejected, strict=True)
            self.pub.send(topics.REJECTED, {"line": list(line), "reason": list(reason),
                                            "message": list(message), "peer": list(peer),
                                            "t_recv": np.array(t_recv)})

    def finish(self, completed) -> None:
        """Count and ack what the writer has committed."""
        for batches, applied in completed:
            keys = []
            for b, fresh in zip(batches, applied, strict=True):
                keys.append((b.source, b.seq))
                self.lows[b.source] = max(self.lows.get(b.source, -1), b.base - 1)
                if fresh:
                    self._count(b)
                else:
                    self.rt.counters["duplicates"] += 1
            self.rt.counters["transactions"] += 1
            if keys:
                self.ack(keys)

    def ack(self, keys: list[tuple[str, int]]) -> None:
        source, seq = zip(*keys, strict=True)
        self.pub.send(topics.ACK, {"source": list(source), "seq": list(seq)})

    def _count(self, b: RawBatch | PowerBatch) -> None:
        c, t = self.rt.counters, self.totals
        if isinstance(b, PowerBatch):
            n = len(b.points["ts_us"])
            c["power_stored"] += n
            t["power_writes"] = t.get("power_writes", 0) + n
            return
        c["resent_lines_skipped"] += b.resent
        c["readings_stored"] += len(b.meter)
        t["readings"] += len(b.meter)
        c["lines_rejected"] += len(b.rejected)
        t["rejected"] += len(b.rejected)
        for r in b.rejected:
            c[f"rejected.{r[2]}"] += 1
            t[f"rejected.{r[2]}"] = t.get(f"rejected.{r[2]}", 0) + 1
        c["batches_applied"] += 1

    def close(self) -> None:
        """Commit (and ack) what the writer holds, then close the database."""
        try:
            self.rollups.stop()
            self.writer.close()
            self.finish(self.writer.completed())
            self.writer.check()
        finally:
            self.db.close()


class Rollups:
    """The recompute of power rollups (shared/db: minutes marked for it, then left alone a
    while, recomputed from the stored points; on SQLite only the minutes its writes could not
    keep up to date, on PostgreSQL all) on a thread of its own: the reading, which may take a
    while for a busy minute, never holds up the writer; the writer stores the result between
    two writes."""

    SETTLE_S = 10.0
    EVERY_S = 1.0

    def __init__(self, db, writer: Writer, rt: Runtime):
        self.db, self.writer, self.rt = db, writer, rt
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="rollups", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.wait(self.EVERY_S):
            try:
                read_at = time.time()
                rows = [(cid, t, self.db.power_minute(cid, t))
                        for cid, t in self.db.dirty_power_minutes(read_at - self.SETTLE_S)]
            except Exception:  # a failing read is logged and tried again next round
                log.exception("power rollups: reading failed")
                continue
            if rows:
                self.writer.upkeep(lambda rows=rows, at=read_at:
                                   self.db.store_power_rollups(rows, at))
                self.rt.counters["rollup_minutes"] += len(rows)

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join()


_EMPTY_I = np.empty(0, np.int64)
_EMPTY_F = np.empty(0, np.float64)


def sqlite_leader(rt: Runtime) -> object | None:
    """On SQLite one replica writes; the others wait as hot standbys. The writer holds an
    exclusive lock on ``<database>.lock`` (the kernel frees it when the process dies, also by
    kill -9), a standby tries to take it twice a second. Returns the held lock (keep it
    referenced), or None when stopping first. PostgreSQL: every replica writes (None needed)."""
    url = storage_url(rt.cfg.storage)
    if not url.startswith("sqlite"):
        return True
    path = sqlite_path(url) + ".lock"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    lock = open(path, "a+")  # noqa: SIM115 (held for the life of the process)
    said = False
    while not rt.stopping.is_set():
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if said:
                log.warning("taking over: this replica now writes %s", url)
            rt.gauges["role"] = "writer"
            return lock
        except OSError:
            if not said:
                log.info("standby: another storage replica writes %s (SQLite has one writer); "
                         "taking over when it stops", url)
                said = True
            rt.gauges["role"] = "standby"
            rt.tick()
            rt.stopping.wait(0.5)
    lock.close()
    return None


def run(cfg: Config) -> int:
    rt = Runtime("storage", cfg)
    rt.install_signals()
    leader = sqlite_leader(rt)
    if leader is None:  # stopped while standing by
        rt.close()
        return 0
    storage = Storage(rt)
    rt.gauges.setdefault("role", "writer")
    log.info("storage up: database %s, %d meters", storage.db.url, len(cfg.meters))
    try:
        while not rt.stopping.is_set():
            storage.step(100)
            rt.tick()
        # finish what is already on its way: until the bus is quiet and all is committed
        while storage.step(DRAIN_QUIET_MS) or storage.writer.in_flight:
            rt.tick()  # (stopping in order, not busy)
    finally:
        try:
            storage.close()
        finally:
            rt.close()
    log.info("storage stopped: %d readings stored, %d lines rejected",
             rt.counters["readings_stored"], rt.counters["lines_rejected"])
    return 0
