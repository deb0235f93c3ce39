"""Archive of every accepted vitals batch, and per-session durable watermarks.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    op.create_table(
        "archived_batches",
        sa.Column("session_id", sa.String(64), primary_key=True),
        sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("patient_id", sa.String(128), nullable=False),
        sa.Column("edge_id", sa.String(128), nullable=False),
        sa.Column("device_time_unix_ns", sa.BigInteger, nullable=False),
        sa.Column("edge_received_unix_ns", sa.BigInteger, nullable=False),
        sa.Column("archived_unix_ns", sa.BigInteger, nullable=False),
        sa.Column("batch", sa.LargeBinary, nullable=False),
    )
    op.create_index(
        "ix_archived_batches_patient_time",
        "archived_batches",
        ["patient_id", "device_time_unix_ns"],
    )
    op.create_table(
        "archive_watermarks",
        sa.Column("session_id", sa.String(64), primary_key=True),
        sa.Column("archived_seq", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("archive_watermarks")
    op.drop_index("ix_archived_batches_patient_time", "archived_batches")
    op.drop_table("archived_batches")
