"""Alembic environment of the index: run on the connection :mod:`node.storage.schema` passes."""

from __future__ import annotations

from alembic import context

from node.storage.index import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run the index migrations with `ainode db upgrade`, which passes the connection")
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
