"""Alembic environment for the context store.

Migrations only run programmatically (``maestro db upgrade`` or ``Store.open(migrate=True)``),
which hand over an open connection in ``config.attributes["connection"]``; there is no
``alembic.ini`` and no URL here.
"""

from __future__ import annotations

from alembic import context

from maestro.store.models import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run Maestro migrations with `maestro db upgrade`, not the alembic CLI")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    # SQLite cannot ALTER most things in place; batch mode copies the table instead.
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
