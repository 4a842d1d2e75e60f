"""Who drives which runs: fixed buckets leased to operator replicas, fenced in the store.

A run belongs to one of :data:`BUCKETS` buckets, a hash of its WorkflowRun uid. Each
replica renews a heartbeat and its buckets' leases every second or so in one
transaction (:meth:`Leases.tick`), takes free or expired buckets up to its share
(``ceil(BUCKETS / live replicas)``) and gives back what is over it, so the buckets
balance within one of the share. Times are the database's clock, so replicas' clocks
need not agree.

Leases alone are not fencing (a replica paused past its lease still believes it holds
it). Every write a run's driver makes therefore carries the :class:`Fence` it was
started under (a context variable, inherited by the tasks it starts), and the store
checks it in the same transaction as the write (:func:`check_fence`): the bucket is
still this replica's, under the same epoch, and not expired. A claim takes the row
``FOR UPDATE SKIP LOCKED`` while a checked write holds it ``FOR KEY SHARE``, so a
bucket changes hands only between the old holder's transactions.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from maestro.store.errors import SchemaError
from maestro.store.fencing import Fence, fenced
from maestro.store.models import BucketRow, ReplicaRow
from maestro.store.repository import Store

# Fixed by migration 0007 (the number of rows of ``buckets``): pods carry their bucket
# as a label, so changing it would need every live pod relabelled.
BUCKETS = 32
# A replica's row is deleted this long after its heartbeat stopped (they only inform).
FORGET_REPLICA = timedelta(minutes=10)


__all__ = ["BUCKETS", "Fence", "Leases", "Owner", "Tick", "bucket_of", "fenced", "owners"]


def bucket_of(uid: str) -> int:
    """The bucket of the WorkflowRun with this uid: the same on every replica."""
    return int.from_bytes(hashlib.sha256(uid.encode()).digest()[:8], "big") % BUCKETS


@dataclass(frozen=True)
class Owner:
    """One bucket's row, as ``maestro owners`` and ``/readyz`` show it."""

    bucket: int
    holder: str | None
    epoch: int
    expires_at: datetime | None


@dataclass(frozen=True)
class Tick:
    """What one renewal found: the buckets held (bucket -> epoch) and the live replicas."""

    held: dict[int, int]
    replicas: list[str]
    claimed: list[int]
    released: list[int]

    @property
    def share(self) -> int:
        """The most buckets one replica may hold now."""
        return math.ceil(BUCKETS / max(1, len(self.replicas)))


class Leases:
    """One replica's side of the bucket leases."""

    def __init__(self, store: Store, replica: str, lease_seconds: float) -> None:
        """``replica`` names this process in the store; leases last ``lease_seconds``."""
        self.store, self.replica = store, replica
        self.ttl = timedelta(seconds=lease_seconds)

    async def _now(self, session: AsyncSession) -> datetime:
        if session.get_bind().dialect.name != "postgresql":
            return datetime.now(UTC)
        stamp = await session.scalar(select(func.now()))
        assert isinstance(stamp, datetime)
        return stamp

    async def check(self) -> None:
        """Fail fast on a buckets table this Maestro does not expect."""
        async with self.store.reading() as session:
            count = await session.scalar(select(func.count()).select_from(BucketRow))
        if count != BUCKETS:
            raise SchemaError(f"the store has {count} buckets, this Maestro needs {BUCKETS}")

    async def tick(self, *, keep: int | None = None) -> Tick:
        """Heartbeat, renew, give back what is over the share, claim up to it.

        ``keep`` caps the buckets to hold below the share (0 when stopping).
        """
        async with self.store.writing() as session:
            now = await self._now(session)
            expires = now + self.ttl
            await self._heartbeat(session, now, expires)
            replicas = list(
                await session.scalars(
                    select(ReplicaRow.name)
                    .where(ReplicaRow.expires_at > now)
                    .order_by(ReplicaRow.name)
                )
            )
            share = math.ceil(BUCKETS / max(1, len(replicas)))
            if keep is not None:
                share = min(share, keep)
            # Still ours even if the lease ran out meanwhile, as long as no one claimed it
            # (a claim changes the holder): writes in the gap were refused by the fence.
            rows = await session.execute(
                update(BucketRow)
                .where(BucketRow.holder == self.replica)
                .values(expires_at=expires)
                .returning(BucketRow.bucket, BucketRow.epoch)
            )
            renewed = {bucket: epoch for bucket, epoch in rows.all()}
            released = sorted(renewed)[share:]
            if released:
                await session.execute(
                    update(BucketRow)
                    .where(BucketRow.bucket.in_(released), BucketRow.holder == self.replica)
                    .values(holder=None, expires_at=None, changed_at=now)
                )
                for bucket in released:
                    del renewed[bucket]
            claimed: list[int] = []
            wanted = share - len(renewed)
            if wanted > 0:
                free = list(
                    await session.scalars(
                        select(BucketRow.bucket)
                        .where(
                            (BucketRow.holder.is_(None))
                            | (BucketRow.expires_at.is_(None))
                            | (BucketRow.expires_at <= now)
                        )
                        .order_by(BucketRow.bucket)
                        .limit(wanted)
                        .with_for_update(skip_locked=True)
                    )
                )
                if free:
                    rows = await session.execute(
                        update(BucketRow)
                        .where(BucketRow.bucket.in_(free))
                        .values(
                            holder=self.replica,
                            epoch=BucketRow.epoch + 1,
                            expires_at=expires,
                            changed_at=now,
                        )
                        .returning(BucketRow.bucket, BucketRow.epoch)
                    )
                    for bucket, epoch in rows.all():
                        renewed[bucket] = epoch
                        claimed.append(bucket)
            return Tick(renewed, replicas, sorted(claimed), released)

    async def _heartbeat(self, session: AsyncSession, now: datetime, expires: datetime) -> None:
        forgotten = ReplicaRow.expires_at < now - FORGET_REPLICA
        await session.execute(delete(ReplicaRow).where(forgotten))
        row = await session.get(ReplicaRow, self.replica)
        if row is None:
            session.add(ReplicaRow(name=self.replica, started_at=now, expires_at=expires))
        else:
            row.expires_at = expires
        await session.flush()

    async def release(self) -> list[int]:
        """Give every bucket back and leave (a graceful stop): others take them at once."""
        async with self.store.writing() as session:
            now = await self._now(session)
            rows = await session.scalars(
                update(BucketRow)
                .where(BucketRow.holder == self.replica)
                .values(holder=None, expires_at=None, changed_at=now)
                .returning(BucketRow.bucket)
            )
            released = sorted(rows)
            await session.execute(delete(ReplicaRow).where(ReplicaRow.name == self.replica))
            return released


async def owners(store: Store) -> tuple[list[Owner], list[tuple[str, datetime]]]:
    """Every bucket's holder, and the replicas with their heartbeat's expiry."""
    async with store.reading() as session:
        buckets = [
            Owner(r.bucket, r.holder, r.epoch, r.expires_at)
            for r in await session.scalars(select(BucketRow).order_by(BucketRow.bucket))
        ]
        replicas = [
            (r.name, r.expires_at)
            for r in await session.scalars(select(ReplicaRow).order_by(ReplicaRow.name))
        ]
    return buckets, replicas
