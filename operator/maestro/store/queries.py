"""Read-only queries over run history for the server (``maestro server``).

Listing is keyset-paginated newest first over ``(created_at, id)`` (indexed by the
``0003_server_run_listing`` migration), so page N costs the same as page 1 however
much history there is, and the heavy JSON columns (spec, params) are never read.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, tuple_

from maestro.api.phases import RunPhase
from maestro.store.models import RunRow
from maestro.store.repository import Store


@dataclass(frozen=True, slots=True)
class RunSummary:
    """One row of a history listing: no spec, params or controls."""

    id: str
    namespace: str
    name: str
    workflow_name: str | None
    phase: RunPhase
    message: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


#: Position after which the next page starts: (created_at, id) of the last row shown.
Cursor = tuple[datetime, str]

_COLUMNS = (
    RunRow.id,
    RunRow.namespace,
    RunRow.name,
    RunRow.workflow_name,
    RunRow.phase,
    RunRow.message,
    RunRow.created_at,
    RunRow.started_at,
    RunRow.finished_at,
)


async def list_runs_page(
    store: Store,
    *,
    limit: int,
    after: Cursor | None = None,
    namespace: str | None = None,
    workflow: str | None = None,
    phases: Collection[RunPhase] = (),
    created_after: datetime | None = None,
    created_before: datetime | None = None,
) -> tuple[list[RunSummary], Cursor | None]:
    """One page of runs, newest first, and the cursor of the next page (None at the end)."""
    query = select(*_COLUMNS)
    if namespace is not None:
        query = query.where(RunRow.namespace == namespace)
    if workflow is not None:
        query = query.where(RunRow.workflow_name == workflow)
    if phases:
        query = query.where(RunRow.phase.in_([p.value for p in phases]))
    if created_after is not None:
        query = query.where(RunRow.created_at >= created_after)
    if created_before is not None:
        query = query.where(RunRow.created_at < created_before)
    if after is not None:
        query = query.where(tuple_(RunRow.created_at, RunRow.id) < tuple_(*after))
    # One row more than asked tells whether a next page exists without a COUNT.
    query = query.order_by(RunRow.created_at.desc(), RunRow.id.desc()).limit(limit + 1)
    async with store.reading() as session:
        rows = (await session.execute(query)).all()
    page = [
        RunSummary(
            id=r.id,
            namespace=r.namespace,
            name=r.name,
            workflow_name=r.workflow_name,
            phase=RunPhase(r.phase),
            message=r.message,
            created_at=r.created_at,
            started_at=r.started_at,
            finished_at=r.finished_at,
        )
        for r in rows[:limit]
    ]
    more = len(rows) > limit
    return page, ((page[-1].created_at, page[-1].id) if more and page else None)
