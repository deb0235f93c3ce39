"""The audit chain on SQLite and PostgreSQL: edit or delete one row and `audit verify` names it."""

from __future__ import annotations

import io
import time
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import text

from clients.ctl import main as ctl
from core_services.audit.store import SqlAuditLog
from core_services.store import SqlStore
from telehealth.security.audit import AuditEvent, entry_hash


@pytest.fixture
def store(sql_store: SqlStore) -> SqlStore:
    return sql_store


def event(i: int) -> AuditEvent:
    return AuditEvent(
        at_unix_ns=time.time_ns(),
        subject=f"dr-{i % 3}",
        role="clinician",
        action="vitals.subscribe",
        patient_id=f"p-{i}",
        session_id=f"ses_{i}",
        peer="ipv4:127.0.0.1:5000",
        source="edge-a",
    )


async def filled(store: SqlStore, n: int = 10) -> SqlAuditLog:
    log = SqlAuditLog(store.engine)
    await log.append([event(i) for i in range(n // 2)])
    await log.append([event(i) for i in range(n // 2, n)])
    assert await log.verify() == (n, [])
    return log


async def test_an_edited_entry_is_named(store: SqlStore) -> None:
    log = await filled(store)
    async with store.engine.begin() as conn:
        await conn.execute(text("UPDATE audit_log SET subject = 'someone-else' WHERE seq = 4"))
    _, problems = await log.verify()
    assert [(p.seq, "edited" in p.what) for p in problems] == [(4, True)]


async def test_an_edited_and_rehashed_entry_is_named(store: SqlStore) -> None:
    log = await filled(store)
    # A careful forger recomputes the edited entry's own hash; the next entry still links to
    # the original, so the edit shows.
    six = [e async for e in log.entries()][5]
    forged = replace(six.event, patient_id="p-x")
    new_hash = entry_hash(six.prev_hash, 6, forged)
    async with store.engine.begin() as conn:
        await conn.execute(
            text("UPDATE audit_log SET patient_id = 'p-x', hash = :h WHERE seq = 6"),
            {"h": new_hash},
        )
    _, problems = await log.verify()
    assert {p.seq for p in problems} == {6}


@pytest.mark.parametrize("seq", [1, 5, 10], ids=["first", "middle", "last"])
async def test_a_deleted_entry_is_named(store: SqlStore, seq: int) -> None:
    log = await filled(store)
    async with store.engine.begin() as conn:
        await conn.execute(text(f"DELETE FROM audit_log WHERE seq = {seq}"))
    _, problems = await log.verify()
    assert problems and problems[0].seq == seq and "deleted" in problems[0].what


async def test_ctl_audit_verify_exits_1_naming_the_entry(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'core.db'}"
    store = SqlStore(url)
    await store.start()
    await filled(store)
    out = io.StringIO()
    assert await _ctl(["audit", "--database-url", url, "verify"], out) == 0
    assert "intact: 10 entries" in out.getvalue()
    async with store.engine.begin() as conn:
        await conn.execute(text("UPDATE audit_log SET peer = 'ipv4:10.0.0.9:1' WHERE seq = 7"))
    await store.close()
    out = io.StringIO()
    assert await _ctl(["audit", "--database-url", url, "verify"], out) == 1
    assert "TAMPERED entry 7: edited" in out.getvalue()


async def _ctl(argv: list[str], out: io.StringIO) -> int:
    import asyncio

    # The ctl runs its own event loop; give it a thread so this test's loop is not nested.
    return await asyncio.to_thread(ctl, argv, out)
