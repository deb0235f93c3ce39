"""Tables of the audit context (created by migration 0003)."""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Integer, String, Table

from core_services.tables import metadata

audit_log = Table(
    "audit_log",
    metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("at_unix_ns", BigInteger, nullable=False),
    Column("subject", String(128), nullable=False),
    Column("role", String(16), nullable=False),
    Column("action", String(64), nullable=False),
    Column("patient_id", String(128), nullable=False),
    Column("session_id", String(64), nullable=False),
    Column("peer", String(256), nullable=False),
    Column("source", String(128), nullable=False),
    Column("outcome", String(16), nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
)

audit_head = Table(
    "audit_head",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("seq", BigInteger, nullable=False),
    Column("hash", String(64), nullable=False),
)
