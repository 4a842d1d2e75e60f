"""The fence a run's driver writes under (see :mod:`maestro.store.leases`).

Kept apart from the leases so the repository can check it without importing them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import ColumnElement, Table, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from maestro.store.errors import Fenced
from maestro.store.models import BucketRow


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


# Core, not ORM, statements: checked in every write transaction, the ORM's compile step
# for it cost more than the round trip.
_BUCKETS: Table = BucketRow.__table__  # type: ignore[assignment]


def _live(session: AsyncSession) -> ColumnElement[bool]:
    # The database's clock on PostgreSQL; SQLite (one process) has only ours.
    now = func.now() if session.get_bind().dialect.name == "postgresql" else datetime.now(UTC)
    return _BUCKETS.c.expires_at > now


async def check_fence(session: AsyncSession) -> None:
    """Raise :class:`Fenced` unless the current fence (if any) still holds.

    Called first in every write transaction of the store; holds the bucket's row
    ``FOR KEY SHARE`` until the transaction ends, so no one claims it meanwhile.
    """
    fence = FENCE.get()
    if fence is None:
        return
    held = await session.scalar(
        select(_BUCKETS.c.bucket)
        .where(
            _BUCKETS.c.bucket == fence.bucket,
            _BUCKETS.c.holder == fence.holder,
            _BUCKETS.c.epoch == fence.epoch,
            _live(session),
        )
        .with_for_update(read=True, key_share=True)
    )
    if held is None:
        raise Fenced(
            f"bucket {fence.bucket} is no longer held by {fence.holder} under epoch "
            f"{fence.epoch}: the write was refused"
        )
