"""The audit chain on SQLite and PostgreSQL: edit, re-hash, delete a middle entry or cut the tail
(newest entries and the head row) in the database, and `audit verify` names what is wrong."""

from __future__ import annotations

import asyncio
import io
import time
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import text

from clients.ctl import main as ctl
from core_services.audit.anchor import CheckpointFile
from core_services.audit.store import SqlAuditLog
from core_services.store import SqlStore
from telehealth.security.audit import GENESIS, AuditEvent, AuditKey, entry_hash


@pytest.fixture
def store(sql_store: SqlStore) -> SqlStore:
    return sql_store


@pytest.fixture
def key(tmp_path: Path) -> AuditKey:
    return AuditKey.load_or_create(tmp_path / "keys" / "audit.key")


@pytest.fixture
def anchor(tmp_path: Path) -> CheckpointFile:
    return CheckpointFile(tmp_path / "audit-checkpoints.jsonl")


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


async def filled(
    store: SqlStore, key: AuditKey, anchor: CheckpointFile, n: int = 10
) -> SqlAuditLog:
    log = SqlAuditLog(store.engine, key, anchor)
    for i in range(n):  # one append per entry: a checkpoint after each, as reads come in
        await log.append([event(i)])
    report = await log.report()
    assert (report.checked, report.problems, report.checkpoints) == (n, [], n)
    return log


async def problems_of(log: SqlAuditLog) -> list[tuple[int, str]]:
    return [(p.seq, p.what) for p in (await log.report()).problems]


async def test_an_edited_entry_is_named(
    store: SqlStore, key: AuditKey, anchor: CheckpointFile
) -> None:
    log = await filled(store, key, anchor)
    async with store.engine.begin() as conn:
        await conn.execute(text("UPDATE audit_log SET subject = 'someone-else' WHERE seq = 4"))
    got = await problems_of(log)
    assert [s for s, _ in got] == [4] and "edited" in got[0][1]


async def test_a_rehashed_chain_is_named(
    store: SqlStore, key: AuditKey, anchor: CheckpointFile
) -> None:
    log = await filled(store, key, anchor)
    # A careful forger edits entry 6 and recomputes its hash and every later one, and the head:
    # the unkeyed chain is consistent again, but the MACs and checkpoints are not forgeable.
    entries = [e async for e in log.entries()]
    prev = entries[4].hash
    async with store.engine.begin() as conn:
        for e in entries[5:]:
            ev = replace(e.event, patient_id="p-x") if e.seq == 6 else e.event
            h = entry_hash(prev, e.seq, ev)
            await conn.execute(
                text(
                    "UPDATE audit_log SET patient_id = :p, prev_hash = :ph, hash = :h "
                    "WHERE seq = :s"
                ),
                {"p": ev.patient_id, "ph": prev, "h": h, "s": e.seq},
            )
            prev = h
        await conn.execute(text("UPDATE audit_head SET hash = :h"), {"h": prev})
    unkeyed = SqlAuditLog(store.engine)
    assert (await unkeyed.verify())[1] == [], "the plain hash chain alone cannot see this"
    got = await problems_of(log)
    assert got[0][0] == 6 and "MAC does not match" in got[0][1]


async def test_a_rehashed_chain_without_macs_is_caught_by_the_checkpoints(
    store: SqlStore, key: AuditKey, anchor: CheckpointFile
) -> None:
    log = await filled(store, key, anchor)
    entries = [e async for e in log.entries()]
    prev = GENESIS
    async with store.engine.begin() as conn:
        # Pretend the whole log predates keyed audit: strip MACs, re-hash from entry 1 on.
        for e in entries:
            ev = replace(e.event, subject="dr-x") if e.seq == 2 else e.event
            h = entry_hash(prev, e.seq, ev)
            await conn.execute(
                text(
                    "UPDATE audit_log SET subject = :u, prev_hash = :ph, hash = :h, mac = NULL "
                    "WHERE seq = :s"
                ),
                {"u": ev.subject, "ph": prev, "h": h, "s": e.seq},
            )
            prev = h
        await conn.execute(text("UPDATE audit_head SET hash = :h"), {"h": prev})
        await conn.execute(text("DELETE FROM audit_checkpoints"))
    got = await problems_of(log)
    assert got and got[0][0] == 2 and "signed checkpoint" in got[0][1]


async def test_a_deleted_middle_entry_is_named(
    store: SqlStore, key: AuditKey, anchor: CheckpointFile
) -> None:
    log = await filled(store, key, anchor)
    async with store.engine.begin() as conn:
        await conn.execute(text("DELETE FROM audit_log WHERE seq = 5"))
    got = await problems_of(log)
    assert got[0][0] == 5 and "deleted (entries 5 missing)" in got[0][1]


@pytest.mark.parametrize("also_db_checkpoints", [False, True], ids=["head", "head+checkpoints"])
async def test_a_truncated_tail_is_named(
    store: SqlStore, key: AuditKey, anchor: CheckpointFile, also_db_checkpoints: bool
) -> None:
    log = await filled(store, key, anchor)
    async with store.engine.begin() as conn:
        await conn.execute(text("DELETE FROM audit_log WHERE seq > 7"))
        await conn.execute(text("DELETE FROM audit_head"))
        if also_db_checkpoints:
            await conn.execute(text("DELETE FROM audit_checkpoints WHERE seq > 7"))
    got = await problems_of(log)
    assert len(got) == 1 and got[0][0] == 8
    assert "deleted (entries 8-10 missing" in got[0][1] and "names entry 10" in got[0][1]
    # The running core goes on after the newest entry left, not from 1 (no seq clash).
    more = await log.append([event(99)])
    assert more[0].seq == 8


async def test_a_removed_checkpoint_file_is_named(
    store: SqlStore, key: AuditKey, anchor: CheckpointFile
) -> None:
    log = await filled(store, key, anchor, n=3)
    anchor.path.unlink()
    got = await problems_of(log)
    assert any("checkpoint file" in w and "missing" in w for _, w in got)


async def test_entries_from_before_keyed_audit_are_noted_not_flagged(
    store: SqlStore, key: AuditKey, anchor: CheckpointFile
) -> None:
    await SqlAuditLog(store.engine).append([event(i) for i in range(3)])
    log = SqlAuditLog(store.engine, key, anchor)
    await log.append([event(3)])
    report = await log.report()
    assert report.problems == []
    assert report.notes == ["entries 1-3 predate keyed audit (hash chain only, no MAC)"]


async def _ctl(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    # The ctl runs its own event loop; give it a thread so this test's loop is not nested.
    code = await asyncio.to_thread(ctl, argv, out)
    return code, out.getvalue()


async def test_ctl_audit_verify_names_each_kind_of_tampering(tmp_path: Path) -> None:
    data = tmp_path / "core"
    url = f"sqlite+aiosqlite:///{data / 'core.db'}"
    key = AuditKey.load_or_create(data / "keys" / "audit.key")
    anchor = CheckpointFile(data / "audit-checkpoints.jsonl")
    store = SqlStore(url)
    await store.start()
    await filled(store, key, anchor)
    verify = ["audit", "--data-dir", str(data), "verify"]
    assert await _ctl(verify) == (
        0,
        "audit chain intact: 10 entries, 10 signed checkpoint(s) match\n",
    )
    async with store.engine.begin() as conn:
        await conn.execute(text("UPDATE audit_log SET peer = 'ipv4:10.0.0.9:1' WHERE seq = 7"))
    code, out = await _ctl(verify)
    assert code == 1 and "TAMPERED entry 7: edited" in out
    async with store.engine.begin() as conn:
        await conn.execute(text("DELETE FROM audit_log WHERE seq >= 9"))
        await conn.execute(text("DELETE FROM audit_head"))
    code, out = await _ctl(verify)
    assert code == 1 and "TAMPERED entry 9: deleted (entries 9-10 missing" in out
    await store.close()
    code, out = await _ctl([*verify, "--keys-dir", str(tmp_path / "nowhere")])
    assert code == 2 and "cannot verify: no audit key" in out
