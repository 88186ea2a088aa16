"""An outbox of numbered batches, kept until storage acknowledges each one.

A sender (ingest for ``raw``) numbers its batches per stream (``src``: the stream's stable id)
0, 1, 2, ...; with a journal each batch is on disk before it is sent. Batches go out oldest
first while the bus takes them; each one carries ``base``, the oldest number still unacked (so
storage knows every batch below it is applied). Storage acks each batch it has committed (or
found committed); a batch unacked ``ack_timeout_s`` after it was sent is sent again (the
broker, or a storage replica, lost it), and while acks stay away the wait doubles up to
``MAX_RESEND_S``. A batch may thus arrive more than once, in any order: storage's idempotence
keys make that harmless.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger("outbox")
MAX_RESEND_S = 30.0


@dataclass
class Entry:
    data: dict[str, Any]
    lines: int  # records in it, for the counters
    size: int  # bytes it holds, for the buffer cap
    sent_at: float | None = None  # monotonic time of the last send


class Outbox:
    def __init__(self, send: Callable[[int, dict], bool], ack_timeout_s: float,
                 counters, journal=None, next_seq: int = 0):
        self.send = send  # (seq, data) -> False if the bus cannot take it now
        self.journal = journal
        self.counters = counters
        self.entries: OrderedDict[int, Entry] = OrderedDict()
        self.next_seq = next_seq
        self.unsent: list[int] = []  # in order: never sent, or due again
        self.lines = self.bytes = 0
        self.ack_timeout = ack_timeout_s
        self.resend_after = ack_timeout_s
        self.last_progress = time.monotonic()

    def restore(self, batches: list[tuple[int, dict]], size: Callable[[dict], tuple[int, int]]):
        """Batches a previous run journaled and never got acked for: to be sent again."""
        for seq, data in batches:
            lines, nbytes = size(data)
            self._keep(seq, Entry(data, lines, nbytes))
            self.next_seq = max(self.next_seq, seq + 1)

    def add(self, data: dict[str, Any], lines: int, size: int) -> int:
        """Number a batch, journal it (when journaled), queue it for sending."""
        seq = self.next_seq
        if self.journal is not None:
            self.journal.append(seq, data)  # on disk before anyone can see it
        self.next_seq += 1  # (a failed append uses up no number)
        if not self.entries:  # the ack clock starts with the first batch out
            self.last_progress = time.monotonic()
        self._keep(seq, Entry(data, lines, size))
        return seq

    def _keep(self, seq: int, entry: Entry) -> None:
        self.entries[seq] = entry
        self.unsent.append(seq)
        self.lines += entry.lines
        self.bytes += entry.size

    @property
    def base(self) -> int:
        return next(iter(self.entries), self.next_seq)

    def pump(self) -> None:
        """Send what waits, oldest first, while the bus takes it."""
        if not self.unsent:
            return
        base, now, sent = self.base, time.monotonic(), 0
        for seq in self.unsent:
            entry = self.entries.get(seq)
            if entry is None:  # acked meanwhile
                sent += 1
                continue
            entry.data["base"] = base  # every batch below it is applied: storage may forget
            if not self.send(seq, entry.data):
                self.counters["bus_full"] += 1
                break
            entry.sent_at = now
            sent += 1
        del self.unsent[:sent]

    def ack(self, seqs) -> None:
        """Storage has committed these batches: forget them."""
        done = sorted(set(seqs).intersection(self.entries))  # (a batch acked twice: once)
        if not done:
            return
        for seq in done:
            entry = self.entries.pop(seq)
            self.lines -= entry.lines
            self.bytes -= entry.size
            self.counters["lines_acked"] += entry.lines
        if self.journal is not None:
            self.journal.drop(done, self.next_seq)
        self.last_progress = time.monotonic()
        self.resend_after = self.ack_timeout

    def resend_overdue(self) -> None:
        """Batches sent ``resend_after`` ago and still unacked are sent again; while nothing is
        acked the wait doubles (storage down: do not flood it when it comes back)."""
        now = time.monotonic()
        if not self.entries or now - self.last_progress < self.resend_after:
            return
        due = [s for s, e in self.entries.items()
               if e.sent_at is not None and now - e.sent_at >= self.resend_after]
        if not due:
            return
        lines = sum(self.entries[s].lines for s in due)
        log.warning("no ack for %.1fs: resending %d batches (%d lines) from seq %d",
                    now - self.last_progress, len(due), lines, due[0])
        self.counters["resent_batches"] += len(due)
        pending = set(self.unsent)
        self.unsent = sorted(pending.union(due))
        for s in due:
            self.entries[s].sent_at = None
        self.last_progress = now
        self.resend_after = min(self.resend_after * 2, MAX_RESEND_S)

    def oldest_age(self, now: float) -> float:
        """Seconds since the oldest unacked batch's first line was received."""
        if not self.entries:
            return 0.0
        first = next(iter(self.entries.values())).data
        # (asked on every housekeeping tick: the columns' own min, not a list of their values)
        times = [float(np.min(col)) for col in (first.get("t_recv", ()),
                 first.get("rejected", {}).get("t_recv", ())) if len(col)]
        return now - min(times) if times else 0.0
