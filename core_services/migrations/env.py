"""Alembic environment: runs on the connection the store hands over (sync side of async)."""

from __future__ import annotations

from alembic import context

from core_services.tables import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through core_services.store.migrate()")
context.configure(connection=connection, target_metadata=metadata)
with context.begin_transaction():
    context.run_migrations()
