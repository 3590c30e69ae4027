"""Alembic environment: always run on a connection handed over by `service.record.store.upgrade_schema`."""

from alembic import context

from service.record.schema import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True, compare_type=True)
with context.begin_transaction():
    context.run_migrations()
