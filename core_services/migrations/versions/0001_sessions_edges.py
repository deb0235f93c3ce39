"""Sessions and edges tables.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None


def upgrade() -> None:
    op.create_table(
        "sessions",
        sa.Column("session_id", sa.String(64), primary_key=True),
        sa.Column("patient_id", sa.String(128), nullable=False),
        sa.Column("device_id", sa.String(128), nullable=False),
        sa.Column("zone", sa.String(64), nullable=False),
        sa.Column("edge_id", sa.String(128), nullable=False),
        sa.Column("spo2_scale", sa.Integer, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("opened_unix_ns", sa.BigInteger, nullable=False),
        sa.Column("closed_unix_ns", sa.BigInteger, nullable=False),
        sa.Column("placements", sa.Integer, nullable=False),
    )
    op.create_index("ix_sessions_state_edge", "sessions", ["state", "edge_id"])
    op.create_table(
        "edges",
        sa.Column("edge_id", sa.String(128), primary_key=True),
        sa.Column("zone", sa.String(64), nullable=False),
        sa.Column("address", sa.String(256), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("capacity_sessions", sa.Integer, nullable=False),
        sa.Column("last_heartbeat_unix_ns", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("edges")
    op.drop_index("ix_sessions_state_edge", "sessions")
    op.drop_table("sessions")
