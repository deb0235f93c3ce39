"""The name in an edge's server certificate, for clients that dial it by IP address.

Every core replica hands it out in assignments, also for edges whose heartbeat stream another
replica holds, so it lives with the edge's row.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"


def upgrade() -> None:
    # Edges known before this column re-send the name in their next heartbeat stream.
    op.add_column(
        "edges",
        sa.Column("tls_server_name", sa.String(256), nullable=False, server_default=""),
    )


def downgrade() -> None:
    with op.batch_alter_table("edges") as batch:
        batch.drop_column("tls_server_name")
