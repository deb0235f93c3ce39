"""The core's store against real SQLite and real PostgreSQL (127.0.0.1:5432, database test)."""

from __future__ import annotations

import pytest
from sqlalchemy.exc import IntegrityError

from core_services.sessions.domain import EdgeState, Session, SessionState
from core_services.store import SqlStore


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
