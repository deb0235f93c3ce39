"""Tables of the auth context (created by migration 0003)."""

from __future__ import annotations

from sqlalchemy import BigInteger, Boolean, Column, ForeignKey, String, Table

from core_services.tables import metadata

users = Table(
    "users",
    metadata,
    Column("user_id", String(128), primary_key=True),
    Column("role", String(16), nullable=False),
    Column("password_hash", String(256), nullable=False),
    Column("created_unix_ns", BigInteger, nullable=False),
    Column("disabled", Boolean, nullable=False, default=False),
)

assignments = Table(
    "assignments",
    metadata,
    Column("user_id", String(128), ForeignKey("users.user_id"), primary_key=True),
    Column("patient_id", String(128), primary_key=True),
)
