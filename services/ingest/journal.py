"""ingest's journal: every batch is on disk before it is sent, until storage acks it.

So a crash of ingest itself (kill -9, OOM, power cut with ``journal_fsync``) loses nothing it
accepted: on start it loads what is unacked and sends it again under the same id and sequence
numbers, and storage, which records each id's last applied number in the same transaction as
the rows, skips what it already has. One file per batch (``<seq>.batch``: the encoded bus
body), written beside and renamed, deleted when acked. The directory belongs to one ingest
instance: replicas need one each.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from pathlib import Path
from typing import Any

from shared import messages

log = logging.getLogger("ingest.journal")
SUFFIX = ".batch"


class Journal:
    def __init__(self, directory: str, fsync: bool = False):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self.id = self._identity()
        self.files: dict[int, Path] = {}

    def _identity(self) -> str:
        """This ingest's stable id: the same across restarts while the journal is kept."""
        path = self.dir / "ingest-id"
        if path.exists():
            return path.read_text().strip()
        ident = f"ingest-{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        self._write(path, ident.encode())
        return ident

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
