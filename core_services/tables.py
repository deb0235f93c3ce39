"""SQLAlchemy tables of the core's store (the schema Alembic migrations create)."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    false,
)

metadata = MetaData()

sessions = Table(
    "sessions",
    metadata,
    Column("session_id", String(64), primary_key=True),
    Column("patient_id", String(128), nullable=False),
    Column("device_id", String(128), nullable=False, default=""),
    Column("zone", String(64), nullable=False),
    Column("edge_id", String(128), nullable=False),
    Column("spo2_scale", Integer, nullable=False),
    Column("state", String(16), nullable=False),
    Column("opened_unix_ns", BigInteger, nullable=False),
    Column("closed_unix_ns", BigInteger, nullable=False, default=0),
    Column("placements", Integer, nullable=False, default=1),
    Index("ix_sessions_state_edge", "state", "edge_id"),
)

edges = Table(
    "edges",
    metadata,
    Column("edge_id", String(128), primary_key=True),
    Column("zone", String(64), nullable=False),
    Column("address", String(256), nullable=False),
    Column("state", String(16), nullable=False),
    Column("capacity_sessions", Integer, nullable=False),
    Column("last_heartbeat_unix_ns", BigInteger, nullable=False),
    Column("tls_server_name", String(256), nullable=False, default=""),
)

archived_batches = Table(
    "archived_batches",
    metadata,
    Column("session_id", String(64), primary_key=True),
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("patient_id", String(128), nullable=False),
    Column("edge_id", String(128), nullable=False),
    Column("device_time_unix_ns", BigInteger, nullable=False),
    Column("edge_received_unix_ns", BigInteger, nullable=False),
    Column("archived_unix_ns", BigInteger, nullable=False),
    Column("batch", LargeBinary, nullable=False),
    # A seq the edge refused: consumed (the watermark passes it) but holding no vitals.
    Column("rejected", Boolean, nullable=False, server_default=false()),
    Index("ix_archived_batches_patient_time", "patient_id", "device_time_unix_ns"),
)

archive_watermarks = Table(
    "archive_watermarks",
    metadata,
    Column("session_id", String(64), primary_key=True),
    Column("archived_seq", BigInteger, nullable=False),
)
