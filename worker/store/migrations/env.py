"""Alembic environment: run against the connection `worker.store.migrate` hands over."""

from alembic import context

from worker.store.tables import metadata

connection = context.config.attributes.get("connection")
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
