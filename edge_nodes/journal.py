"""The edge's journal: every accepted batch is written here before it is acknowledged.

SQLite in WAL mode with group commit on the event loop: a publish awaits the commit that
holds its batch, and every batch accepted in the same loop turn shares that commit. With
synchronous=NORMAL a commit survives the process being killed (kill -9); only a power cut
can lose the last commits, and the device still holds those until the archive has them.

Commits run on the loop rather than in a worker thread on purpose: a commit of a group
takes a fraction of a millisecond, while handing every batch to a thread and back cost
more (futex and self-pipe wake-ups) than the writes themselves. What does take long -
a WAL checkpoint and its fsync - runs in a thread of its own instead of inside a commit. The newest entries are
also kept in memory, so forwarding to the archive reads neither the disk nor the bytes
again; only a backlog older than that tail (the core was away) is read back from SQLite.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from telehealth.v1 import vitals_pb2

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS journal (
    position INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id TEXT NOT NULL,
    patient_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    edge_received_unix_ns INTEGER NOT NULL,
    batch BLOB NOT NULL,
    -- 1: a tombstone for a seq the edge refused (the batch holds only session_id and seq).
    rejected INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS forwarded (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    position INTEGER NOT NULL
);
INSERT OR IGNORE INTO forwarded (id, position) VALUES (1, 0);
"""
# A resuming view reads one session's seqs without scanning every session's batches.
INDEXES = "CREATE INDEX IF NOT EXISTS journal_session_seq ON journal (session_id, seq);"
# A checkpoint after this many group commits (at 1,000 commits/s about one a second).
CHECKPOINT_EVERY_COMMITS = 1000
# The WAL restarts from its beginning only after a checkpoint has copied every frame in it,
# which the thread's checkpoint never does under steady load (commits append frames while
# it copies): the WAL grew by 20 MB/s at 1,500 batches/s, and the edge's RSS with its
# index. So once the WAL is past this size, the loop finishes the thread's work between
# two commits (only the frames written since), and the next commit starts the WAL over;
# journal_size_limit then truncates the file back to this size.
WAL_RESET_BYTES = 128 * 2**20
# Entries kept in memory for forwarding (25 batches/s x 500 patients for ~16 s).
TAIL_MAX = 200_000
PRUNE_EVERY_S = 10.0


@dataclass(frozen=True)
class JournalEntry:
    position: int
    session_id: str
    patient_id: str
    seq: int
    edge_received_unix_ns: int
    # The VitalsBatch, serialized once when journaled.
    batch: bytes
    # A refused seq: forwarded so the archive's watermark passes it, never replayed as vitals.
    rejected: bool = False


class JournalError(Exception):
    pass


def _run_checkpoint(db: sqlite3.Connection, mode: str) -> tuple[int, int, int] | None:
    """(busy, frames in the WAL, frames copied), or None when it failed: commits stay
    durable in the WAL, and the next checkpoint tries again."""
    try:
        busy, wal_frames, copied = db.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
    except sqlite3.Error as e:
        log.warning("journal checkpoint failed", extra={"error": str(e)})
        return None
    return int(busy), int(wal_frames), int(copied)


class Journal:
    def __init__(self, path: Path, max_group: int = 1024) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._max_group = max_group
        self._db = sqlite3.connect(path)
        # No automatic checkpoints: SQLite runs them inside the commit that crosses the
        # threshold, with an fsync, on the event loop (a 20 ms stall now and then). They
        # run in a worker thread instead (_maybe_checkpoint).
        self._db.executescript(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA wal_autocheckpoint=0;"
            f"PRAGMA journal_size_limit={WAL_RESET_BYTES};" + SCHEMA
        )
        self._page_size = int(self._db.execute("PRAGMA page_size").fetchone()[0])
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(journal)")}
        if "rejected" not in columns:
            # A journal written before tombstones existed: its backlog is all accepted batches.
            with self._db:
                self._db.execute(
                    "ALTER TABLE journal ADD COLUMN rejected INTEGER NOT NULL DEFAULT 0"
                )
        self._db.executescript(INDEXES)
        self._pending: list[tuple[str, str, int, int, bytes, int]] = []
        self._group: asyncio.Future[None] | None = None
        self._tail: deque[JournalEntry] = deque()
        self.commits = 0
        self.appended = 0
        self.new_entries = asyncio.Event()
        self._closed = False
        self._pruned_at = 0.0
        # One thread of its own with its own connection: checkpoints copy the WAL into the
        # database and fsync it while commits go on (WAL readers and a writer do not block
        # a PASSIVE checkpoint, nor it them).
        self._checkpointer = ThreadPoolExecutor(1, thread_name_prefix="journal-checkpoint")
        self._checkpoint_db: sqlite3.Connection | None = None
        self._checkpointing: Future[None] | None = None
        self._commits_since_checkpoint = 0
        self.checkpoints = 0
        self.wal_resets = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    async def append(
        self,
        session_id: str,
        patient_id: str,
        seq: int,
        received_ns: int,
        batch: vitals_pb2.VitalsBatch,
        rejected: bool = False,
    ) -> None:
        """Return once the batch (or, rejected=True, the tombstone of a refused seq) is
        committed."""
        if self._closed:
            raise JournalError("journal is closed")
        self._pending.append(
            (session_id, patient_id, seq, received_ns, batch.SerializeToString(), int(rejected))
        )
        if self._group is None:
            loop = self._loop = asyncio.get_running_loop()
            self._group = loop.create_future()
            # Runs after the callbacks already queued in this turn: their batches join in.
            loop.call_soon(self._flush)
        group = self._group
        if len(self._pending) >= self._max_group:
            self._flush()
        # Shielded: one publisher going away must not cancel the commit others wait for.
        await asyncio.shield(group)

    def _flush(self) -> None:
        rows, self._pending = self._pending, []
        group, self._group = self._group, None
        if not rows:
            if group is not None and not group.done():
                group.set_result(None)
            return
        try:
            with self._db:
                self._db.executemany(
                    "INSERT INTO journal (session_id, patient_id, seq, edge_received_unix_ns,"
                    " batch, rejected) VALUES (?, ?, ?, ?, ?, ?)",
                    rows,
                )
                last = int(self._db.execute("SELECT last_insert_rowid()").fetchone()[0])
        except sqlite3.Error as e:
            log.error("journal write failed", extra={"error": str(e)})
            if group is not None and not group.done():
                group.set_exception(JournalError(f"journal write failed: {e}"))
            return
        self.commits += 1
        self.appended += len(rows)
        # One writer with AUTOINCREMENT: the group's positions are contiguous.
        first = last - len(rows) + 1
        for i, (sid, pid, seq, received, raw, rejected) in enumerate(rows):
            self._tail.append(JournalEntry(first + i, sid, pid, seq, received, raw, bool(rejected)))
        while len(self._tail) > TAIL_MAX:
            self._tail.popleft()
        if group is not None and not group.done():
            group.set_result(None)
        self.new_entries.set()
        self._commits_since_checkpoint += 1
        self._maybe_checkpoint()

    def _maybe_checkpoint(self) -> None:
        busy = self._checkpointing is not None and not self._checkpointing.done()
        if busy or self._commits_since_checkpoint < CHECKPOINT_EVERY_COMMITS:
            return
        self._commits_since_checkpoint = 0
        self._checkpointing = self._checkpointer.submit(self._checkpoint, "PASSIVE")

    def _checkpoint(self, mode: str) -> None:
        """In the checkpoint thread: copy what the WAL holds into the database."""
        if self._checkpoint_db is None:
            self._checkpoint_db = sqlite3.connect(self.path, check_same_thread=False)
        done = _run_checkpoint(self._checkpoint_db, mode)
        if done is None:
            return
        self.checkpoints += 1
        _, wal_frames, _ = done
        loop = self._loop
        if mode == "PASSIVE" and wal_frames * self._page_size > WAL_RESET_BYTES and loop:
            # Most of the WAL is in the database now; the rest (written meanwhile) is
            # copied on the loop, where no commit can run beside it.
            loop.call_soon_threadsafe(self._finish_checkpoint)

    def _finish_checkpoint(self) -> None:
        """On the loop, between commits: copy the WAL's last frames, so the next commit
        starts it over (a reader still on an old snapshot defers that to the next try)."""
        if self._closed:
            return
        done = _run_checkpoint(self._db, "PASSIVE")
        if done is not None and not done[0] and done[1] == done[2]:
            self.wal_resets += 1

    def _close_checkpointer(self) -> None:
        if self._checkpoint_db is not None:
            self._checkpoint_db.close()

    def tail_after(self, position: int, limit: int) -> list[JournalEntry] | None:
        """Entries after `position` from memory, or None when they start before the tail
        (read those from disk with read_after)."""
        if not self._tail:
            return None
        first = self._tail[0].position
        if position + 1 < first:
            return None
        start = position + 1 - first
        out = []
        for i in range(start, min(start + limit, len(self._tail))):
            out.append(self._tail[i])
        return out

    def read_after(self, position: int, limit: int) -> list[JournalEntry]:
        """Entries after `position` from disk (backlog older than the in-memory tail)."""
        db = sqlite3.connect(self.path)
        try:
            rows = db.execute(
                "SELECT position, session_id, patient_id, seq, edge_received_unix_ns, batch,"
                " rejected FROM journal WHERE position > ? ORDER BY position LIMIT ?",
                (position, limit),
            ).fetchall()
        finally:
            db.close()
        return [JournalEntry(r[0], r[1], r[2], r[3], r[4], r[5], bool(r[6])) for r in rows]

    def session_seqs(self, session_id: str, after_seq: int) -> set[int]:
        """Every seq of the session above after_seq held here, tombstones included."""
        db = sqlite3.connect(self.path)
        try:
            rows = db.execute(
                "SELECT seq FROM journal WHERE session_id = ? AND seq > ?", (session_id, after_seq)
            ).fetchall()
        finally:
            db.close()
        return {int(r[0]) for r in rows}

    def read_session(self, session_id: str, after_seq: int, limit: int) -> list[JournalEntry]:
        """The session's entries with seq above after_seq, in seq order (from disk: run it in
        a worker thread). Everything fanned out is on disk already: it is committed first."""
        db = sqlite3.connect(self.path)
        try:
            rows = db.execute(
                "SELECT position, session_id, patient_id, seq, edge_received_unix_ns, batch,"
                " rejected FROM journal WHERE session_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                (session_id, after_seq, limit),
            ).fetchall()
        finally:
            db.close()
        return [JournalEntry(r[0], r[1], r[2], r[3], r[4], r[5], bool(r[6])) for r in rows]

    def forwarded_position(self) -> int:
        row = self._db.execute("SELECT position FROM forwarded WHERE id = 1").fetchone()
        return int(row[0])

    def mark_forwarded(self, position: int, keep_s: float = 300.0) -> None:
        """Remember what the archive holds; prune what it has held for a while."""
        with self._db:
            self._db.execute(
                "UPDATE forwarded SET position = MAX(position, ?) WHERE id = 1", (position,)
            )
            now = time.monotonic()
            if now - self._pruned_at >= PRUNE_EVERY_S:
                # Pruning in bulk now and then: a DELETE per acknowledgement cost the
                # edge more than the journal writes themselves.
                self._pruned_at = now
                cutoff = time.time_ns() - int(keep_s * 1e9)
                self._db.execute(
                    "DELETE FROM journal WHERE position <= ? AND edge_received_unix_ns < ?",
                    (position, cutoff),
                )
        while self._tail and self._tail[0].position <= position:
            self._tail.popleft()

    async def close(self) -> None:
        if self._pending:
            self._flush()
        self._closed = True
        # A last full checkpoint, so the WAL does not carry the whole session to the next
        # start; then the thread's connection closes in the thread that used it.
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._checkpointer, self._checkpoint, "TRUNCATE")
        await loop.run_in_executor(self._checkpointer, self._close_checkpointer)
        self._checkpointer.shutdown(wait=True)
        self._db.close()
