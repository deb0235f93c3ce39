"""Keyed audit: a MAC per entry and signed checkpoints of the chain's head.

An unkeyed hash chain with its head in the same database could be rewritten (re-hash every
later entry) or cut short (delete the newest entries and the head row) unnoticed. The MAC key
and the checkpoint signing key live with the core's keys, never in the database.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"


def upgrade() -> None:
    # Entries already written keep no MAC: `audit verify` reports them as predating keyed audit.
    op.add_column("audit_log", sa.Column("mac", sa.String(64), nullable=True))
    op.create_table(
        "audit_checkpoints",
        sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("hash", sa.String(64), nullable=False),
        # In the key too: after a tampered tail the chain goes on and a seq is signed again.
        sa.Column("at_unix_ns", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("signature", sa.String(128), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("audit_checkpoints")
    with op.batch_alter_table("audit_log") as batch:
        batch.drop_column("mac")
