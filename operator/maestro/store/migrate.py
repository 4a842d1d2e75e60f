"""Schema migrations (Alembic), run programmatically on the store's async engine."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Connection, inspect, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection

from maestro.store.database import connect, make_engine
from maestro.store.errors import SchemaError
from maestro.store.urls import describe, parse_url, scrub

if TYPE_CHECKING:
    from alembic.config import Config

# Alembic is imported only when a schema is not at head (to migrate, or to name what is
# wrong): a process whose store is current (the operator, after the chart's initContainer
# ran `maestro db upgrade`) never carries it, ~14 MiB of memory less.

_MIGRATIONS = Path(__file__).parent / "migrations"
# The table Alembic keeps the revision in (alembic.runtime.migration's default).
_VERSION_TABLE = "alembic_version"

# Serialises concurrent upgrades (e.g. two operator replicas starting together) on
# PostgreSQL; the value is arbitrary but fixed ("maestro" in ASCII).
_ADVISORY_LOCK_KEY = 0x6D61657374726F


def _config(connection: Connection | None = None) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head() -> str:
    """The schema revision this Maestro needs (the newest migration).

    Read from the file names, without Alembic: each migration's revision is its file's
    name, numbered in order (tests/store/test_schema.py holds Alembic to the same head).
    """
    revisions = sorted(p.stem for p in (_MIGRATIONS / "versions").glob("[0-9]*.py"))
    if not revisions:
        raise SchemaError("no migrations are packaged with this Maestro")
    return revisions[-1]


def _known(rev: str) -> bool:
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    try:
        return ScriptDirectory.from_config(_config()).get_revision(rev) is not None
    except CommandError:
        return False


def _current(connection: Connection) -> str | None:
    if not inspect(connection).has_table(_VERSION_TABLE):
        return None
    version = connection.scalar(text(f"SELECT version_num FROM {_VERSION_TABLE}"))
    return None if version is None else str(version)


class _Failed(Exception):
    """Alembic refused the upgrade (its CommandError, whose module is imported late)."""


def _upgrade(connection: Connection) -> None:
    from alembic import command
    from alembic.util import CommandError

    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _ADVISORY_LOCK_KEY})
    try:
        command.upgrade(_config(connection), "head")
    except CommandError as exc:
        raise _Failed(str(exc)) from None


async def ensure_schema(conn: AsyncConnection, url: URL, *, migrate: bool) -> str:
    """Check the schema on ``conn``; upgrade it to head when ``migrate`` is true.

    Returns the revision the database is at afterwards. Raises :class:`SchemaError`
    when the schema is missing or older (and ``migrate`` is false), unknown to this
    Maestro, or when the migration fails.
    """
    need = head()
    async with conn.begin():
        have = await conn.run_sync(_current)
    if have == need:
        return have
    if have is not None and not _known(have):
        raise SchemaError(
            f"database schema is at {have}, which this Maestro does not know (it needs {need}): "
            "is a newer Maestro using this database?"
        )
    if not migrate:
        raise SchemaError(
            f"database schema is at {have or 'no revision'} but this Maestro needs {need}: "
            "run `maestro db upgrade`"
        )
    try:
        async with conn.begin():
            await conn.run_sync(_upgrade)
    except (SQLAlchemyError, _Failed) as exc:
        raise SchemaError(
            f"migrating {describe(url)} to {need} failed: {scrub(str(exc), url)}"
        ) from None
    return need


async def upgrade(url: str, *, connect_timeout: float = 5.0) -> str:
    """Migrate the database at ``url`` to :func:`head`; returns the revision reached."""
    parsed = parse_url(url)
    engine = make_engine(parsed, connect_timeout=connect_timeout)
    try:
        async with connect(engine, parsed, connect_timeout) as conn:
            return await ensure_schema(conn, parsed, migrate=True)
    finally:
        await engine.dispose()


async def current(url: str, *, connect_timeout: float = 5.0) -> str | None:
    """The schema revision of the database at ``url`` (None when it has none)."""
    parsed = parse_url(url)
    engine = make_engine(parsed, connect_timeout=connect_timeout)
    try:
        async with connect(engine, parsed, connect_timeout) as conn, conn.begin():
            return await conn.run_sync(_current)
    finally:
        await engine.dispose()
