"""Tables of the audit context (created by migrations 0003 and 0005)."""

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
    # HMAC under the audit key (not in the database); NULL for entries from before 0005.
    Column("mac", String(64), nullable=True),
)

audit_head = Table(
    "audit_head",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("seq", BigInteger, nullable=False),
    Column("hash", String(64), nullable=False),
)

# Signed heads, one per append; the same lines go to an append-only file outside the database.
audit_checkpoints = Table(
    "audit_checkpoints",
    metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("hash", String(64), nullable=False),
    # In the key too: after a tampered tail the chain goes on and a seq is signed again.
    Column("at_unix_ns", BigInteger, primary_key=True, autoincrement=False),
    Column("key_id", String(32), nullable=False),
    Column("signature", String(128), nullable=False),
)
