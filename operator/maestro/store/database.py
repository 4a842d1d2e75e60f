"""Async engines for the store's two backends, and connecting to them fail-fast."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import URL
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from maestro.store.errors import StoreUnavailable
from maestro.store.urls import describe, scrub

# SQLite serialises writers with a file lock; wait this long for it rather than fail.
SQLITE_BUSY_TIMEOUT = 30.0


#: Connections one process keeps to PostgreSQL (a third more in bursts): a replica's
#: share of the server's max_connections (docs/operator.md, sizing).
POOL_SIZE = 30


def make_engine(
    url: URL,
    *,
    connect_timeout: float,
    pool_size: int = POOL_SIZE,
    idle_in_transaction: float | None = None,
) -> AsyncEngine:
    """Create (without connecting) the async engine for a URL from :func:`parse_url`.

    ``idle_in_transaction``: seconds after which PostgreSQL ends a transaction whose
    client went quiet (a replica paused mid-write): its row locks, which would keep
    others from its runs and buckets, go with it, and its late commit fails.
    """
    if url.get_backend_name() == "sqlite":
        engine = create_async_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT})
        _make_sqlite_transactions_immediate(engine)
        return engine
    # libpq takes whole seconds and treats anything below 2 as 2.
    # Timestamps in UTC: the hot path reads them straight from psycopg (store.direct),
    # without the column type's conversion to UTC.
    options = ["-c TimeZone=UTC"]
    if idle_in_transaction:
        options.append(f"-c idle_in_transaction_session_timeout={int(idle_in_transaction * 1000)}")
    connect_args: dict[str, Any] = {
        "connect_timeout": max(2, math.ceil(connect_timeout)),
        "options": " ".join(options),
    }
    return create_async_engine(
        url,
        connect_args=connect_args,
        # No ping before each checkout: it was one more round trip on every transaction.
        # A connection the server dropped (a restart) fails its transaction once, which
        # callers retry anyway, and SQLAlchemy then renews the whole pool.
        pool_pre_ping=False,
        # The operator drives every run concurrently. Connections beyond pool_size are
        # closed when returned and reopened on the next burst (a TCP handshake, auth and an
        # address lookup in a thread each time), so keep the working set in the pool.
        pool_size=pool_size,
        max_overflow=pool_size // 3,
    )


def _make_sqlite_transactions_immediate(engine: AsyncEngine) -> None:
    # pysqlite only emits BEGIN before the first write, so a read-then-write transaction
    # is not atomic. Taking the write lock at BEGIN makes every store transaction
    # serialisable, which the compare-and-set transitions rely on.
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys = ON")
        # WAL with synchronous=NORMAL: a commit no longer fsyncs (the WAL is synced at
        # checkpoints), which makes local runs several times faster; a crash of the
        # process still loses nothing committed, only a power cut may lose the last few.
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def unavailable(exc: BaseException, url: URL, timeout: float) -> StoreUnavailable:
    """A :class:`StoreUnavailable` for a failed connection, with the password scrubbed."""
    if isinstance(exc, TimeoutError):
        detail = f"no answer within {timeout:g}s"
    else:
        # SQLAlchemy wraps the driver error; the driver's own text is the useful part.
        orig = getattr(exc, "orig", None) or exc
        detail = scrub(str(orig).split("\n(Background on this error")[0], url)
    return StoreUnavailable(f"cannot connect to {describe(url)}: {detail}")


@asynccontextmanager
async def connect(
    engine: AsyncEngine, url: URL, connect_timeout: float
) -> AsyncIterator[AsyncConnection]:
    """Connect within ``connect_timeout`` seconds, or raise :class:`StoreUnavailable`.

    Database errors inside the block are reported the same way (password scrubbed).
    """
    try:
        async with asyncio.timeout(connect_timeout):
            conn = await engine.connect()
    except (OSError, SQLAlchemyError, TimeoutError) as exc:
        # ``from None``: the chained driver exception could carry the DSN into a traceback.
        raise unavailable(exc, url, connect_timeout) from None
    try:
        yield conn
    except (OSError, SQLAlchemyError) as exc:
        raise unavailable(exc, url, connect_timeout) from None
    finally:
        await conn.close()
