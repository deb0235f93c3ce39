"""Tombstones in the archive: a seq the edge refused is stored as consumed, without vitals.

Without them one rejected batch stopped the durable watermark for good (the archive only
advances over stored seqs without gaps), so the device kept everything after it.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    # Rows already archived are all accepted batches: false for them.
    op.add_column(
        "archived_batches",
        sa.Column("rejected", sa.Boolean(), nullable=False, server_default=sa.false()),
    )


def downgrade() -> None:
    with op.batch_alter_table("archived_batches") as batch:
        batch.drop_column("rejected")
