"""Alembic's environment: migrate the connection :func:`anylearn_sdk.server.db.upgrade_schema`
hands over (``config.attributes["connection"]``), against the models' metadata.

New revision: ``alembic -c anylearn_sdk/server/migrations/alembic.ini revision --autogenerate
-m "what changed"`` (compares the models with a database at head), then read and edit it.
"""

from __future__ import annotations

from alembic import context

from anylearn_sdk.server.db import Base

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=True,  # SQLite alters a table by copying it; batch mode does that
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
