"""ingest's journal directories: one per replica, locked while held, adopted when orphaned."""

import numpy as np

from services.ingest.journal import Journal


def batch(n: int) -> dict:
    return {"peer": ["p:1"], "t_recv": np.array([1.0]), "data": [b"x\n" * n]}


def test_replicas_hold_a_stream_each_and_adopt_only_what_is_orphaned(tmp_path):
    root = str(tmp_path / "journal")
    a = Journal.claim(root)
    b = Journal.claim(root)
    assert a.id != b.id
    b.append(0, batch(3))
    assert Journal.orphans(root, held=(a.id,)) == []  # b is held (even from this process)
    b.release()  # b's process is gone
    (orphan,) = Journal.orphans(root, held=(a.id,))
    assert orphan.id == b.id
    next_seq, batches = orphan.load()
    assert next_seq == 1 and [s for s, _ in batches] == [0]
    orphan.drop([0], next_seq)
    orphan.release()
    assert Journal.orphans(root, held=(a.id,)) == []  # nothing left in it: not adopted
    c = Journal.claim(root)  # a new replica takes the free directory, numbering kept
    assert c.id == b.id and c.load()[0] == 1


def test_the_single_instance_layout_moves_into_a_stream_directory(tmp_path):
    root = tmp_path / "journal"
    root.mkdir()
    (root / "ingest-id").write_text("ingest-old-1234")
    (root / "next-seq").write_text("7")
    j = Journal.claim(str(root))
    assert j.id == "ingest-old-1234" and j.load()[0] == 7
