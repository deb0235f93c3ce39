"""The core's store against real SQLite and real PostgreSQL (127.0.0.1:5432, database test)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from alembic import command
from alembic.config import Config
from prometheus_client import CollectorRegistry
from sqlalchemy import Connection, text
from sqlalchemy.exc import IntegrityError

from core_services.archive.archive import Archive
from core_services.archive.store import ArchiveStore, StoredBatch
from core_services.sessions.domain import EdgeState, Session, SessionState
from core_services.store import MIGRATIONS, SqlStore
from telehealth.telemetry.metrics import CoreMetrics
from telehealth.v1 import archive_pb2, vitals_pb2


@pytest.fixture
def store(sql_store: SqlStore) -> SqlStore:
    return sql_store


def session(sid: str, edge: str = "edge-a", state: SessionState = SessionState.OPEN) -> Session:
    return Session(sid, "p-" + sid, "zone-a", edge, 2, state, opened_unix_ns=len(sid) * 1000)


async def test_sessions_round_trip(store: SqlStore) -> None:
    await store.add_session(session("s1"))
    await store.add_session(session("s22", "edge-b"))
    got = await store.get_session("s1")
    assert got == session("s1")
    moved = session("s22", "edge-b").moved_to("edge-c")
    await store.save_session(moved)
    assert await store.get_session("s22") == moved
    closed = session("s1", state=SessionState.CLOSED)
    await store.save_session(closed)
    assert [s.session_id for s in await store.open_sessions()] == ["s22"]
    assert {s.session_id for s in await store.list_sessions(include_closed=True)} == {"s1", "s22"}
    assert await store.get_session("nope") is None


async def test_duplicate_session_id_is_refused(store: SqlStore) -> None:
    await store.add_session(session("dup"))
    with pytest.raises(IntegrityError):
        await store.add_session(session("dup"))
    assert len(await store.list_sessions(include_closed=True)) == 1


async def test_edges_upsert(store: SqlStore) -> None:
    for state in (EdgeState.HEALTHY, EdgeState.DEAD):
        await store.upsert_edge(
            edge_id="edge-a",
            zone="zone-a",
            address="127.0.0.1:1",
            state=state,
            capacity_sessions=10,
            last_heartbeat_unix_ns=5,
        )
    edges = await store.list_edges()
    assert len(edges) == 1 and edges[0]["state"] is EdgeState.DEAD


async def test_migrations_are_idempotent(store: SqlStore) -> None:
    await store.add_session(session("keep"))
    await store.start()  # a restart runs the migrations again: nothing changes, nothing lost
    assert (await store.get_session("keep")) is not None


def stored(sid: str, seq: int, t_ns: int, *, rejected: bool = False) -> StoredBatch:
    b = vitals_pb2.VitalsBatch(session_id=sid, seq=seq)
    if not rejected:
        b.device_time_unix_ns = t_ns
        b.vitals.add(device_time_unix_ns=t_ns, heart_rate_bpm=60 + seq)
    return StoredBatch(
        session_id=sid,
        seq=seq,
        patient_id="p-arch",
        edge_id="edge-a",
        device_time_unix_ns=0 if rejected else t_ns,
        edge_received_unix_ns=t_ns + 1,
        batch=b.SerializeToString(),
        rejected=rejected,
    )


async def test_archive_store_keeps_tombstones_out_of_every_read(store: SqlStore) -> None:
    archive = ArchiveStore(store)
    rows = [stored("s-arch", s, s * 1_000_000_000) for s in (1, 2, 4, 5)]
    rows.append(stored("s-arch", 3, 0, rejected=True))
    await archive.append(rows, {"s-arch": 5})
    # A repeat (an edge resending after a reconnect) changes nothing.
    await archive.append(rows[:2], {"s-arch": 2})
    wm, above = await archive.watermark("s-arch")
    assert (wm, above) == (5, [])
    assert await archive.count("s-arch") == 4
    got = await archive.query(session_id="s-arch")
    assert [r.seq for r in got] == [1, 2, 4, 5]
    assert not any(r.rejected for r in got)
    # The time window is [from, to): seq 2 at 2 s up to, not including, seq 5 at 5 s.
    window = await archive.query(patient_id="p-arch", from_ns=2_000_000_000, to_ns=5_000_000_000)
    assert [r.seq for r in window] == [2, 4]
    page1 = await archive.scan_patient("p-arch", limit=2)
    page2 = await archive.scan_patient(
        "p-arch", after=(page1[-1].device_time_unix_ns, "s-arch", page1[-1].seq), limit=2
    )
    assert [r.seq for r in page1 + page2] == [1, 2, 4, 5]
    assert vitals_pb2.VitalsBatch.FromString(page2[0].batch).vitals[0].heart_rate_bpm == 64


async def test_tombstone_migration_keeps_archived_rows(store: SqlStore) -> None:
    """0004 adds the rejected column to an archive that already holds batches."""

    def to(revision: str) -> Callable[[Connection], None]:
        def run(conn: Connection) -> None:
            cfg = Config()
            cfg.set_main_option("script_location", str(MIGRATIONS))
            cfg.attributes["connection"] = conn
            if revision == "head":
                command.upgrade(cfg, revision)
            else:
                command.downgrade(cfg, revision)

        return run

    async with store.engine.begin() as conn:
        await conn.run_sync(to("0003"))
    async with store.engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO archived_batches (session_id, seq, patient_id, edge_id,"
                " device_time_unix_ns, edge_received_unix_ns, archived_unix_ns, batch)"
                " VALUES ('s-old', 1, 'p-old', 'edge-a', 5, 6, 7, :b)"
            ),
            {"b": stored("s-old", 1, 5).batch},
        )
    async with store.engine.begin() as conn:
        await conn.run_sync(to("head"))
    archive = ArchiveStore(store)
    got = await archive.query(session_id="s-old")
    assert [(r.seq, r.rejected) for r in got] == [(1, False)]


class HeldStore(ArchiveStore):
    """The real store, whose commits wait at a gate: the moment between an append's
    decision and its commit, held open so a reader can look in."""

    def __init__(self, store: SqlStore) -> None:
        super().__init__(store)
        self.writing = asyncio.Event()
        self.gate = asyncio.Event()

    async def append(self, rows: list[StoredBatch], watermarks: dict[str, int]) -> None:
        self.writing.set()
        await self.gate.wait()
        await super().append(rows, watermarks)


async def test_no_reader_hears_of_a_watermark_before_its_rows_are_committed(
    store: SqlStore,
) -> None:
    """A device drops from its backlog what is below the archived watermark, and the console
    stops filling a hole once the watermark passes it: the watermark must never run ahead of
    the rows a reader can read (it once did, moved in memory before the commit)."""
    held = HeldStore(store)
    archive = Archive(held, CoreMetrics(CollectorRegistry()))

    def batches(*seqs: int) -> list[archive_pb2.ArchivedBatch]:
        return [
            archive_pb2.ArchivedBatch(
                session_id="s-held",
                patient_id="p-held",
                batch=vitals_pb2.VitalsBatch(session_id="s-held", seq=s),
            )
            for s in seqs
        ]

    held.gate.set()
    assert (await archive.append("edge-a", batches(1, 2)))[0] == {"s-held": 2}
    held.gate.clear()
    held.writing.clear()
    appending = asyncio.create_task(archive.append("edge-a", batches(3, 4, 5)))
    await asyncio.wait_for(held.writing.wait(), 10)
    # Mid-commit: the reader hears the old watermark, and every row it names is there.
    assert await archive.archived_seq("s-held") == 2
    assert [r.seq for r in await held.session_range("s-held", 0, 5, 10)] == [1, 2]
    held.gate.set()
    assert (await asyncio.wait_for(appending, 10))[0] == {"s-held": 5}
    assert await archive.archived_seq("s-held") == 5
    assert [r.seq for r in await held.session_range("s-held", 0, 5, 10)] == [1, 2, 3, 4, 5]
