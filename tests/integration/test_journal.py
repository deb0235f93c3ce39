"""The edge's journal on real SQLite: tombstones, per-session reads, checkpoints off the loop,
and what survives a reopen."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from pathlib import Path

import pytest

from edge_nodes import journal as journal_mod
from edge_nodes.journal import Journal
from telehealth.v1 import vitals_pb2
from tests.conftest import eventually


def batch(sid: str, seq: int) -> vitals_pb2.VitalsBatch:
    b = vitals_pb2.VitalsBatch(session_id=sid, seq=seq, device_time_unix_ns=seq)
    b.vitals.add(device_time_unix_ns=seq, heart_rate_bpm=60 + seq % 40)
    return b


async def test_journal_checkpoints_in_a_thread_and_keeps_everything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal_mod, "CHECKPOINT_EVERY_COMMITS", 5)
    path = tmp_path / "journal.db"
    j = Journal(path)
    for seq in range(1, 61):
        rejected = seq == 30
        b = vitals_pb2.VitalsBatch(session_id="s-a", seq=seq) if rejected else batch("s-a", seq)
        await j.append("s-a", "p-a", seq, seq * 10, b, rejected=rejected)
        await j.append("s-b", "p-b", seq, seq * 10, batch("s-b", seq))
    # Checkpoints ran in the journal's thread, beside the commits (at most one at a time).
    await eventually(lambda: j.checkpoints >= 1, what="a checkpoint")
    assert j.commits >= 60
    await j.close()
    # The last checkpoint truncated the WAL: the database file holds everything.
    wal = Path(str(path) + "-wal")
    assert await asyncio.to_thread(lambda: not wal.exists() or wal.stat().st_size == 0)

    again = Journal(path)
    everything = again.read_after(0, 1000)
    assert len(everything) == 120
    assert [e.seq for e in everything if e.session_id == "s-a"] == list(range(1, 61))
    assert [e.seq for e in everything if e.rejected] == [30]
    assert again.session_seqs("s-a", 55) == {56, 57, 58, 59, 60}
    page = again.read_session("s-b", 10, 5)
    assert [e.seq for e in page] == [11, 12, 13, 14, 15]
    assert vitals_pb2.VitalsBatch.FromString(page[0].batch) == batch("s-b", 11)
    await again.close()


async def test_the_wal_starts_over_under_steady_writes_and_stays_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under steady load the thread's checkpoint never catches up with the commits, and a
    WAL that is never started over grew by 20 MB/s at 1,500 batches/s (the edge's RSS with
    it). Past WAL_RESET_BYTES the loop finishes the checkpoint and the WAL starts over."""
    monkeypatch.setattr(journal_mod, "CHECKPOINT_EVERY_COMMITS", 20)
    monkeypatch.setattr(journal_mod, "WAL_RESET_BYTES", 2**20)
    path = tmp_path / "journal.db"
    wal = Path(str(path) + "-wal")
    j = Journal(path)
    big = batch("s-a", 1)
    big.waveforms.add(samples=[0.25] * 200)  # about a 40 ms ECG chunk
    largest = 0
    for seq in range(1, 3001):
        now = time.time_ns()  # recent: nothing is old enough to prune
        await asyncio.gather(
            j.append("s-a", "p-a", seq, now, big), j.append("s-b", "p-b", seq, now, big)
        )
        if seq % 100 == 0:
            j.mark_forwarded(j.appended)
            largest = max(largest, await asyncio.to_thread(os.path.getsize, wal))
            await asyncio.sleep(0.01)  # the checkpoint thread's turn
    assert j.wal_resets >= 2
    # Without the restart the WAL passed 60 MB here (about 20 KB per commit).
    assert largest < 8 * 2**20, largest
    await j.close()
    again = Journal(path)
    assert [e.seq for e in again.read_session("s-b", 0, 5000)] == list(range(1, 3001))
    await again.close()


async def test_a_journal_from_before_tombstones_opens_with_its_backlog(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(
        """
        CREATE TABLE journal (
            position INTEGER PRIMARY KEY AUTOINCREMENT, session_id TEXT NOT NULL,
            patient_id TEXT NOT NULL, seq INTEGER NOT NULL,
            edge_received_unix_ns INTEGER NOT NULL, batch BLOB NOT NULL);
        CREATE TABLE forwarded (id INTEGER PRIMARY KEY CHECK (id = 1), position INTEGER NOT NULL);
        INSERT INTO forwarded (id, position) VALUES (1, 0);
        """
    )
    db.execute(
        "INSERT INTO journal (session_id, patient_id, seq, edge_received_unix_ns, batch)"
        " VALUES ('s-old', 'p-old', 1, 5, ?)",
        (batch("s-old", 1).SerializeToString(),),
    )
    db.commit()
    db.close()
    j = Journal(path)
    (old,) = j.read_after(0, 10)
    assert (old.seq, old.rejected) == (1, False)
    await j.append("s-old", "p-old", 2, 6, vitals_pb2.VitalsBatch(session_id="s-old", seq=2), True)
    assert [(e.seq, e.rejected) for e in j.read_session("s-old", 0, 10)] == [(1, False), (2, True)]
    await j.close()
