"""Archive persistence: batches keyed by (session, seq), so a repeat is a no-op, and watermarks."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select, tuple_
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from core_services.store import SqlStore
from core_services.tables import archive_watermarks, archived_batches


@dataclass(frozen=True)
class StoredBatch:
    session_id: str
    seq: int
    patient_id: str
    edge_id: str
    device_time_unix_ns: int
    edge_received_unix_ns: int
    batch: bytes
    # A tombstone: the edge refused this seq; it counts for the watermark, holds no vitals.
    rejected: bool = False


class ArchiveStore:
    def __init__(self, store: SqlStore) -> None:
        self._store = store
        self._insert = pg_insert if store.dialect == "postgresql" else sqlite_insert

    async def append(self, rows: list[StoredBatch], watermarks: dict[str, int]) -> None:
        """Insert the batches (existing (session, seq) left as they are) and the new
        watermarks, in one transaction."""
        now = time.time_ns()
        async with self._store.engine.begin() as conn:
            if rows:
                await conn.execute(
                    self._insert(archived_batches).on_conflict_do_nothing(
                        index_elements=["session_id", "seq"]
                    ),
                    [
                        {
                            "session_id": r.session_id,
                            "seq": r.seq,
                            "patient_id": r.patient_id,
                            "edge_id": r.edge_id,
                            "device_time_unix_ns": r.device_time_unix_ns,
                            "edge_received_unix_ns": r.edge_received_unix_ns,
                            "archived_unix_ns": now,
                            "batch": r.batch,
                            "rejected": r.rejected,
                        }
                        for r in rows
                    ],
                )
            if watermarks:
                # One statement for every session touched (not one per session).
                stmt = self._insert(archive_watermarks)
                greatest = func.max if self._store.dialect == "sqlite" else func.greatest
                await conn.execute(
                    stmt.on_conflict_do_update(
                        index_elements=["session_id"],
                        set_={
                            "archived_seq": greatest(
                                archive_watermarks.c.archived_seq, stmt.excluded.archived_seq
                            )
                        },
                    ),
                    [{"session_id": sid, "archived_seq": seq} for sid, seq in watermarks.items()],
                )

    async def watermark(self, session_id: str) -> tuple[int, list[int]]:
        """The stored watermark and the seqs stored above it (to resume dedup after restart)."""
        async with self._store.engine.connect() as conn:
            wm = (
                await conn.execute(
                    select(archive_watermarks.c.archived_seq).where(
                        archive_watermarks.c.session_id == session_id
                    )
                )
            ).scalar_one_or_none() or 0
            above = (
                (
                    await conn.execute(
                        select(archived_batches.c.seq)
                        .where(archived_batches.c.session_id == session_id)
                        .where(archived_batches.c.seq > wm)
                    )
                )
                .scalars()
                .all()
            )
        return int(wm), [int(s) for s in above]

    async def count(self, session_id: str) -> int:
        """Batches of vitals held for the session (tombstones not counted)."""
        t = archived_batches.c
        async with self._store.engine.connect() as conn:
            n = (
                await conn.execute(
                    select(func.count()).where(t.session_id == session_id, t.rejected.is_(False))
                )
            ).scalar_one()
        return int(n)

    async def query(
        self,
        *,
        patient_id: str = "",
        session_id: str = "",
        from_ns: int = 0,
        to_ns: int = 0,
        limit: int = 1000,
    ) -> list[StoredBatch]:
        # Tombstones hold no vitals: readers never see them.
        q = select(archived_batches).where(archived_batches.c.rejected.is_(False))
        if patient_id:
            q = q.where(archived_batches.c.patient_id == patient_id)
        if session_id:
            q = q.where(archived_batches.c.session_id == session_id)
        if from_ns:
            q = q.where(archived_batches.c.device_time_unix_ns >= from_ns)
        if to_ns:
            q = q.where(archived_batches.c.device_time_unix_ns < to_ns)
        q = q.order_by(
            archived_batches.c.device_time_unix_ns,
            archived_batches.c.session_id,
            archived_batches.c.seq,
        ).limit(limit)
        async with self._store.engine.connect() as conn:
            rows = (await conn.execute(q)).all()
        return [_row(r) for r in rows]

    async def scan_patient(
        self,
        patient_id: str,
        *,
        from_ns: int = 0,
        to_ns: int = 0,
        after: tuple[int, str, int] | None = None,
        limit: int = 1000,
    ) -> list[StoredBatch]:
        """One page of a patient's batches in (device time, session, seq) order, starting
        after the key `after` (keyset paging: no row repeats or is skipped between pages,
        and nothing earlier is held in memory)."""
        t = archived_batches.c
        q = select(archived_batches).where(t.patient_id == patient_id, t.rejected.is_(False))
        if from_ns:
            q = q.where(t.device_time_unix_ns >= from_ns)
        if to_ns:
            q = q.where(t.device_time_unix_ns < to_ns)
        if after is not None:
            q = q.where(tuple_(t.device_time_unix_ns, t.session_id, t.seq) > tuple_(*after))
        q = q.order_by(t.device_time_unix_ns, t.session_id, t.seq).limit(limit)
        async with self._store.engine.connect() as conn:
            rows = (await conn.execute(q)).all()
        return [_row(r) for r in rows]

    async def session_range(
        self, session_id: str, after_seq: int, through_seq: int, limit: int
    ) -> list[StoredBatch]:
        """A session's batches after_seq < seq <= through_seq in seq order, tombstones left
        out: what a live view missed, by the primary key (no scan by time)."""
        t = archived_batches.c
        q = (
            select(archived_batches)
            .where(t.session_id == session_id, t.seq > after_seq, t.seq <= through_seq)
            .where(t.rejected.is_(False))
            .order_by(t.seq)
            .limit(limit)
        )
        async with self._store.engine.connect() as conn:
            rows = (await conn.execute(q)).all()
        return [_row(r) for r in rows]


def _row(r: Any) -> StoredBatch:
    return StoredBatch(
        session_id=r.session_id,
        seq=r.seq,
        patient_id=r.patient_id,
        edge_id=r.edge_id,
        device_time_unix_ns=r.device_time_unix_ns,
        edge_received_unix_ns=r.edge_received_unix_ns,
        batch=bytes(r.batch),
        rejected=bool(r.rejected),
    )
