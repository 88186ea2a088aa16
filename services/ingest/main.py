"""ingest: accept meters' TCP connections, frame lines, publish them in batches on ``raw``.

Per chunk received (not per line) a connection's Framer (framing.py) splits off the unfinished
last line and cuts over-long lines (they travel in the batch as rejections); the rest joins the
pending batch. A batch is made as soon as the event loop has handled what its sockets had ready
(so a busy loop makes big batches and a quiet one sends at once), at most one per ``flush_ms``,
and at once whenever ``batch_lines`` lines wait or the bytes read but not yet journaled pass
``unjournaled_kb`` in all or ``unjournaled_kb_per_connection`` for one connection (what a
kill -9 of ingest can lose). Its Outbox (shared/outbox.py) numbers it, journals it, sends it
and keeps it until storage acks it (resending when acks stop coming). While nobody listens on
``raw`` or the bus is full, batches wait; once what ingest holds passes ``max_buffer_mb``,
connections stop being read, so meters feel TCP backpressure instead of losing lines.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

import numpy as np

from services.ingest.framing import Framer
from services.ingest.journal import Journal
from shared import topics
from shared.config import Config
from shared.outbox import Outbox
from shared.service import CannotStart, Port, Runtime

log = logging.getLogger("ingest")
READ_SIZE = 1 << 16
HOUSEKEEPING_S = 0.005  # acks, resends and gauges this often
STOP_GRACE_S = 2.0  # on stop: how long open connections may still deliver what they sent
ERROR_LOG_EVERY_S = 10.0  # a failing periodic task is logged at most this often


class Connection:
    """One meter's connection: its framer and what it has read but ingest not yet journaled."""

    def __init__(self, peer: str, max_line: int):
        self.peer = peer
        self.framer = Framer(max_line)
        self.unjournaled = 0


class Ingest:
    def __init__(self, rt: Runtime, journal: Journal):
        self.rt = rt
        self.cfg = rt.cfg.ingest
        self.pub = rt.publisher()
        self.outbox = Outbox(self._send, self.cfg["ack_timeout_s"], rt.counters, journal)
        next_seq, batches = journal.load()
        self.outbox.next_seq = next_seq
        self.outbox.restore(batches, _size)
        if batches:  # what the last run accepted and storage never confirmed
            log.info("journal: %d unacked batches (%d lines) from the last run, resending",
                     len(batches), self.outbox.lines)
            rt.counters["lines_recovered"] += self.outbox.lines
        self.chunks: list[tuple[str, float, bytes]] = []
        self.rejects: list[tuple[bytes, str, str, str, float]] = []  # line, reason, msg, peer, t
        self.pending_lines = self.pending_bytes = 0
        self.cap_bytes = int(self.cfg["max_buffer_mb"] * (1 << 20))
        self.unjournaled_max = int(self.cfg["unjournaled_kb"] * 1024)
        self.unjournaled_conn_max = int(self.cfg["unjournaled_kb_per_connection"] * 1024)
        self.read_size = min(READ_SIZE, self.unjournaled_conn_max)
        self.room = asyncio.Event()  # cleared while the buffer is full: stop reading sockets
        self.room.set()
        self.acks = rt.subscriber([topics.ACK])
        self.open: set[Connection] = set()
        self.tasks: set[asyncio.Task] = set()
        self.idle = asyncio.Event()  # set while no connection is open
        self.idle.set()
        self.min_gap = self.cfg["flush_ms"] / 1000  # between two batches
        self.last_flush = 0.0
        self.flush_handle: asyncio.Handle | None = None
        self.errors: dict[str, tuple[int, float]] = {}  # task -> (failures, last logged)

    # ---- connections -----------------------------------------------------------------------

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = "{}:{}".format(*writer.get_extra_info("peername")[:2])
        if len(self.open) >= self.cfg["max_connections"]:
            log.warning("refusing %s: already %d connections", peer, len(self.open))
            self.rt.counters["connections_refused"] += 1
            writer.close()
            return
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        conn = Connection(peer, self.cfg["max_line"])
        self.open.add(conn)
        self.tasks.add(asyncio.current_task())
        self.rt.counters["connections"] += 1
        self.idle.clear()
        log.debug("meter connected from %s", peer)
        try:
            why = await self._read_loop(reader, conn)
            self._take(conn, *conn.framer.end(orderly=why is None, why=why or ""))
        except (ConnectionError, OSError) as exc:
            log.info("connection from %s ended: %s", peer, exc)
            self._take(conn, *conn.framer.end(orderly=False, why=f"connection error: {exc}"))
        except asyncio.CancelledError:  # ingest is stopping and the peer is still sending
            self._take(conn, *conn.framer.end(orderly=False, why="ingest shut down"))
        finally:
            self.open.discard(conn)
            self.tasks.discard(asyncio.current_task())
            if not self.open:
                self.idle.set()
            writer.close()

    async def _read_loop(self, reader: asyncio.StreamReader, conn: Connection) -> str | None:
        """Read until the peer is done: None at an orderly EOF, else what ended it."""
        idle = self.cfg["idle_timeout_s"]
        while True:
            await self.room.wait()
            try:
                data = await asyncio.wait_for(reader.read(self.read_size), idle)
            except TimeoutError:
                log.info("closing %s: silent for %ss (half-open?)", conn.peer, idle)
                self.rt.counters["idle_closed"] += 1
                return f"silent for {idle:g} s, closed by ingest"
            if not data:
                return None
            self.rt.counters["bytes_in"] += len(data)
            self._take(conn, *conn.framer.feed(data))

    def _take(self, conn: Connection, block: bytes, rejects: list) -> None:
        """Lines (and rejections) framed from a connection join the pending batch."""
        now = time.time()
        for line, reason, message in rejects:
            self.rejects.append((line, reason, message, conn.peer, now))
            self.pending_lines += 1
            self.rt.counters["lines_in"] += 1
            self.rt.counters[f"rejected.{reason}"] += 1
        lines = block.count(b"\n")
        if lines:
            self.chunks.append((conn.peer, now, block))
            self.pending_lines += lines
            self.pending_bytes += len(block)
            conn.unjournaled += len(block)
            self.rt.counters["lines_in"] += lines
        if not (lines or rejects):
            return
        if (self.pending_lines >= self.cfg["batch_lines"]
                or self.pending_bytes >= self.unjournaled_max
                or conn.unjournaled >= self.unjournaled_conn_max):
            self.flush()
        else:
            self.schedule_flush()
        if self.buffered() >= self.cap_bytes and self.room.is_set():
            self.room.clear()
            self.rt.counters["backpressure_pauses"] += 1  # sockets not read until acks come

    # ---- batches ---------------------------------------------------------------------------

    def schedule_flush(self) -> None:
        """Flush once the loop has handled what else is ready now (call_soon runs after the
        other connections' reads of this round), or when ``flush_ms`` since the last flush is
        up, whichever is later: one batch per loop round when busy, no waiting when quiet."""
        if self.flush_handle is not None:
            return
        loop = asyncio.get_running_loop()
        delay = self.last_flush + self.min_gap - time.monotonic()
        self.flush_handle = (loop.call_later(delay, self._scheduled_flush) if delay > 0
                             else loop.call_soon(self._scheduled_flush))

    def _scheduled_flush(self) -> None:
        self.flush_handle = None
        self._guarded("flush", self.flush)

    def flush(self) -> None:
        """Turn what waits into a numbered batch (journaled before anything else) and hand
        batches to the bus."""
        if self.chunks or self.rejects:
            self.last_flush = time.monotonic()
            peers, times, blocks = zip(*self.chunks, strict=True) if self.chunks else ((),) * 3
            data = {"peer": list(peers), "t_recv": np.array(times, dtype=np.float64),
                    "data": list(blocks)}
            if self.rejects:  # framing's rejections travel with the batch: stored, acked
                line, reason, message, peer, t_recv = zip(*self.rejects, strict=True)
                data["rejected"] = {"line": list(line), "reason": list(reason),
                                    "message": list(message), "peer": list(peer),
                                    "t_recv": np.array(t_recv, dtype=np.float64)}
            self.outbox.add(data, self.pending_lines, self.pending_bytes)
            self.rt.counters["batches"] += 1
            self.chunks.clear()
            self.rejects.clear()
            self.pending_lines = self.pending_bytes = 0
            for conn in self.open:
                conn.unjournaled = 0
        self.outbox.pump()

    def _send(self, seq: int, data: dict) -> bool:
        if not self.pub.has_subscriber(topics.RAW):
            self.rt.gauges["waiting_for_subscriber"] = True
            return False
        self.rt.gauges["waiting_for_subscriber"] = False
        return self.pub.send_seq(topics.RAW, seq, data)

    def buffered(self) -> int:
        return self.pending_bytes + self.outbox.bytes

    def poll_acks(self) -> None:
        me = self.pub.src
        for msg in self.acks.recv_batch(0, 1000):
            cols = msg.data
            self.outbox.ack([seq for source, seq in zip(cols["source"], cols["seq"], strict=True)
                             if source == me])
        if self.buffered() < self.cap_bytes // 2:
            self.room.set()

    # ---- housekeeping ----------------------------------------------------------------------

    async def housekeeper(self) -> None:
        while not self.rt.stopping.is_set():
            await asyncio.sleep(HOUSEKEEPING_S)
            self.housekeeping()

    def housekeeping(self) -> None:
        """Each task on its own: one that fails is logged (at most every few seconds, with a
        count) and the others, the heartbeat and the stats go on."""
        self._guarded("acks", self.poll_acks)
        self._guarded("flush", self.flush)
        self._guarded("resend", self.outbox.resend_overdue)
        self._guarded("gauges", self._gauges)
        self._guarded("stats", self.rt.tick)

    def _gauges(self) -> None:
        self.rt.gauges.update(
            connections=len(self.open), pending_lines=self.pending_lines,
            reading_paused=not self.room.is_set(), unacked_batches=len(self.outbox.entries),
            unacked_lines=self.outbox.lines, buffered_bytes=self.buffered(),
            oldest_unacked_age_s=round(self.outbox.oldest_age(time.time()), 3))

    def _guarded(self, name: str, task) -> None:
        try:
            task()
        except Exception:  # a bug here must neither stop the other tasks nor flood the log
            failures, logged = self.errors.get(name, (0, 0.0))
            failures += 1
            now = time.monotonic()
            if now - logged >= ERROR_LOG_EVERY_S:
                log.exception("%s failed (%d times so far)", name, failures)
                logged = now
            self.errors[name] = (failures, logged)
            self.rt.counters["internal_errors"] += 1

    async def drain(self, deadline_s: float) -> None:
        """On stop: publish what waits and wait (a while) until storage has acked it all."""
        end = time.monotonic() + deadline_s
        while (self.chunks or self.rejects or self.outbox.entries) and time.monotonic() < end:
            self.housekeeping()
            await asyncio.sleep(0.005)
        if self.outbox.entries or self.chunks:
            lines = self.outbox.lines + self.pending_lines
            log.error("stopping with %d lines not confirmed by storage (is it running?); they "
                      "stay in the journal and go out at the next start", lines)
            self.rt.counters["lines_unconfirmed_at_stop"] += lines


def _size(data: dict) -> tuple[int, int]:
    """(lines, bytes) of a journaled batch."""
    lines = sum(block.count(b"\n") for block in data["data"])
    lines += len(data.get("rejected", {}).get("line", ()))
    return lines, sum(len(block) for block in data["data"])


async def serve(rt: Runtime, journal: Journal) -> None:
    ingest = Ingest(rt, journal)
    cfg = rt.cfg.ingest
    try:
        server = await asyncio.start_server(ingest.handle, cfg["host"], cfg["port"],
                                            limit=READ_SIZE, reuse_address=True, backlog=1024)
    except OSError as exc:
        port = Port("ingest (the meters' TCP port)", cfg["host"], cfg["port"], "ingest.port")
        raise CannotStart(port.explain(os.strerror(exc.errno) if exc.errno else str(exc))) from exc
    log.info("ingest listening on %s:%s (max_line %d, batch <= %d lines, >= %s ms apart)",
             cfg["host"], cfg["port"], cfg["max_line"], cfg["batch_lines"], cfg["flush_ms"])
    housekeeper = asyncio.create_task(ingest.housekeeper())
    while not rt.stopping.is_set():
        await asyncio.sleep(0.05)
    server.close()  # stop accepting; read what the open connections still send
    ingest.room.set()
    try:
        await asyncio.wait_for(ingest.idle.wait(), STOP_GRACE_S)
    except TimeoutError:
        log.info("stopping with %d connections still open: closing them", len(ingest.open))
        for task in list(ingest.tasks):
            task.cancel()
        await asyncio.gather(*ingest.tasks, return_exceptions=True)
    housekeeper.cancel()
    await asyncio.gather(housekeeper, return_exceptions=True)
    await ingest.drain(cfg["stop_timeout_s"])
    log.info("ingest stopped: %d lines in, %d confirmed stored or rejected by storage",
             rt.counters["lines_in"], rt.counters["lines_acked"])


def run(cfg: Config) -> int:
    journal = Journal(cfg.ingest["journal_dir"], cfg.ingest["journal_fsync"])
    rt = Runtime("ingest", cfg, instance=journal.id)
    rt.install_signals()
    try:
        asyncio.run(serve(rt, journal))
    finally:
        rt.close()
    return 0
