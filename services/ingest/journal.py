"""ingest's journal: every batch is on disk before it is sent, until storage acks it.

So a crash of ingest itself (kill -9, OOM, power cut with ``journal_fsync``) loses nothing it
journaled: on start it loads what is unacked and sends it again under the same id and sequence
numbers, and storage, which keeps every batch's key in the same transaction as its rows, skips
what it already has. One file per batch (``<seq>.batch``: the encoded bus body), written beside
and renamed, deleted when acked.

Replicas share ``ingest.journal_dir``: each one holds one stream directory in it
(``<journal_dir>/<stream id>/``), locked (an exclusive ``flock`` the kernel frees when the
process dies, kill -9 included) while it runs. A starting replica takes an unlocked stream
directory if there is one (its id, numbering and unacked batches with it), else makes a new
one; a running replica also adopts, now and then, unlocked directories that still hold batches
(a replica scaled away, or killed and not restarted) and sends them until storage has them all,
so nothing stays stranded.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import uuid
from pathlib import Path
from typing import Any

from shared import messages

log = logging.getLogger("ingest.journal")
SUFFIX = ".batch"
LOCK = "lock"


class Journal:
    """One stream directory, held (locked) by this process."""

    def __init__(self, directory: Path, lock_fd, fsync: bool = False):
        self.dir = directory
        self.lock_fd = lock_fd
        self.fsync = fsync
        self.id = self._identity()
        self.files: dict[int, Path] = {}

    @classmethod
    def claim(cls, journal_dir: str, fsync: bool = False) -> Journal:
        """An unlocked stream directory of ``journal_dir`` (the oldest unacked work first),
        else a new one."""
        root = Path(journal_dir)
        root.mkdir(parents=True, exist_ok=True)
        _move_old_layout(root)
        for directory in sorted(_streams(root), key=lambda d: -len(list(d.glob("*" + SUFFIX)))):
            journal = cls.try_lock(directory, fsync)
            if journal is not None:
                return journal
        directory = root / f"ingest-{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        directory.mkdir()
        journal = cls.try_lock(directory, fsync)
        assert journal is not None  # a directory nobody else knows yet
        return journal

    @classmethod
    def try_lock(cls, directory: Path, fsync: bool = False) -> Journal | None:
        fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:  # flock: held by this open file, so the same process trying again is refused too
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return None
        return cls(directory, fd, fsync)

    @classmethod
    def orphans(cls, journal_dir: str, fsync: bool = False, held=()) -> list[Journal]:
        """Unlocked stream directories that still hold batches: locked, for adoption
        (``held``: ids this process holds already)."""
        found = []
        for directory in _streams(Path(journal_dir)):
            if directory.name in held or not any(directory.glob("*" + SUFFIX)):
                continue
            journal = cls.try_lock(directory, fsync)
            if journal is not None:
                found.append(journal)
        return found

    def release(self) -> None:
        os.close(self.lock_fd)

    def _identity(self) -> str:
        """The stream's stable id: its directory's name (written inside too, for people)."""
        path = self.dir / "ingest-id"
        if path.exists():
            return path.read_text().strip()
        self._write(path, self.dir.name.encode())
        return self.dir.name

    def load(self) -> tuple[int, list[tuple[int, dict[str, Any]]]]:
        """(next sequence number, unacked batches in order) as the last run left them."""
        next_seq = 0
        seq_file = self.dir / "next-seq"
        if seq_file.exists():
            next_seq = int(seq_file.read_text() or 0)
        batches = []
        for path in sorted(self.dir.glob("*" + SUFFIX)):
            try:
                msg = messages.decode(b"raw", path.read_bytes())
            except (OSError, messages.MessageError) as exc:  # a torn write from a crash
                log.error("journal file %s unreadable (%s): moved aside", path, exc)
                path.rename(path.with_suffix(".corrupt"))
                continue
            batches.append((msg.seq, msg.data))
            self.files[msg.seq] = path
            next_seq = max(next_seq, msg.seq + 1)
        return next_seq, batches

    def append(self, seq: int, data: dict[str, Any]) -> None:
        path = self.dir / f"{seq:020d}{SUFFIX}"
        self._write(path, messages.encode(self.id, seq, 0.0, data))
        self.files[seq] = path

    def drop(self, seqs, next_seq: int) -> None:
        """Storage has these batches: delete their files (and remember where numbering is, so
        a restart with an empty journal never reuses a number)."""
        done = [s for s in seqs if s in self.files]
        if not done:
            return
        self._write(self.dir / "next-seq", str(next_seq).encode())
        for s in done:
            self.files.pop(s).unlink(missing_ok=True)

    def _write(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            if self.fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)


def _streams(root: Path) -> list[Path]:
    return [d for d in root.iterdir() if d.is_dir() and (d / "ingest-id").exists()]


def _move_old_layout(root: Path) -> None:
    """Before replicas, the journal directory was one stream's: move it into a directory of
    its own (same id, same numbering, same unacked batches)."""
    old_id = root / "ingest-id"
    if not old_id.exists():
        return
    directory = root / old_id.read_text().strip()
    directory.mkdir(exist_ok=True)
    for name in [p for p in root.iterdir() if p.is_file()]:
        name.rename(directory / name.name)
    log.info("journal: moved the single-instance journal into %s", directory)
