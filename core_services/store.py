"""The core's durable store through SQLAlchemy 2 async: SQLite by default, PostgreSQL by URL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, event, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from core_services.sessions.domain import EdgeState, Session, SessionState
from core_services.tables import edges, sessions

MIGRATIONS = Path(__file__).parent / "migrations"


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # WAL: readers never wait for the writer. synchronous=NORMAL: a commit survives the
    # process dying (the kill -9 case); only a power cut may lose the last ones.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def _migrate(conn: Connection) -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = conn
    command.upgrade(cfg, "head")


def _session_from(row: Any) -> Session:
    return Session(
        session_id=row.session_id,
        patient_id=row.patient_id,
        device_id=row.device_id,
        zone=row.zone,
        edge_id=row.edge_id,
        spo2_scale=row.spo2_scale,
        state=SessionState[row.state],
        opened_unix_ns=row.opened_unix_ns,
        closed_unix_ns=row.closed_unix_ns,
        placements=row.placements,
    )


def _session_values(s: Session) -> dict[str, Any]:
    return {
        "session_id": s.session_id,
        "patient_id": s.patient_id,
        "device_id": s.device_id,
        "zone": s.zone,
        "edge_id": s.edge_id,
        "spo2_scale": s.spo2_scale,
        "state": s.state.name,
        "opened_unix_ns": s.opened_unix_ns,
        "closed_unix_ns": s.closed_unix_ns,
        "placements": s.placements,
    }


class SqlStore:
    """Sessions and edges in SQL; the schema comes from the Alembic migrations."""

    def __init__(self, url: str, **engine_kwargs: Any) -> None:
        self.url = url
        u = make_url(url)
        self.dialect = u.get_backend_name()
        if self.dialect == "sqlite" and u.database not in (None, "", ":memory:"):
            Path(u.database).parent.mkdir(parents=True, exist_ok=True)
        self.engine: AsyncEngine = create_async_engine(url, **engine_kwargs)
        if self.dialect == "sqlite":
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)

    async def start(self) -> None:
        async with self.engine.begin() as conn:
            await conn.run_sync(_migrate)

    async def close(self) -> None:
        await self.engine.dispose()

    async def add_session(self, s: Session) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(sessions.insert().values(**_session_values(s)))

    async def save_session(self, s: Session) -> None:
        values = _session_values(s)
        async with self.engine.begin() as conn:
            await conn.execute(
                update(sessions).where(sessions.c.session_id == s.session_id).values(**values)
            )

    async def move_session(self, s: Session, from_edge: str) -> bool:
        """Save a move only if the session is still where the mover saw it (several core
        replicas may race to re-place the same session)."""
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(sessions)
                .where(sessions.c.session_id == s.session_id)
                .where(sessions.c.edge_id == from_edge)
                .values(**_session_values(s))
            )
        return bool(result.rowcount)

    async def claim_edge_death(self, edge_id: str) -> bool:
        """Mark an edge dead unless someone already did; True for the one caller that did."""
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(edges)
                .where(edges.c.edge_id == edge_id)
                .where(edges.c.state != EdgeState.DEAD.name)
                .values(state=EdgeState.DEAD.name)
            )
        return bool(result.rowcount)

    async def touch_edges(self, beats: dict[str, int]) -> None:
        """Record the last heartbeat time of edges this replica hears from."""
        if not beats:
            return
        async with self.engine.begin() as conn:
            for edge_id, unix_ns in beats.items():
                await conn.execute(
                    update(edges)
                    .where(edges.c.edge_id == edge_id)
                    .values(last_heartbeat_unix_ns=unix_ns)
                )

    async def get_session(self, session_id: str) -> Session | None:
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(select(sessions).where(sessions.c.session_id == session_id))
            ).first()
        return None if row is None else _session_from(row)

    async def open_sessions(self) -> list[Session]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(sessions).where(sessions.c.state == SessionState.OPEN.name)
            )
            return [_session_from(r) for r in rows]

    async def list_sessions(self, include_closed: bool) -> list[Session]:
        q = select(sessions).order_by(sessions.c.opened_unix_ns)
        if not include_closed:
            q = q.where(sessions.c.state == SessionState.OPEN.name)
        async with self.engine.connect() as conn:
            return [_session_from(r) for r in await conn.execute(q)]

    async def upsert_edge(
        self,
        *,
        edge_id: str,
        zone: str,
        address: str,
        state: EdgeState,
        capacity_sessions: int,
        last_heartbeat_unix_ns: int,
        tls_server_name: str = "",
    ) -> None:
        values = {
            "edge_id": edge_id,
            "zone": zone,
            "address": address,
            "state": state.name,
            "capacity_sessions": capacity_sessions,
            "last_heartbeat_unix_ns": last_heartbeat_unix_ns,
            "tls_server_name": tls_server_name,
        }
        ins = (pg_insert if self.dialect == "postgresql" else sqlite_insert)(edges).values(**values)
        stmt = ins.on_conflict_do_update(
            index_elements=[edges.c.edge_id],
            set_={k: v for k, v in values.items() if k != "edge_id"},
        )
        async with self.engine.begin() as conn:
            await conn.execute(stmt)

    async def list_edges(self) -> list[dict[str, Any]]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(select(edges).order_by(edges.c.edge_id))
            return [{**r._asdict(), "state": EdgeState[r.state]} for r in rows]
