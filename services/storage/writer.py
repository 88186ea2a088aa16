"""The database writes of storage, on a thread of their own.

SQLite (and psycopg) release the GIL while a statement runs, so the next batch is parsed and
published on the main thread while this one goes into the database: storage uses a second core.
At most ``depth`` jobs wait; ``submit`` blocks beyond that, so the bus queues instead (and
ingest, whose unacked lines are capped, feels it).

A write that finds the disk full is rolled back and tried again with back-off (``disk_full``
says so meanwhile): nothing is acked that is not committed, and nothing is lost. Between jobs the
thread runs retention steps (small transactions). Any other failure stops the thread; ``check``
(and ``submit``) raise it again in the caller's thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from shared.db import Database, DiskFull

log = logging.getLogger("storage.writer")
RETENTION_IDLE_S = 60.0  # between retention steps when nothing was left to remove
RETENTION_BUSY_S = 1.0  # ... when a step hit its row limit (more is waiting)
MAX_FULL_BACKOFF_S = 10.0
UPKEEP = object()  # marks an upkeep job in the queue


class Writer:
    def __init__(self, db: Database, depth: int = 2, retention: bool = True):
        self.db = db
        self.jobs: queue.Queue = queue.Queue(maxsize=depth)
        self.done: queue.SimpleQueue = queue.SimpleQueue()
        self.in_flight = 0
        self.error: BaseException | None = None
        self.disk_full: str | None = None  # the error while writes wait for space
        self.retention = retention
        self.next_retention = time.monotonic() + 5.0
        self.thread = threading.Thread(target=self._run, name="db-writer", daemon=True)
        self.thread.start()

    def submit(self, tag, batches) -> None:
        """Queue ``db.write(batches)``; ``(tag, applied)`` comes back from ``completed``."""
        self._put((tag, batches))
        self.in_flight += 1

    def upkeep(self, task) -> None:
        """Run ``task()`` (a short write of upkeep: rollups) on the writer thread, between
        writes; from any thread. Dropped when the queue is full (it comes again)."""
        try:
            self.jobs.put_nowait((UPKEEP, task))
        except queue.Full:
            pass

    def completed(self) -> list:
        """``(tag, applied flags)`` of the writes committed since the last call, in order
        (also after a failure: what was committed before it)."""
        out = []
        while True:
            try:
                out.append(self.done.get_nowait())
            except queue.Empty:
                self.in_flight -= len(out)
                return out

    def check(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"database write failed: {self.error!r}") from self.error

    def close(self) -> None:
        """Finish every queued write (``completed`` then returns the last ones); stops at once
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
        while True:
            try:
                job = self.jobs.get(timeout=RETENTION_BUSY_S)
            except queue.Empty:
                job = ...
            if job is None:
                return
            try:
                if job is not ... and job[0] is UPKEEP:
                    self._full_is_later(job[1])
                elif job is not ...:
                    tag, batches = job
                    self.done.put((tag, self._write(batches)))
                self._retention()
            except BaseException as exc:  # raised again on the main thread
                self.error = exc
                return

    def _write(self, batches) -> list[bool]:
        pause = 0.5
        while True:
            try:
                applied = self.db.write(batches)
            except DiskFull as exc:
                if self.disk_full is None:
                    log.error("disk full: %s; holding the batch and retrying (nothing is acked "
                              "until it is written)", exc)
                self.disk_full = str(exc)
                time.sleep(pause)
                pause = min(pause * 2, MAX_FULL_BACKOFF_S)
                continue
            if self.disk_full is not None:
                log.warning("writing again after a full disk")
                self.disk_full = None
            return applied

    @staticmethod
    def _full_is_later(task) -> None:
        try:
            task()
        except DiskFull:
            pass  # upkeep waits for space like everything else; it comes again

    def _retention(self) -> None:
        """Retention steps between writes, a little at a time."""
        now = time.monotonic()
        if not self.retention or now < self.next_retention:
            return
        try:
            removed = self.db.retention_step(time.time_ns() // 1000)
        except DiskFull:
            removed = {}
        busy = any(n >= self.db.retention.step_rows for n in removed.values())
        self.next_retention = now + (RETENTION_BUSY_S if busy else RETENTION_IDLE_S)
