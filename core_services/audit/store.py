"""The audit log in the core's SQL store: appends extend the chain under a lock on its head."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from core_services.audit.tables import audit_head, audit_log
from telehealth.security.audit import (
    GENESIS,
    AuditEntry,
    AuditEvent,
    ChainProblem,
    chain,
    verify,
)

HEAD_ID = 1
PAGE = 5000


def _event_of(row: Any) -> AuditEvent:
    return AuditEvent(
        at_unix_ns=row.at_unix_ns,
        subject=row.subject,
        role=row.role,
        action=row.action,
        patient_id=row.patient_id,
        session_id=row.session_id,
        peer=row.peer,
        source=row.source,
        outcome=row.outcome,
    )


class SqlAuditLog:
    """Append-only: the only writes are inserts of new entries and the move of the head."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._dialect = engine.dialect.name
        # In one process the lock orders appends; across core replicas on PostgreSQL the
        # row lock on the head (SELECT ... FOR UPDATE) does.
        self._lock = asyncio.Lock()

    async def _head(self, conn: AsyncConnection) -> tuple[int, str]:
        q = select(audit_head.c.seq, audit_head.c.hash).where(audit_head.c.id == HEAD_ID)
        if self._dialect == "postgresql":
            q = q.with_for_update()
        row = (await conn.execute(q)).first()
        if row is None:
            await conn.execute(audit_head.insert().values(id=HEAD_ID, seq=0, hash=GENESIS))
            return 0, GENESIS
        return int(row.seq), str(row.hash)

    async def append(self, events: Sequence[AuditEvent]) -> list[AuditEntry]:
        if not events:
            return []
        async with self._lock, self._engine.begin() as conn:
            seq, prev = await self._head(conn)
            entries = chain(seq, prev, [e.clipped() for e in events])
            await conn.execute(
                audit_log.insert(),
                [
                    {
                        "seq": e.seq,
                        **e.event.__dict__,
                        "prev_hash": e.prev_hash,
                        "hash": e.hash,
                    }
                    for e in entries
                ],
            )
            last = entries[-1]
            await conn.execute(
                update(audit_head)
                .where(audit_head.c.id == HEAD_ID)
                .values(seq=last.seq, hash=last.hash)
            )
        return entries

    async def entries(self, patient_id: str = "") -> AsyncIterator[AuditEntry]:
        after = 0
        while True:
            q = select(audit_log).where(audit_log.c.seq > after).order_by(audit_log.c.seq)
            if patient_id:
                q = q.where(audit_log.c.patient_id == patient_id)
            async with self._engine.connect() as conn:
                rows = (await conn.execute(q.limit(PAGE))).all()
            for r in rows:
                yield AuditEntry(int(r.seq), _event_of(r), r.prev_hash, r.hash)
            if len(rows) < PAGE:
                return
            after = int(rows[-1].seq)

    async def head(self) -> tuple[int, str] | None:
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(
                    select(audit_head.c.seq, audit_head.c.hash).where(audit_head.c.id == HEAD_ID)
                )
            ).first()
        return None if row is None else (int(row.seq), str(row.hash))

    async def verify(self) -> tuple[int, list[ChainProblem]]:
        """(entries checked, problems); no problems means the chain is intact."""
        got = [e async for e in self.entries()]
        return len(got), verify(got, await self.head())
