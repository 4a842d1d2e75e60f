"""Opening the store: URL rules, schema checks, migrations, fail-fast and password hygiene."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, text
from sqlalchemy.ext.asyncio import create_async_engine

from fixtures.postgres import PostgresServer
from maestro.store import (
    InvalidDatabaseURL,
    SchemaError,
    Store,
    StoreUnavailable,
    current,
    head,
    upgrade,
)
from maestro.store.models import Base
from maestro.store.urls import parse_url

UNREACHABLE = "postgresql://nobody:s3cret@127.0.0.1:1/x"


def test_head_read_from_the_file_names_is_alembics_head() -> None:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from maestro.store import migrate

    cfg = Config()
    cfg.set_main_option("script_location", str(migrate._MIGRATIONS))
    assert head() == ScriptDirectory.from_config(cfg).get_current_head()


def test_a_current_store_is_opened_without_importing_alembic(tmp_path: Path) -> None:
    # What keeps the operator's memory down (store.migrate): checked in a fresh
    # interpreter, where nothing else imported Alembic first.
    url = f"sqlite:///{tmp_path / 'm.db'}"
    asyncio.run(upgrade(url))
    probe = (
        "import asyncio, sys\n"
        "from maestro.store import Store\n"
        "async def main():\n"
        f"    await (await Store.open({url!r})).close()\n"
        "asyncio.run(main())\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'alembic'))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"


async def test_unmigrated_database_is_refused_unless_migrating(database_url: str) -> None:
    with pytest.raises(
        SchemaError, match=rf"at no revision but this Maestro needs {head()}.*db upgrade"
    ):
        await Store.open(database_url)
    assert await current(database_url) is None

    store = await Store.open(database_url, migrate=True)
    await store.close()
    assert await current(database_url) == head()
    # Opening again without migrate now succeeds, and upgrading again is a no-op.
    store = await Store.open(database_url)
    await store.close()
    assert await upgrade(database_url) == head()


async def test_unknown_revision_is_refused_even_when_migrating(database_url: str) -> None:
    await upgrade(database_url)
    engine = create_async_engine(parse_url(database_url))
    async with engine.begin() as conn:
        await conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    await engine.dispose()
    for migrate in (False, True):
        with pytest.raises(SchemaError, match="at 9999, which this Maestro does not know"):
            await Store.open(database_url, migrate=migrate)


def _differences(connection: Connection) -> list[object]:
    return list(compare_metadata(MigrationContext.configure(connection), Base.metadata))


async def test_migrations_create_exactly_the_models(database_url: str) -> None:
    await upgrade(database_url)
    engine = create_async_engine(parse_url(database_url))
    async with engine.connect() as conn:
        differences = await conn.run_sync(_differences)
    await engine.dispose()
    assert differences == []


@pytest.mark.parametrize(
    "url",
    [
        "mysql://u:s3cret@db/x",
        "postgres+asyncpg://u:s3cret@db/x",
        "sqlite://",
        "sqlite:///:memory:",
        "not a url",
    ],
)
async def test_only_postgresql_and_explicit_sqlite_urls(url: str) -> None:
    with pytest.raises(InvalidDatabaseURL) as caught:
        await Store.open(url)
    assert "s3cret" not in str(caught.value)


async def test_unreachable_server_fails_fast_without_the_password(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    with pytest.raises(StoreUnavailable) as caught:
        await Store.open(UNREACHABLE, connect_timeout=2)
    message = str(caught.value)
    assert message.startswith("cannot connect to database 'x' at 127.0.0.1:1:")
    assert "\n" not in message
    assert caught.value.__cause__ is None
    assert caught.value.__context__ is None or "s3cret" not in str(caught.value.__context__)
    assert "s3cret" not in message
    assert all("s3cret" not in r.getMessage() for r in caplog.records)


async def test_wrong_password_names_the_server_not_the_password(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    dbname = postgres_url.rsplit("/", 1)[1]
    wrong = postgres_server.url(dbname, password="s3cret-but-wrong")
    with pytest.raises(StoreUnavailable) as caught:
        await Store.open(wrong)
    message = str(caught.value)
    assert f"database '{dbname}' at 127.0.0.1:{postgres_server.port}" in message
    assert "password authentication failed" in message
    assert "s3cret" not in message
    # The right password (from the fixture) really is checked and accepted.
    store = await Store.open(postgres_url, migrate=True)
    await store.close()


@pytest.mark.postgres
async def test_ping_follows_the_server_going_away_and_back(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    store = await Store.open(postgres_url, migrate=True)
    try:
        await store.ping()
        postgres_server.stop()
        try:
            with pytest.raises(StoreUnavailable, match=f"at 127.0.0.1:{postgres_server.port}"):
                await store.ping()
            with pytest.raises(StoreUnavailable):
                await store.list_runs()
        finally:
            postgres_server.start()
        await store.ping()
        assert await store.list_runs() == []
    finally:
        await store.close()


async def test_sqlite_file_in_a_missing_directory_is_unavailable(tmp_path: object) -> None:
    with pytest.raises(StoreUnavailable, match="SQLite database"):
        await Store.open(f"sqlite:///{tmp_path}/no/such/dir/maestro.db", migrate=True)


async def test_server_that_never_answers_times_out() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # hold the connection open, say nothing
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(StoreUnavailable) as caught:
            await Store.open(f"postgresql://u:s3cret@127.0.0.1:{port}/db", connect_timeout=1)
    finally:
        server.close()
    assert str(caught.value) == f"cannot connect to database 'db' at 127.0.0.1:{port}: " + (
        "no answer within 1s"
    )
