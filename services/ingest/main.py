"""ingest: accept meters' TCP connections, frame lines, hand them in numbered ``raw`` batches
to the work queue (one storage replica takes each).

Per chunk received (not per line) a connection's Framer (framing.py) splits off the unfinished
last line and cuts over-long lines (they travel in the batch as rejections); the rest joins the
pending batch. A batch is made as soon as the event loop has handled what its sockets had ready
(so a busy loop makes big batches and a quiet one sends at once), at most one per ``flush_ms``,
and at once whenever ``batch_lines`` lines wait or the bytes read but not yet journaled pass
``unjournaled_kb`` in all or ``unjournaled_kb_per_connection`` for one connection (what a
kill -9 of ingest can lose). Its Outbox (shared/outbox.py) numbers it, journals it, sends it
and keeps it until storage acks it (resending when acks stop coming). While the work queue is
full, batches wait; once what ingest holds passes ``max_buffer_mb``,
connections stop being read, so meters feel TCP backpressure instead of losing lines.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import socket
import time

import numpy as np

from services.ingest.allow import refuse_source
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
ADOPT_EVERY_S = 5.0  # look for journals of replicas that are gone this often
ERROR_LOG_EVERY_S = 10.0  # a failing periodic task is logged at most this often


HELLO = b"#wattflow ack v1 "  # the first line of a sender that wants acknowledgements


class Connection(asyncio.Protocol):
    """One meter's connection: bytes -> its Framer -> the pending batch. A sender whose first
    line is ``#wattflow ack v1 SENDER FIRST`` numbers its lines from FIRST on, and gets
    ``ACK n`` lines back: every line numbered below n is in ingest's journal (README, "The
    acknowledged mode")."""

    def __init__(self, ingest: Ingest):
        self.ingest = ingest
        self.framer = Framer(ingest.cfg["max_line"])
        self.peer = "?"
        self.transport: asyncio.Transport | None = None
        self.unjournaled = 0  # bytes read from it but not yet journaled
        self.last_data = time.monotonic()
        self.ended = False
        self.hello_seen = False  # its first line was looked at
        self.sender: str | None = None  # the acknowledged mode: the sender's id
        self.next_no = 0  # ... the number of its next line
        self.acked = 0  # ... what the last ACK said

    def connection_made(self, transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = "{}:{}".format(*peer[:2]) if peer else "?"
        if not self.ingest.admit(self, peer[0] if peer else ""):
            self.ended = True
            transport.abort()
            return
        transport.max_size = self.ingest.read_size  # one read holds at most this much
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if not self.ingest.room.is_set():
            transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        self.last_data = time.monotonic()
        self.ingest.rt.counters["bytes_in"] += len(data)
        self.ingest.take(self, *self.framer.feed(data))

    def eof_received(self) -> bool:
        self.end(orderly=True)
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ended:
            self.end(orderly=False, why=f"connection error: {exc}" if exc else "connection lost")
        self.ingest.forget(self)

    def end(self, orderly: bool, why: str = "") -> None:
        """The connection is over (or being closed by ingest): what its framer holds goes
        in, a cut-off last line as a rejection."""
        if self.ended:
            return
        self.ended = True
        self.ingest.take(self, *self.framer.end(orderly, why))
        self.ingest.flush()  # its last lines are journaled (and acked) before it goes

    def close(self, why: str) -> None:
        self.end(orderly=False, why=why)
        if self.transport is not None:
            self.transport.close()

    def hello(self, block: bytes, rejects: list) -> tuple[bytes, list]:
        """The connection's first line: the acknowledged mode's hello (taken out, so the
        sender's lines are numbered from the next one), or an ordinary line."""
        self.hello_seen = True
        first_rejected = bool(rejects) and rejects[0][3] == 0
        if first_rejected or not block.startswith(HELLO):
            return block, rejects
        first, _, rest = block.partition(b"\n")
        parts = first[len(HELLO):].rstrip(b"\r").split(b" ")
        if not (len(parts) == 2 and 0 < len(parts[0]) <= 64 and parts[1].isdigit()
                and parts[0].isascii() and parts[0].decode().isprintable()):
            return block, rejects  # not a valid hello: an ordinary (rejected) line
        self.sender, self.next_no = parts[0].decode(), int(parts[1])
        self.acked = self.next_no
        self.ingest.rt.counters["ack_mode_connections"] += 1
        return rest, [(*r[:3], r[3] - 1) for r in rejects]  # the hello was line 0

    def numbers(self, lines: int, rejects: list) -> tuple[np.ndarray, list[int]]:
        """Numbers of the lines just framed (accepted ones, and the rejected ones by their
        ordinals), in the acknowledged mode."""
        nos = self.next_no + np.arange(lines + len(rejects), dtype=np.int64)
        keep = np.ones(len(nos), bool)
        ordinals = [r[3] for r in rejects]
        keep[ordinals] = False
        self.next_no += len(nos)
        return nos[keep], nos[ordinals].tolist()

    def ack(self) -> None:
        """After a journal write: tell an acknowledged sender how far it is safe."""
        if self.sender is not None and self.next_no > self.acked and not self.ended:
            self.acked = self.next_no
            self.transport.write(b"ACK %d\n" % self.acked)


class Ingest:
    def __init__(self, rt: Runtime, journal: Journal):
        self.rt = rt
        self.cfg = rt.cfg.ingest
        self.pub = rt.publisher()
        self.work = rt.pusher()
        self.outbox = self._outbox(journal)  # this replica's own stream
        self.adopted: dict[str, Outbox] = {}  # streams of replicas gone, until all is acked
        self.next_adopt = time.monotonic() + ADOPT_EVERY_S
        # pending: chunks (peer, t_recv, block, sender, line numbers) and rejections (line,
        # reason, message, peer, t_recv, sender, number); sender None: a plain connection
        self.chunks: list[tuple] = []
        self.rejects: list[tuple] = []
        self.pending_lines = self.pending_bytes = 0
        self.cap_bytes = int(self.cfg["max_buffer_mb"] * (1 << 20))
        self.unjournaled_max = int(self.cfg["unjournaled_kb"] * 1024)
        self.unjournaled_conn_max = int(self.cfg["unjournaled_kb_per_connection"] * 1024)
        self.read_size = max(1024, min(READ_SIZE, self.unjournaled_conn_max))
        self.room = asyncio.Event()  # cleared while the buffer is full: stop reading sockets
        self.room.set()
        self.acks = rt.subscriber([topics.ACK])
        self.open: set[Connection] = set()
        self.idle = asyncio.Event()  # set while no connection is open
        self.idle.set()
        self.min_gap = self.cfg["flush_ms"] / 1000  # between two batches
        self.last_flush = 0.0
        self.flush_handle: asyncio.Handle | None = None
        self.errors: dict[str, tuple[int, float]] = {}  # task -> (failures, last logged)
        self.next_sweep = 0.0
        self.unjournaled_peak = 0
        self.refusals_logged = 0.0

    def _outbox(self, journal: Journal) -> Outbox:
        def send(seq: int, data: dict) -> bool:
            return self._send(seq, data, journal.id)

        outbox = Outbox(send, self.cfg["ack_timeout_s"], self.rt.counters, journal)
        next_seq, batches = journal.load()
        outbox.next_seq = next_seq
        outbox.restore(batches, _size)
        if batches:  # accepted by an earlier run and never confirmed by storage
            log.info("journal %s: %d unacked batches (%d lines), resending", journal.id,
                     len(batches), outbox.lines)
            self.rt.counters["lines_recovered"] += outbox.lines
        return outbox

    def outboxes(self) -> list[Outbox]:
        return [self.outbox, *self.adopted.values()]

    def adopt_orphans(self) -> None:
        """Streams of replicas that are gone (their journal unlocked) with batches left: send
        them from here until storage has them; then let them go."""
        now = time.monotonic()
        if now < self.next_adopt:
            return
        self.next_adopt = now + ADOPT_EVERY_S
        for source, outbox in list(self.adopted.items()):
            if not outbox.entries:
                log.info("adopted stream %s: all acked, released", source)
                outbox.journal.release()
                del self.adopted[source]
        held = {self.outbox.journal.id, *self.adopted}
        for journal in Journal.orphans(self.cfg["journal_dir"], self.cfg["journal_fsync"], held):
            log.warning("adopting the journal of stream %s (its replica is gone)", journal.id)
            self.rt.counters["streams_adopted"] += 1
            self.adopted[journal.id] = self._outbox(journal)

    # ---- connections -----------------------------------------------------------------------

    def admit(self, conn: Connection, host: str) -> bool:
        if refuse_source(self.cfg["allow"], host, self.rt.counters):  # not a meters' network
            return False
        if len(self.open) >= self.cfg["max_connections"]:
            self.rt.counters["connections_refused"] += 1
            now = time.monotonic()
            if now - self.refusals_logged >= ERROR_LOG_EVERY_S:  # a flood: one line a while
                log.warning("refusing %s: already %d connections (ingest.max_connections; %d "
                            "refused so far)", conn.peer, len(self.open),
                            self.rt.counters["connections_refused"])
                self.refusals_logged = now
            return False
        self.open.add(conn)
        self.rt.counters["connections"] += 1
        self.idle.clear()
        return True

    def forget(self, conn: Connection) -> None:
        self.open.discard(conn)
        if not self.open:
            self.idle.set()

    def sweep_idle(self) -> None:
        """Close connections silent for ``idle_timeout_s`` (half-open peers), once a second."""
        now = time.monotonic()
        if now < self.next_sweep:
            return
        self.next_sweep = now + 1.0
        idle = self.cfg["idle_timeout_s"]
        for conn in [c for c in self.open if now - c.last_data >= idle]:
            log.info("closing %s: silent for %gs (half-open?)", conn.peer, idle)
            self.rt.counters["idle_closed"] += 1
            conn.close(f"silent for {idle:g} s, closed by ingest")

    def take(self, conn: Connection, block: bytes, rejects: list) -> None:
        """Lines (and rejections) framed from a connection join the pending batch."""
        if not conn.hello_seen and (block or rejects):
            block, rejects = conn.hello(block, rejects)
        lines = block.count(b"\n")
        if not (lines or rejects):
            return
        now = time.time()
        line_nos, reject_nos = (conn.numbers(lines, rejects) if conn.sender is not None
                                else (None, [None] * len(rejects)))
        for (line, reason, message, _), no in zip(rejects, reject_nos, strict=True):
            self.rejects.append((line, reason, message, conn.peer, now, conn.sender, no))
            self.rt.counters[f"rejected.{reason}"] += 1
        self.pending_lines += lines + len(rejects)
        self.rt.counters["lines_in"] += lines + len(rejects)
        if lines:
            self.chunks.append((conn.peer, now, block, conn.sender, line_nos))
            self.pending_bytes += len(block)
            conn.unjournaled += len(block)
        if (self.pending_lines >= self.cfg["batch_lines"]
                or self.pending_bytes >= self.unjournaled_max
                or conn.unjournaled >= self.unjournaled_conn_max):
            self.flush()
        else:
            self.schedule_flush()
        self.unjournaled_peak = max(self.unjournaled_peak, self.pending_bytes)
        if self.buffered() >= self.cap_bytes and self.room.is_set():
            self.room.clear()
            self.rt.counters["backpressure_pauses"] += 1  # sockets not read until acks come
            for c in self.open:
                if c.transport is not None:
                    c.transport.pause_reading()

    def make_room(self) -> None:
        if not self.room.is_set() and self.buffered() < self.cap_bytes // 2:
            self.room.set()
            for c in self.open:
                if c.transport is not None and not c.ended:
                    c.transport.resume_reading()

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
        """Turn what waits into a numbered batch (journaled before anything else), tell
        acknowledged senders, and hand batches to the bus."""
        if self.chunks or self.rejects:
            self.last_flush = time.monotonic()
            peers, times, blocks, senders, nos = (zip(*self.chunks, strict=True) if self.chunks
                                                  else ((),) * 5)
            data = {"peer": list(peers), "t_recv": np.array(times, dtype=np.float64),
                    "data": list(blocks)}
            if any(s is not None for s in senders):  # the acknowledged mode's line numbers
                data["sender"], data["line_no"] = list(senders), list(nos)
            if self.rejects:  # framing's rejections travel with the batch: stored, acked
                line, reason, message, peer, t_recv, sender, no = zip(*self.rejects, strict=True)
                data["rejected"] = {"line": list(line), "reason": list(reason),
                                    "message": list(message), "peer": list(peer),
                                    "t_recv": np.array(t_recv, dtype=np.float64)}
                if any(x is not None for x in sender):
                    data["rejected"]["sender"] = list(sender)
                    data["rejected"]["line_no"] = list(no)
            self.outbox.add(data, self.pending_lines, self.pending_bytes)
            self.rt.counters["batches"] += 1
            self.chunks.clear()
            self.rejects.clear()
            self.pending_lines = self.pending_bytes = 0
            for conn in self.open:
                conn.unjournaled = 0
                conn.ack()
        self.outbox.pump()

    def _send(self, seq: int, data: dict, src: str) -> bool:
        """Into the work queue (one storage replica takes it); a copy on the bus for whoever
        listens on ``raw`` there (``wattflow tap raw``)."""
        if not self.work.send_seq(topics.RAW, seq, data, src=src):
            return False
        if self.pub.has_subscriber(topics.RAW):
            self.pub.send_seq(topics.RAW, seq, data, src=src)
        return True

    def buffered(self) -> int:
        return self.pending_bytes + sum(o.bytes for o in self.outboxes())

    def poll_acks(self) -> None:
        mine = {self.outbox.journal.id: self.outbox, **self.adopted}
        for msg in self.acks.recv_batch(0, 1000):
            by_source: dict[str, list[int]] = {}
            for source, seq in zip(msg.data["source"], msg.data["seq"], strict=True):
                if source in mine:
                    by_source.setdefault(source, []).append(seq)
            for source, seqs in by_source.items():
                mine[source].ack(seqs)
        self.make_room()

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
        self._guarded("idle", self.sweep_idle)
        self._guarded("adopt", self.adopt_orphans)
        for outbox in self.outboxes():
            self._guarded("resend", outbox.resend_overdue)
            self._guarded("send", outbox.pump)
        self._guarded("gauges", self._gauges)
        self._guarded("stats", self.rt.tick)

    def _gauges(self) -> None:
        self.rt.gauges.update(
            connections=len(self.open), pending_lines=self.pending_lines,
            reading_paused=not self.room.is_set(),
            unacked_batches=sum(len(o.entries) for o in self.outboxes()),
            unacked_lines=sum(o.lines for o in self.outboxes()), buffered_bytes=self.buffered(),
            oldest_unacked_age_s=round(max(o.oldest_age(time.time())
                                           for o in self.outboxes()), 3),
            adopted_streams=len(self.adopted),
            unjournaled_peak_bytes=self.unjournaled_peak)

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
        def waiting() -> bool:
            return bool(self.chunks or self.rejects or any(o.entries for o in self.outboxes()))

        while waiting() and time.monotonic() < end:
            self.housekeeping()
            await asyncio.sleep(0.005)
        if waiting():
            lines = sum(o.lines for o in self.outboxes()) + self.pending_lines
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
    loop = asyncio.get_running_loop()
    try:
        # SO_REUSEPORT: replicas on one host share the port; the kernel spreads connections
        server = await loop.create_server(lambda: Connection(ingest), cfg["host"], cfg["port"],
                                          reuse_address=True, reuse_port=cfg["reuse_port"],
                                          backlog=1024)
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
    for conn in ingest.open:
        if conn.transport is not None:
            conn.transport.resume_reading()
    try:
        await asyncio.wait_for(ingest.idle.wait(), STOP_GRACE_S)
    except TimeoutError:
        log.info("stopping with %d connections still open: closing them", len(ingest.open))
        for conn in list(ingest.open):
            conn.close("ingest shut down")
    housekeeper.cancel()
    await asyncio.gather(housekeeper, return_exceptions=True)
    await ingest.drain(cfg["stop_timeout_s"])
    log.info("ingest stopped: %d lines in, %d confirmed stored or rejected by storage",
             rt.counters["lines_in"], rt.counters["lines_acked"])


def raise_file_limit(connections: int) -> None:
    """Room for ``max_connections`` sockets (and some files): raise the soft limit on open
    files as far as the hard limit allows, and say so when that is not enough."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = connections + 256
    if soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        if new < want:
            log.warning("open files limited to %d (hard limit): fewer than ingest.max_connections"
                        " (%d) connections can be open", new, connections)


def run(cfg: Config) -> int:
    raise_file_limit(cfg.ingest["max_connections"])
    journal = Journal.claim(cfg.ingest["journal_dir"], cfg.ingest["journal_fsync"])
    rt = Runtime("ingest", cfg, instance=journal.id)
    rt.install_signals()
    try:
        asyncio.run(serve(rt, journal))
    finally:
        rt.close()
    return 0
