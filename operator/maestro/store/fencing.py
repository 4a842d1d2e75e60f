"""The fence a run's driver writes under (see :mod:`maestro.store.leases`).

Kept apart from the leases so the repository can check it without importing them.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ColumnElement, Select, Table, and_, bindparam, func, select, tuple_

from maestro.store.direct import Connection
from maestro.store.errors import Fenced
from maestro.store.models import BucketRow
from maestro.store.types import UTCDateTime


@dataclass(frozen=True)
class Fence:
    """What a write on a run's behalf must still hold: its bucket, under this epoch."""

    bucket: int
    holder: str
    epoch: int


FENCE: ContextVar[Fence | None] = ContextVar("maestro_fence", default=None)


@contextmanager
def fenced(fence: Fence) -> Iterator[None]:
    """Check every store write made in this block (and in tasks it starts) against ``fence``."""
    token = FENCE.set(fence)
    try:
        yield
    finally:
        FENCE.reset(token)


# Core, not ORM, statements, built once: checked in every write transaction, where
# building the statement (and its cache key) again each time cost more than the round trip.
_BUCKETS: Table = BucketRow.__table__  # type: ignore[assignment]
_KEY = (_BUCKETS.c.bucket, _BUCKETS.c.holder, _BUCKETS.c.epoch)


def _held(which: ColumnElement[bool], live: ColumnElement[bool]) -> Select[int, str, int]:
    return select(*_KEY).where(which, live).with_for_update(read=True, key_share=True)


# One fence (every write transaction) by plain parameters: an expanding IN list is
# rendered anew on every execution. The database's clock on PostgreSQL; SQLite (one
# process) has only ours.
_ONE = and_(*(column == bindparam(column.name) for column in _KEY))
_ANY = tuple_(*_KEY).in_(bindparam("fences", expanding=True))
_HERE = _BUCKETS.c.expires_at > bindparam("now", type_=UTCDateTime())
_HELD = {
    (True, True): _held(_ONE, _BUCKETS.c.expires_at > func.now()),
    (True, False): _held(_ANY, _BUCKETS.c.expires_at > func.now()),
    (False, True): _held(_ONE, _HERE),
    (False, False): _held(_ANY, _HERE),
}


async def held_fences(conn: Connection, fences: Collection[Fence]) -> set[Fence]:
    """Those of ``fences`` that still hold, their bucket rows held ``FOR KEY SHARE`` until
    the transaction ends, so no one claims them meanwhile (one statement for them all)."""
    if not fences:
        return set()
    params: dict[str, Any]
    if len(fences) == 1:
        (fence,) = fences
        params = {"bucket": fence.bucket, "holder": fence.holder, "epoch": fence.epoch}
    else:
        params = {"fences": [(f.bucket, f.holder, f.epoch) for f in fences]}
    here = conn.dialect.name != "postgresql"
    if here:
        params["now"] = datetime.now(UTC)
    rows = await conn.execute(_HELD[not here, len(fences) == 1], params)
    return {Fence(bucket, holder, epoch) for bucket, holder, epoch in rows}


def fenced_out(fence: Fence) -> Fenced:
    """The error for a write refused because ``fence`` no longer holds."""
    return Fenced(
        f"bucket {fence.bucket} is no longer held by {fence.holder} under epoch "
        f"{fence.epoch}: the write was refused"
    )


async def check_fence(conn: Connection) -> None:
    """Raise :class:`Fenced` unless the current fence (if any) still holds.

    Called first in every write transaction of the store (see :func:`held_fences`).
    """
    fence = FENCE.get()
    if fence is not None and fence not in await held_fences(conn, [fence]):
        raise fenced_out(fence)
