"""The audit log in the core's SQL store: appends extend the chain under a lock on its head."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from core_services.audit.anchor import CheckpointFile
from core_services.audit.tables import audit_checkpoints, audit_head, audit_log
from telehealth.security.audit import (
    GENESIS,
    AuditEntry,
    AuditEvent,
    AuditKey,
    AuditReport,
    ChainProblem,
    Checkpoint,
    chain,
    verify,
    verify_anchored,
)

log = logging.getLogger(__name__)

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
    """Append-only: the only writes are inserts of new entries and checkpoints and the move of
    the head. With a key, every entry gets a MAC and every append a signed checkpoint, in the
    database and in `checkpoints` (a file outside it)."""

    def __init__(
        self,
        engine: AsyncEngine,
        key: AuditKey | None = None,
        checkpoints: CheckpointFile | None = None,
    ) -> None:
        self._engine = engine
        self._dialect = engine.dialect.name
        self.key = key
        self.checkpoints = checkpoints
        # In one process the lock orders appends; across core replicas on PostgreSQL the
        # row lock on the head (SELECT ... FOR UPDATE) does.
        self._lock = asyncio.Lock()

    async def _head(self, conn: AsyncConnection) -> tuple[int, str]:
        q = select(audit_head.c.seq, audit_head.c.hash).where(audit_head.c.id == HEAD_ID)
        if self._dialect == "postgresql":
            q = q.with_for_update()
        row = (await conn.execute(q)).first()
        if row is not None:
            return int(row.seq), str(row.hash)
        # No head row: a new log, or someone deleted it. Go on from the newest entry, so the
        # chain continues (and verify reports what was removed) instead of restarting at 1.
        last = (
            await conn.execute(
                select(audit_log.c.seq, audit_log.c.hash).order_by(audit_log.c.seq.desc()).limit(1)
            )
        ).first()
        seq, h = (0, GENESIS) if last is None else (int(last.seq), str(last.hash))
        if last is not None:
            log.error("audit head row missing; continuing the chain after its newest entry")
        await conn.execute(audit_head.insert().values(id=HEAD_ID, seq=seq, hash=h))
        return seq, h

    async def append(self, events: Sequence[AuditEvent]) -> list[AuditEntry]:
        if not events:
            return []
        checkpoint: Checkpoint | None = None
        async with self._lock:
            async with self._engine.begin() as conn:
                seq, prev = await self._head(conn)
                entries = chain(seq, prev, [e.clipped() for e in events], self.key)
                await conn.execute(
                    audit_log.insert(),
                    [
                        {
                            "seq": e.seq,
                            **e.event.__dict__,
                            "prev_hash": e.prev_hash,
                            "hash": e.hash,
                            "mac": e.mac or None,
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
                if self.key is not None:
                    checkpoint = self.key.sign(last.seq, last.hash, time.time_ns())
                    await conn.execute(
                        audit_checkpoints.insert().values(
                            seq=checkpoint.seq,
                            hash=checkpoint.hash,
                            at_unix_ns=checkpoint.at_unix_ns,
                            key_id=checkpoint.key_id,
                            signature=checkpoint.signature,
                        )
                    )
            # After the commit: a checkpoint must never name entries that did not commit.
            # Under the lock, so the file's lines are in chain order.
            if checkpoint is not None and self.checkpoints is not None:
                try:
                    self.checkpoints.append(checkpoint)
                except OSError:
                    log.exception(
                        "cannot write the audit checkpoint file; entries stay unanchored",
                        extra={"path": str(self.checkpoints.path)},
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
                yield AuditEntry(int(r.seq), _event_of(r), r.prev_hash, r.hash, r.mac or "")
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

    async def stored_checkpoints(self) -> list[Checkpoint]:
        async with self._engine.connect() as conn:
            rows = (await conn.execute(select(audit_checkpoints))).all()
        return [
            Checkpoint(int(r.seq), r.hash, int(r.at_unix_ns), r.key_id, r.signature) for r in rows
        ]

    async def count(self) -> int:
        async with self._engine.connect() as conn:
            return int(
                (await conn.execute(select(func.count()).select_from(audit_log))).scalar_one()
            )

    async def verify(self) -> tuple[int, list[ChainProblem]]:
        """(entries checked, problems); no problems means the chain is intact."""
        report = await self.report()
        return report.checked, report.problems

    async def report(self, files: Sequence[CheckpointFile] | None = None) -> AuditReport:
        """Everything verify checks. Without a key only the hash chain and head row are
        checked; with one, MACs and the signed checkpoints of the database and of `files`
        (default: this log's own checkpoint file)."""
        got = [e async for e in self.entries()]
        head = await self.head()
        if self.key is None:
            return AuditReport(checked=len(got), problems=verify(got, head))
        if files is None:
            files = [self.checkpoints] if self.checkpoints is not None else []
        cps = await self.stored_checkpoints()
        bad: list[str] = []
        missing: list[str] = []
        for f in files:
            try:
                found, corrupt = f.read()
            except FileNotFoundError:
                missing.append(str(f.path))
                continue
            cps += found
            bad += corrupt
        # The database's copies and the files' say the same where both exist; check each once.
        unique = list({(c.seq, c.hash, c.at_unix_ns, c.signature): c for c in cps}.values())
        report = verify_anchored(got, head, self.key, unique, bad)
        if missing and any(e.mac for e in got):
            report.problems.append(
                ChainProblem(
                    0,
                    f"checkpoint file {', '.join(missing)} is missing: the anchor outside the "
                    "database was removed (or verify looks in the wrong place: --checkpoints)",
                )
            )
        return report
