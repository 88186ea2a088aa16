"""ingest: accept meters' TCP connections, frame lines, publish them in batches on ``raw``.

Per chunk received (not per line): split off the unfinished last line, cut over-long lines
(they travel in the batch as rejections), append the rest to the pending batch. A batch is
made as soon as the event loop has handled what its sockets had ready (so a busy loop makes
big batches and a quiet one sends at once), at most one per ``flush_ms``, and whenever
``batch_lines`` lines wait; it is numbered, written to the journal, sent, and kept until
storage acks it (resent when acks stop coming). While nobody listens on ``raw`` or the bus is
full, batches wait; once what ingest holds passes ``max_buffer_mb``, connections stop being
read, so meters feel TCP backpressure instead of losing lines.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections import OrderedDict

import numpy as np

from services.ingest.allow import refuse_source
from services.ingest.journal import Journal
from shared import parsing, topics
from shared.config import Config
from shared.service import CannotStart, Port, Runtime

log = logging.getLogger("ingest")
READ_SIZE = 1 << 16
HOUSEKEEPING_S = 0.005  # acks, resends and gauges this often
MAX_RESEND_S = 30.0  # longest wait between two resends while storage stays silent
STOP_GRACE_S = 2.0  # on stop: how long open connections may still deliver what they sent
REJECT_KEEP = 200  # bytes of an over-long line kept in its rejection


class Ingest:
    def __init__(self, rt: Runtime, journal: Journal):
        self.rt = rt
        self.journal = journal
        self.cfg = rt.cfg.ingest
        self.max_line = self.cfg["max_line"]
        self.pub = rt.publisher()
        self.chunks: list[tuple[str, float, bytes]] = []
        self.pending_lines = 0
        self.pending_bytes = 0
        self.cap_bytes = int(self.cfg["max_buffer_mb"] * (1 << 20))
        self.room = asyncio.Event()  # cleared while the buffer is full: stop reading sockets
        self.room.set()
        # batches sent (or waiting to be) but not yet acked by storage, by sequence number
        self.unacked: OrderedDict[int, tuple[dict, int, int]] = OrderedDict()
        self.unacked_lines = self.unacked_bytes = 0
        self.acks = rt.subscriber([topics.ACK])
        next_seq, batches = journal.load()
        self.pub.seq[topics.RAW] = next_seq
        for seq, data in batches:  # what the last run accepted and storage never confirmed
            lines = sum(block.count(b"\n") for block in data["data"])
            lines += len(data.get("too_long", {}).get("line", ()))
            size = sum(len(block) for block in data["data"])
            self.unacked[seq] = (data, lines, size)
            self.unacked_lines += lines
            self.unacked_bytes += size
        if batches:
            log.info("journal: %d unacked batches (%d lines) from the last run, resending",
                     len(batches), self.unacked_lines)
            self.rt.counters["lines_recovered"] += self.unacked_lines
        self.next_send = next(iter(self.unacked), next_seq)
        self.ack_timeout = self.cfg["ack_timeout_s"]
        self.resend_after = self.ack_timeout
        self.last_progress = time.monotonic()
        self.connections = 0
        self.idle = asyncio.Event()  # set while no connection is open
        self.idle.set()
        self.rejects: list[tuple[bytes, str, str, float]] = []  # over-long lines
        self.min_gap = self.cfg["flush_ms"] / 1000  # between two batches
        self.last_flush = 0.0
        self.flush_handle: asyncio.Handle | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = "{}:{}".format(*writer.get_extra_info("peername")[:2])
        if refuse_source(self.cfg["allow"], writer.get_extra_info("peername")[0],
                         self.rt.counters):  # ingest.allow: not from a meters' network
            writer.close()
            return
        sock = writer.get_extra_info("socket")
        if self.connections >= self.cfg["max_connections"]:
            log.warning("refusing %s: already %d connections", peer, self.connections)
            self.rt.counters["connections_refused"] += 1
            writer.close()
            return
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        self.connections += 1
        self.rt.counters["connections"] += 1
        self.idle.clear()
        log.debug("meter connected from %s", peer)
        try:
            await self._read_loop(reader, peer)
        except (ConnectionError, OSError) as exc:
            log.info("connection from %s ended: %s", peer, exc)
        finally:
            self.connections -= 1
            if not self.connections:
                self.idle.set()
            writer.close()

    async def _read_loop(self, reader: asyncio.StreamReader, peer: str) -> None:
        tail = b""
        skipping = False  # inside an over-long line, dropping bytes until its newline
        idle = self.cfg["idle_timeout_s"]
        while True:
            await self.room.wait()
            try:
                data = await asyncio.wait_for(reader.read(READ_SIZE), idle)
            except TimeoutError:
                log.info("closing %s: silent for %ss (half-open?)", peer, idle)
                self.rt.counters["idle_closed"] += 1
                data = b""
            now = time.time()
            if not data:  # EOF: a last line without newline still counts
                if tail and not skipping:
                    self._accept(peer, now, tail + b"\n")
                return
            self.rt.counters["bytes_in"] += len(data)
            if skipping:
                cut = data.find(b"\n")
                if cut < 0:
                    continue
                data, skipping = data[cut + 1 :], False
            buf = tail + data if tail else data
            cut = buf.rfind(b"\n")
            complete, tail = (buf[: cut + 1], buf[cut + 1 :]) if cut >= 0 else (b"", buf)
            if len(tail) > self.max_line:
                self._reject_long(peer, now, tail, partial=True)
                tail, skipping = b"", True
            if complete:
                self._accept(peer, now, complete)

    def _accept(self, peer: str, now: float, block: bytes) -> None:
        if len(block) > self.max_line:
            block = self._drop_long_lines(peer, now, block)
        lines = block.count(b"\n")
        if not lines:
            return
        self.chunks.append((peer, now, block))
        self.pending_lines += lines
        self.pending_bytes += len(block)
        self.rt.counters["lines_in"] += lines
        if self.pending_lines >= self.cfg["batch_lines"]:
            self.flush()
        else:
            self.schedule_flush()
        if self.buffered() >= self.cap_bytes and self.room.is_set():
            self.room.clear()
            self.rt.counters["backpressure_pauses"] += 1  # sockets not read until acks come

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
        try:
            self.flush()
        except Exception:  # a bug here must not silently stop flushing; housekeeping retries
            log.exception("flush failed")
            self.rt.counters["internal_errors"] += 1

    def _drop_long_lines(self, peer: str, now: float, block: bytes) -> bytes:
        ends = np.flatnonzero(np.frombuffer(block, np.uint8) == 10)
        starts = np.concatenate(([0], ends[:-1] + 1))
        lengths = ends - starts - (np.frombuffer(block, np.uint8)[np.maximum(ends - 1, 0)] == 13)
        too_long = np.flatnonzero(lengths > self.max_line)
        if not len(too_long):
            return block
        keep, pos = [], 0
        for i in too_long.tolist():
            keep.append(block[pos : starts[i]])
            self._reject_long(peer, now, block[starts[i] : ends[i]], partial=False)
            pos = ends[i] + 1
        keep.append(block[pos:])
        return b"".join(keep)

    def _reject_long(self, peer: str, now: float, line: bytes, partial: bool) -> None:
        size = f"over {len(line)}" if partial else f"{len(line)}"
        message = f"line of {size} bytes is longer than ingest.max_line ({self.max_line})"
        self.rejects.append((line[:REJECT_KEEP], message, peer, now))
        self.pending_lines += 1
        self.rt.counters["lines_in"] += 1
        self.rt.counters[f"rejected.{parsing.TOO_LONG}"] += 1
        self.schedule_flush()

    def flush(self) -> None:
        """Turn what waits into a numbered batch and hand batches to the bus."""
        if self.chunks or self.rejects:
            self.last_flush = time.monotonic()
            seq = self.pub.seq[topics.RAW]  # taken only once the journal has the batch
            peers, times, blocks = zip(*self.chunks, strict=True) if self.chunks else ((),) * 3
            data = {"peer": list(peers), "t_recv": np.array(times, dtype=np.float64),
                    "data": list(blocks)}
            if self.rejects:  # over-long lines travel with the batch: stored, acked, journaled
                line, message, peer, t_recv = zip(*self.rejects, strict=True)
                data["too_long"] = {"line": list(line), "message": list(message),
                                    "peer": list(peer), "t_recv": list(t_recv)}
            self.journal.append(seq, data)  # on disk before anyone can see it
            self.pub.take_seq(topics.RAW)  # (a failed append leaves no gap in the numbers)
            if not self.unacked:  # the ack clock starts with the first batch out
                self.last_progress = time.monotonic()
            self.unacked[seq] = (data, self.pending_lines, self.pending_bytes)
            self.unacked_lines += self.pending_lines
            self.unacked_bytes += self.pending_bytes
            self.rt.counters["batches"] += 1
            self.chunks.clear()
            self.rejects.clear()
            self.pending_lines = self.pending_bytes = 0
        self.pump()

    def pump(self) -> None:
        """Send the batches not yet sent (or to be sent again), oldest first, while the bus
        takes them and someone listens on ``raw``."""
        if not self.unacked or self.next_send > next(reversed(self.unacked)):
            return
        if not self.pub.has_subscriber(topics.RAW):
            self.rt.gauges["waiting_for_subscriber"] = True
            return
        self.rt.gauges["waiting_for_subscriber"] = False
        base = next(iter(self.unacked))
        self.next_send = max(self.next_send, base)
        while self.next_send in self.unacked:
            data = self.unacked[self.next_send][0]
            data["base"] = base  # the oldest batch we still hold: where a new storage starts
            if not self.pub.send_seq(topics.RAW, self.next_send, data):
                self.rt.counters["bus_full"] += 1
                return
            self.next_send += 1

    def on_ack(self, seq: int) -> None:
        """Storage has durably applied every batch up to ``seq``: forget them."""
        progressed = False
        while self.unacked:
            first = next(iter(self.unacked))
            if first > seq:
                break
            _, lines, size = self.unacked.pop(first)
            self.unacked_lines -= lines
            self.unacked_bytes -= size
            self.rt.counters["lines_acked"] += lines
            progressed = True
        if progressed:
            self.journal.drop_through(seq, self.pub.seq[topics.RAW])
            self.last_progress = time.monotonic()
            self.resend_after = self.ack_timeout
        if self.buffered() < self.cap_bytes // 2:
            self.room.set()

    def buffered(self) -> int:
        return self.pending_bytes + self.unacked_bytes

    def poll_acks(self) -> None:
        for msg in self.acks.recv_batch(0, 1000):
            cols = msg.data
            for source, seq in zip(cols["source"], cols["seq"], strict=True):
                if source == self.pub.src:
                    self.on_ack(seq)

    def maybe_resend(self) -> None:
        """No ack progress for a while although batches were sent: storage lost them (it
        restarted, the broker restarted, or they arrived out of order). Go back and resend
        everything unacked, waiting longer each time nothing moves."""
        if not self.unacked or self.next_send <= next(iter(self.unacked)):
            return
        now = time.monotonic()
        if now - self.last_progress < self.resend_after:
            return
        first = next(iter(self.unacked))
        log.warning("no ack for %.1fs: resending %d batches (%d lines) from seq %d",
                    now - self.last_progress, len(self.unacked), self.unacked_lines, first)
        self.rt.counters["resent_batches"] += self.next_send - first
        self.next_send = first
        self.last_progress = now
        self.resend_after = min(self.resend_after * 2, MAX_RESEND_S)

    async def housekeeper(self) -> None:
        while not self.rt.stopping.is_set():
            await asyncio.sleep(HOUSEKEEPING_S)
            try:
                self.housekeeping()
            except Exception:  # a bug here must not silently stop flushing and acking
                log.exception("housekeeping failed")
                self.rt.counters["internal_errors"] += 1

    def housekeeping(self) -> None:
        self.poll_acks()
        if self.chunks or self.rejects:
            self.flush()
        self.maybe_resend()
        self.pump()
        oldest = 0.0
        if self.unacked:
            t_recv = self.unacked[next(iter(self.unacked))][0]["t_recv"]
            if len(t_recv):  # (empty in a batch of nothing but over-long lines)
                oldest = time.time() - float(t_recv[0])
        self.rt.gauges.update(connections=self.connections, pending_lines=self.pending_lines,
                              reading_paused=not self.room.is_set(),
                              unacked_batches=len(self.unacked), unacked_lines=self.unacked_lines,
                              buffered_bytes=self.buffered(),
                              oldest_unacked_age_s=round(oldest, 3))
        self.rt.tick()

    async def drain(self, deadline_s: float) -> None:
        """On stop: publish what waits and wait (a while) until storage has acked it all."""
        end = time.monotonic() + deadline_s
        while (self.chunks or self.rejects or self.unacked) and time.monotonic() < end:
            self.housekeeping()
            await asyncio.sleep(0.005)
        if self.unacked or self.chunks:
            lines = self.unacked_lines + self.pending_lines
            log.error("stopping with %d lines not confirmed by storage (is it running?)", lines)
            self.rt.counters["lines_unconfirmed_at_stop"] += lines


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
        log.info("stopping with %d connections still open", ingest.connections)
    housekeeper.cancel()
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
