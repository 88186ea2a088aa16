"""storage: validate ``raw`` lines, persist good readings and ``power``, publish ``reading`` and
``rejected``, and ``ack`` to ingest what is committed.

Many bus messages go into one database transaction when they queue up; a writer thread commits
it while the main thread parses and publishes the next (acks follow the commit). Each ingest
stream is applied once and in order: its last applied sequence number is written in the same
transaction as its rows, so a crash at any point leaves the database consistent with what was
acked, and ingest resends the rest."""

from __future__ import annotations

import logging

import numpy as np

from services.storage.db import Database, Writer
from shared import parsing, topics
from shared.config import Config
from shared.messages import Message
from shared.service import Runtime

log = logging.getLogger("storage")
DRAIN_QUIET_MS = 300  # on stop: wait this long with no message before closing


class Storage:
    def __init__(self, rt: Runtime):
        self.rt = rt
        self.table = parsing.MeterTable(rt.cfg.meters)
        self.db = Database(rt.cfg.storage["path"], rt.cfg.meters)
        self.sub = rt.subscriber([topics.RAW, topics.POWER])
        self.pub = rt.publisher()
        self.batch_max = rt.cfg.storage["batch_max"]
        self.writer = Writer(self.db)
        # ingest run -> last raw batch taken (handed to the writer) / committed (acked)
        self.applied = self.db.applied()
        self.committed = dict(self.applied)
        # what the database holds in all (counters restart with the process; these do not)
        self.totals = self.db.totals()
        rt.gauges["db"] = self.totals

    def step(self, timeout_ms: int) -> int:
        if self.writer.in_flight:  # come back soon to ack what the writer commits
            timeout_ms = min(timeout_ms, 2)
        msgs = self.sub.recv_batch(timeout_ms, self.batch_max)
        if msgs:
            self.handle(msgs)
        self.finish(self.writer.completed())
        self.writer.check()  # a failed write ends the service (ingest resends what it lost)
        return len(msgs)

    def finish(self, batches) -> None:
        """Count and ack what the writer has committed."""
        for readings, power, rejected, applied, seen in batches:
            self.committed.update(applied)
            self._count(readings, power, rejected)
            if seen:
                self.ack(seen)

    def close(self) -> None:
        """Commit (and ack) what the writer holds, then close the database."""
        try:
            self.writer.close()
            self.finish(self.writer.completed())
            self.writer.check()
        finally:
            self.db.close()

    def handle(self, msgs: list[Message]) -> None:
        metres, stamps, values, recv_times = [], [], [], []
        rejected: list[tuple] = []
        power: list[dict] = []
        applied: dict[str, int] = {}
        seen: set[str] = set()
        for msg in msgs:
            if msg.topic == topics.POWER:
                power.append(msg.data)
                continue
            seen.add(msg.src)
            if not self._in_order(msg, applied):
                continue
            applied[msg.src] = msg.seq
            cols = msg.data
            too_long = cols.get("too_long")
            if too_long:  # ingest decided these; they are stored and published like the rest
                rejected.extend(
                    (t, peer, parsing.TOO_LONG, message, ln) for ln, message, peer, t in
                    zip(too_long["line"], too_long["message"], too_long["peer"],
                        too_long["t_recv"], strict=True))
            if not cols["data"]:
                continue
            # one parse per message: the chunks (each from one connection) joined
            blocks = cols["data"]
            chunk_of_line = np.repeat(np.arange(len(blocks)),
                                      [block.count(b"\n") for block in blocks])
            parsed = parsing.parse_block(b"".join(blocks), self.table)
            t_recv = cols["t_recv"]
            metres.append(parsed.meter)
            stamps.append(parsed.ts_us)
            values.append(parsed.value)
            recv_times.append(t_recv[chunk_of_line[parsed.line]])
            for (line, r), i in zip(parsed.rejects, parsed.reject_lines, strict=True):
                chunk = chunk_of_line[i]
                rejected.append((float(t_recv[chunk]), cols["peer"][chunk], r.reason,
                                 r.message, line))
        readings = None
        if metres:
            readings = (np.concatenate(metres), np.concatenate(stamps), np.concatenate(values))
        # Readings go out before the commit: power need not wait for the disk. Should this
        # process die before committing, ingest resends the batch and power, which keeps the
        # latest reading per meter by measurement time, ignores what it has seen.
        self.publish(readings, recv_times, rejected)
        self.writer.submit((readings, power, rejected, applied, seen),
                           readings, power, rejected, applied)
        self.applied.update(applied)

    def publish(self, readings, recv_times, rejected) -> None:
        if readings is not None and len(readings[0]):
            meter_idx, ts_us, value = readings
            self.pub.send(topics.READING, {
                "meter": self.table.names[meter_idx],
                "unit": self.table.units[meter_idx],
                "ts_us": ts_us,
                "value": value,
                "t_recv": np.concatenate(recv_times),
            })
        if rejected:
            t_recv, peer, reason, message, line = zip(*rejected, strict=True)
            self.pub.send(topics.REJECTED, {"line": list(line), "reason": list(reason),
                                            "message": list(message), "peer": list(peer),
                                            "t_recv": np.array(t_recv)})

    def _in_order(self, msg: Message, applied: dict[str, int]) -> bool:
        """Apply each ingest run's batches once, in order. Anything else is dropped here and
        comes again: ingest resends from the first batch it has no ack for."""
        last = applied.get(msg.src, self.applied.get(msg.src))
        if last is None:  # a new ingest run: start at the oldest batch it still holds
            expected = msg.data.get("base", 0)
        else:
            expected = last + 1
        if msg.seq == expected:
            return True
        self.rt.counters["duplicates" if msg.seq < expected else "out_of_order"] += 1
        return False

    def ack(self, sources) -> None:
        acked = [(s, self.committed[s]) for s in sources if s in self.committed]
        if acked:
            src, seq = zip(*acked, strict=True)
            self.pub.send(topics.ACK, {"source": list(src), "seq": list(seq)})

    def _count(self, readings, power, rejected) -> None:
        c = self.rt.counters
        if readings is not None:
            c["readings_stored"] += len(readings[0])
        c["power_stored"] += sum(len(p["ts_us"]) for p in power)
        c["lines_rejected"] += len(rejected)
        for r in rejected:
            c[f"rejected.{r[2]}"] += 1
        c["transactions"] += 1
        t = self.totals
        if readings is not None:
            t["readings"] += len(readings[0])
        t["power"] += sum(len(p["ts_us"]) for p in power)
        for r in rejected:
            t["rejected"] += 1
            t[f"rejected.{r[2]}"] = t.get(f"rejected.{r[2]}", 0) + 1


def run(cfg: Config) -> int:
    rt = Runtime("storage", cfg)
    rt.install_signals()
    storage = Storage(rt)
    log.info("storage up: database %s, %d meters", cfg.storage["path"], len(cfg.meters))
    try:
        while not rt.stopping.is_set():
            storage.step(100)
            rt.tick()
        # finish what is already on its way: until the bus is quiet and all is committed
        while storage.step(DRAIN_QUIET_MS) or storage.writer.in_flight:
            pass
    finally:
        try:
            storage.close()
        finally:
            rt.close()
    log.info("storage stopped: %d readings stored, %d lines rejected",
             rt.counters["readings_stored"], rt.counters["lines_rejected"])
    return 0
