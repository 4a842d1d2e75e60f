"""The repository: every read and write of run state goes through :class:`Store`."""

from __future__ import annotations

import asyncio
import functools
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Collection, Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import psycopg
from sqlalchemy import (
    Insert,
    Row,
    Select,
    Table,
    Update,
    bindparam,
    delete,
    event,
    func,
    insert,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import URL
from sqlalchemy.exc import (
    DBAPIError,
    IntegrityError,
    InterfaceError,
    OperationalError,
    SQLAlchemyError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from maestro.api.phases import RUN_TRANSITIONS, TASK_TRANSITIONS, RunPhase, TaskPhase
from maestro.store.database import POOL_SIZE, connect, make_engine, unavailable
from maestro.store.direct import Connection, Direct, Observer, Statements, translated
from maestro.store.errors import (
    AttemptNotFound,
    Fenced,
    InvalidOutputs,
    OutputsTooLarge,
    RunNotFound,
    StoreError,
)
from maestro.store.fencing import Fence, check_fence, fenced_out, held_fences
from maestro.store.migrate import ensure_schema
from maestro.store.models import AttemptRow, EventRow, RunRow
from maestro.store.records import AttemptRecord, EventRecord, RunRecord
from maestro.store.types import UTCDateTime
from maestro.store.urls import describe, parse_url

# The tables under the models, for the statements of an engine pass (see _compare_and_set).
RUNS: Table = RunRow.__table__  # type: ignore[assignment]
ATTEMPTS: Table = AttemptRow.__table__  # type: ignore[assignment]
EVENTS: Table = EventRow.__table__  # type: ignore[assignment]

# The hot path's statements, built once (see _moves).
_MARK_LAUNCHED = (
    update(ATTEMPTS)
    .where(
        tuple_(ATTEMPTS.c.run_id, ATTEMPTS.c.task, ATTEMPTS.c.attempt).in_(
            bindparam("keys", expanding=True)
        ),
        ATTEMPTS.c.launched_at.is_(None),
    )
    .values(launched_at=bindparam("now", type_=UTCDateTime()))
    .returning(*ATTEMPTS.c)
)
_MARK_POSTED = (
    update(EVENTS)
    .where(EVENTS.c.id.in_(bindparam("ids", expanding=True)), EVENTS.c.posted_at.is_(None))
    .values(posted_at=bindparam("now", type_=UTCDateTime()))
)
_INSERT_EVENTS = insert(EVENTS).returning(EVENTS.c.id)

# Rows one INSERT takes: any count up to SMALL_INSERT has a statement of its own, more are
# written SMALL_INSERT and more at a time (a few shapes of statement, each compiled once).
SMALL_INSERT = 8
INSERT_PAGES = (64, 32, 16, SMALL_INSERT)

#: The keys a run's ``controls`` may hold, with their values for a new run.
DEFAULT_CONTROLS: Mapping[str, Any] = {"suspend": False, "cancel": False, "approvals": []}
# Set only when known: who asked for the cancel (the run's message names them); whether
# cached tasks run again (WorkflowRun spec.noCache, `--no-cache`).
OPTIONAL_CONTROLS = frozenset({"cancelledBy", "noCache"})

PING_TIMEOUT = 2.0

_Phase = TypeVar("_Phase", RunPhase, TaskPhase)


def _now() -> datetime:
    return datetime.now(UTC)


# Which store events need the outbox, by (kind, from phase, to phase): see Store.batch.
Announced = Callable[[str, str | None, str | None], bool]


def _check_controls(changes: Mapping[str, Any]) -> None:
    known = set(DEFAULT_CONTROLS) | OPTIONAL_CONTROLS
    unknown = sorted(set(changes) - known)
    if unknown:
        raise TypeError(f"unknown run controls {unknown}: expected {sorted(known)}")


def _sources(
    transitions: Mapping[_Phase, frozenset[_Phase]],
    new: _Phase,
    expected: Collection[_Phase] | None,
) -> frozenset[_Phase]:
    """The phases from which a move to ``new`` is both legal and expected by the caller."""
    legal = frozenset(src for src, dsts in transitions.items() if new in dsts)
    return legal if expected is None else legal & frozenset(expected)


def _event_values(
    run_id: str,
    kind: str,
    *,
    at: datetime,
    task: str | None = None,
    attempt: int | None = None,
    from_phase: str | None = None,
    to_phase: str | None = None,
    reason: str | None = None,
    message: str | None = None,
    actor: str | None = None,
    posted_at: datetime | None = None,
) -> dict[str, Any]:
    """The columns of one event row (phases as their values)."""
    return {
        "run_id": run_id,
        "task": task,
        "attempt": attempt,
        "kind": kind,
        "from_phase": None if from_phase is None else str(from_phase),
        "to_phase": None if to_phase is None else str(to_phase),
        "reason": reason,
        "message": message,
        "at": at,
        "actor": actor,
        "posted_at": posted_at,
    }


def _add_event(session: AsyncSession, run_id: str, kind: str, **fields: Any) -> None:
    """Add one event row to the session (written at its next flush)."""
    session.add(EventRow(**_event_values(run_id, kind, **fields)))


@functools.cache
def _moves(
    table: Table, key: tuple[str, ...], changes: tuple[str, ...]
) -> tuple[Select[str], Select[str], Update]:
    """The statements of a compare-and-set on ``table``, built once per shape: the row's
    phase (locked, and not), and the UPDATE of ``changes`` on the row of phase ``was``.

    Parameters: ``key_<column>`` for the row's ``key``, ``set_<column>`` for each change
    (``started_at`` is kept when set, from ``now``) and ``was`` for the phase it leaves.
    Built anew on every call, the statement and its cache key cost more than the round trip.
    """
    where = [table.c[k] == bindparam(f"key_{k}") for k in key]
    values: dict[str, Any] = {
        c: bindparam(f"set_{c}", type_=table.c[c].type) for c in changes if c != "started_at"
    }
    if "started_at" in changes:
        # Kept when set: a retried start of the same attempt did not start it anew.
        values["started_at"] = func.coalesce(
            table.c.started_at, bindparam("set_started_at", type_=UTCDateTime())
        )
    phase = select(table.c.phase).where(*where)
    move = (
        update(table)
        .where(*where, table.c.phase == bindparam("was"))
        .values(values)
        .returning(*table.c)
    )
    return phase.with_for_update(key_share=True), phase, move


async def _compare_and_set(
    conn: Connection,
    table: Table,
    key: Mapping[str, Any],
    sources: Collection[_Phase],
    new: _Phase,
    values: dict[str, Any],
    now: datetime,
    *,
    missing: StoreError,
) -> tuple[_Phase, Row[Any]] | None:
    """Move one row's phase from any of ``sources`` to ``new``: the phase it left and the
    row as written (from RETURNING, not read again), or None.

    The UPDATE carries the phase condition, so a concurrent writer that got there first
    makes this one a no-op (PostgreSQL re-checks the condition on the row it waited for).
    With one source, the phase left is known and the UPDATE alone does it (what every
    engine pass does); with several, the row is locked and read first (PostgreSQL: FOR
    NO KEY UPDATE, so inserts of events and attempts that reference it are not blocked).
    Core statements on the table (``key``: column -> value), not the ORM's: the ORM's
    bookkeeping for a row nobody reads as an object cost more than the statement.
    """
    changes: dict[str, Any] = {**values, "phase": new.value}
    if new.value == "Running":
        changes["started_at"] = now
    if new.finished:
        changes["finished_at"] = now
    locked, phase, move = _moves(table, tuple(key), tuple(changes))
    params = {f"key_{k}": v for k, v in key.items()}
    if len(sources) == 1:
        (current,) = sources
    else:
        found = await conn.scalar(locked, params)
        if found is None:
            raise missing
        current = type(new)(found)
        if current not in sources:
            return None
    params |= {f"set_{c}": v for c, v in changes.items()}
    moved = (await conn.execute(move, {**params, "was": current.value})).first()
    if moved is not None:
        return current, moved
    if len(sources) == 1 and await conn.scalar(phase, params) is None:
        raise missing
    return None


def _new_rows(insert: Callable[[Table], Any]) -> tuple[Insert, Insert]:
    """The inserts of attempts (what starting tasks runs, see Batch._insert_attempts) and
    of a run (replaying the same namespace and uid inserts nothing, see create_run)."""
    attempts = (
        insert(ATTEMPTS)
        .on_conflict_do_nothing(index_elements=["run_id", "task", "attempt"])
        .returning(*ATTEMPTS.c)
    )
    run = (
        insert(RUNS).on_conflict_do_nothing(index_elements=["namespace", "uid"]).returning(*RUNS.c)
    )
    return attempts, run


# ON CONFLICT DO NOTHING is spelled the same on both, but lives in each dialect.
_NEW_ROWS = {"postgresql": _new_rows(pg_insert), "sqlite": _new_rows(sqlite_insert)}


@functools.cache
def _rows_insert(base: Insert, columns: tuple[str, ...], n: int) -> Insert:
    """``base`` for ``n`` rows of ``columns`` in one statement (parameters
    ``<column>_<row>``), typed by the table's columns."""
    table = base.table
    assert isinstance(table, Table)
    return base.values(
        [{c: bindparam(f"{c}_{i}", type_=table.c[c].type) for c in columns} for i in range(n)]
    )


def _pages(n: int) -> Iterator[int]:
    """How many of ``n`` rows each INSERT takes, in order."""
    while n > SMALL_INSERT:
        page = next(p for p in INSERT_PAGES if p <= n)
        yield page
        n -= page
    if n:
        yield n


async def _insert_rows(
    conn: Connection, base: Insert, rows: Sequence[Mapping[str, Any]]
) -> list[Row[Any]]:
    """Insert ``rows`` (each of the same columns) with ``base``: what its RETURNING gives.

    A multi-row VALUES list, not one statement per row (an executemany: pipelined on
    psycopg, which costs more of the operator's CPU than the statement)."""
    if not rows:
        return []
    columns = tuple(rows[0])
    returned: list[Row[Any]] = []
    start = 0
    for n in _pages(len(rows)):
        page = rows[start : start + n]
        start += n
        params = {f"{c}_{i}": row[c] for i, row in enumerate(page) for c in columns}
        returned.extend(await conn.execute(_rows_insert(base, columns, n), params))
    return returned


def _newest() -> Select[Any]:
    # Only the newest attempt of each task: older ones (retried) are history, and
    # decoding their outputs on every engine pass would be wasted work.
    older = ATTEMPTS.alias("older")
    newest = (
        select(func.max(older.c.attempt))
        .where(older.c.run_id == ATTEMPTS.c.run_id, older.c.task == ATTEMPTS.c.task)
        .scalar_subquery()
    )
    return select(ATTEMPTS).where(
        ATTEMPTS.c.run_id == bindparam("run_id"), ATTEMPTS.c.attempt == newest
    )


# A run's reads, built once (parameter ``run_id``; ``namespace`` and ``uid`` by uid).
_NEWEST = _newest()
# The outbox: the partial index ix_events_unposted serves it.
_UNPOSTED = (
    select(EVENTS)
    .where(EVENTS.c.run_id == bindparam("run_id"), EVENTS.c.posted_at.is_(None))
    .order_by(EVENTS.c.id)
)
_RUN = select(RUNS).where(RUNS.c.id == bindparam("run_id"))
_BY_UID = select(RUNS).where(
    RUNS.c.namespace == bindparam("namespace"), RUNS.c.uid == bindparam("uid")
)


class Store:
    """The context store: runs, task attempts and their event log, in one database.

    Create it with :meth:`open`; it is required by everything that runs work.
    Transitions are compare-and-set in one transaction each, so concurrent writers
    (operator replicas, replayed events) can never double-start or resurrect a task.
    """

    def __init__(
        self, engine: AsyncEngine, url: URL, *, connect_timeout: float, max_output_bytes: int
    ) -> None:
        """Wrap an engine whose schema is known to be current; use :meth:`open` instead."""
        self._engine = engine
        self._url = url
        self._connect_timeout = connect_timeout
        self._sessions = async_sessionmaker(engine, expire_on_commit=False)
        self.max_output_bytes = max_output_bytes
        # PostgreSQL's hot path runs below SQLAlchemy's execution layer (store.direct).
        postgres = engine.dialect.name == "postgresql"
        self._statements = Statements(engine.dialect) if postgres else None
        self._observers: list[Observer] = []
        self._new_attempts, self._new_run = _NEW_ROWS[engine.dialect.name]

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        migrate: bool = False,
        connect_timeout: float = 5.0,
        max_output_bytes: int = 64 * 1024,
        pool_size: int = POOL_SIZE,
        idle_in_transaction: float | None = None,
    ) -> Store:
        """Connect to ``url`` and check (or, with ``migrate``, upgrade) its schema.

        Raises :class:`InvalidDatabaseURL` for a URL that is neither ``postgresql://``
        nor ``sqlite:///``, :class:`StoreUnavailable` when no connection is made within
        ``connect_timeout`` seconds, and :class:`SchemaError` when the schema is not
        the one this Maestro needs. No message ever contains the password.
        """
        parsed = parse_url(url)
        engine = make_engine(
            parsed,
            connect_timeout=connect_timeout,
            pool_size=pool_size,
            idle_in_transaction=idle_in_transaction,
        )
        try:
            async with connect(engine, parsed, connect_timeout) as conn:
                await ensure_schema(conn, parsed, migrate=migrate)
        except BaseException:
            await engine.dispose()
            raise
        return cls(
            engine, parsed, connect_timeout=connect_timeout, max_output_bytes=max_output_bytes
        )

    @property
    def description(self) -> str:
        """Where this store lives, safe for logs (no password)."""
        return describe(self._url)

    async def close(self) -> None:
        """Close every pooled connection."""
        await self._engine.dispose()

    async def ping(self) -> None:
        """Check the database answers within a short timeout, else raise StoreUnavailable."""
        for retry in (True, False):
            try:
                async with asyncio.timeout(PING_TIMEOUT), self._engine.connect() as conn:
                    await conn.execute(text("SELECT 1"))
                return
            except DBAPIError as exc:
                if retry and exc.connection_invalidated:
                    continue  # a pooled connection from before a server restart: renewed now
                raise unavailable(exc, self._url, PING_TIMEOUT) from None
            except (OSError, SQLAlchemyError, TimeoutError) as exc:
                raise unavailable(exc, self._url, PING_TIMEOUT) from None

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[AsyncSession]:
        async with self._unavailable(), self._sessions.begin() as session:
            yield session

    def watch_statements(self, observe: Observer) -> None:
        """Call ``observe`` after every statement with its seconds, or None when it
        failed (metrics), whichever path ran it."""
        sync = self._engine.sync_engine

        def before(conn: Any, *_: Any) -> None:
            conn.info.setdefault("maestro_started", []).append(time.perf_counter())

        def after(conn: Any, *_: Any) -> None:
            started = conn.info.get("maestro_started")
            if started:
                observe(time.perf_counter() - started.pop())

        def failed(ctx: Any) -> None:
            observe(None)
            conn = ctx.connection
            if conn is not None and conn.info.get("maestro_started"):
                conn.info["maestro_started"].pop()

        event.listen(sync, "before_cursor_execute", before)
        event.listen(sync, "after_cursor_execute", after)
        event.listen(sync, "handle_error", failed)
        self._observers.append(observe)

    @asynccontextmanager
    async def _begin(self) -> AsyncIterator[Connection]:
        """A transaction on a bare connection, for Core statements only: what the hot
        path (a run's creation and first read, engine passes, launch marks) runs in,
        without an ORM session to set up. Writes in it check the fence themselves
        (:func:`check_fence`, :func:`held_fences`). On PostgreSQL the statements run on
        psycopg directly (:class:`Direct`), on a connection of the same pool."""
        if self._statements is None:
            async with self._unavailable(), self._engine.begin() as conn:
                yield conn
            return
        async with self._unavailable(), self._engine.connect() as conn:
            raw = (await conn.get_raw_connection()).driver_connection
            assert isinstance(raw, psycopg.AsyncConnection)
            try:
                async with raw.transaction():
                    yield Direct(raw, self._statements, self._observers)
            except (psycopg.Error, DBAPIError) as exc:
                if raw.broken:  # the server went away: the pool opens a new one next time
                    await conn.invalidate()
                if isinstance(exc, psycopg.Error):  # BEGIN, COMMIT or ROLLBACK
                    raise translated(exc, "COMMIT", None, self._engine.dialect) from None
                raise

    @asynccontextmanager
    async def _unavailable(self) -> AsyncIterator[None]:
        """Translate a database that cannot be reached into :class:`StoreUnavailable`."""
        try:
            yield
        except (OSError, OperationalError, InterfaceError, PoolTimeout) as exc:
            raise unavailable(exc, self._url, self._connect_timeout) from None

    def reading(self) -> AbstractAsyncContextManager[AsyncSession]:
        """A transaction for read-only queries kept outside this class (store.queries)."""
        return self._transaction()

    @asynccontextmanager
    async def writing(self) -> AsyncIterator[AsyncSession]:
        """A transaction that writes: refused first (:class:`Fenced`) when made on behalf
        of a run whose bucket this replica no longer holds (store.fencing)."""
        async with self._transaction() as session:
            await check_fence(await session.connection())
            yield session

    # Runs

    async def create_run(
        self,
        *,
        namespace: str,
        name: str,
        workflow_name: str | None,
        spec: dict[str, Any],
        params: dict[str, Any],
        uid: str | None = None,
        generation: int = 1,
        controls: dict[str, Any] | None = None,
        parent_id: str | None = None,
        announced: Announced | None = None,
    ) -> RunRecord:
        """Record a new Pending run; replaying the same (namespace, uid) returns the first one.

        ``parent_id``: the run whose ``workflow`` task this one is; ``announced`` as for
        :meth:`batch` (the creation event)."""
        _check_controls(controls or {})
        now = _now()
        run_id = str(uuid.uuid4())
        values = {
            "id": run_id,
            "namespace": namespace,
            "name": name,
            "uid": uid,
            "workflow_name": workflow_name,
            "spec": spec,
            "params": params,
            "phase": RunPhase.PENDING.value,
            "controls": {**DEFAULT_CONTROLS, **(controls or {})},
            "generation": generation,
            "created_at": now,
            "updated_at": now,
            "parent_id": parent_id,
        }
        async with self.batch(run_id, announced=announced) as writes:
            row = (await writes.conn.execute(self._new_run, values)).first()
            if row is None:
                by_uid = {"namespace": namespace, "uid": uid}
                return RunRecord.of((await writes.conn.execute(_BY_UID, by_uid)).one())
            writes.event("RunPhase", at=now, to_phase=RunPhase.PENDING, reason="Created")
            return RunRecord.of(row)

    async def get_run(self, run_id: str) -> RunRecord:
        """The run with this id; raises :class:`RunNotFound`."""
        async with self._transaction() as session:
            row = await session.get(RunRow, run_id)
            if row is None:
                raise RunNotFound(f"run {run_id} not found")
            return RunRecord.of(row)

    async def find_run(self, namespace: str, uid: str) -> RunRecord | None:
        """The run created for the Kubernetes object with this uid, if any."""
        async with self._begin() as conn:
            row = (await conn.execute(_BY_UID, {"namespace": namespace, "uid": uid})).first()
            return None if row is None else RunRecord.of(row)

    async def list_runs(
        self, *, unfinished: bool = False, namespace: str | None = None, limit: int | None = None
    ) -> list[RunRecord]:
        """Runs, oldest first; ``unfinished`` keeps those not yet in a terminal phase."""
        query = select(RunRow).order_by(RunRow.created_at, RunRow.id).limit(limit)
        if unfinished:
            query = query.where(RunRow.finished_at.is_(None))
        if namespace is not None:
            query = query.where(RunRow.namespace == namespace)
        async with self._transaction() as session:
            return [RunRecord.of(row) for row in await session.scalars(query)]

    async def set_run_phase(
        self,
        run_id: str,
        new: RunPhase,
        *,
        expected: RunPhase | Collection[RunPhase] | None = None,
        message: str | None = None,
        reason: str | None = None,
        outputs: dict[str, Any] | None = None,
    ) -> bool:
        """:meth:`Batch.set_run_phase` in a transaction of its own."""
        async with self.batch(run_id) as b:
            return await b.set_run_phase(
                new, expected=expected, message=message, reason=reason, outputs=outputs
            )

    async def _locked_run(self, session: AsyncSession, run_id: str) -> RunRow:
        row = await session.scalar(
            select(RunRow).where(RunRow.id == run_id).with_for_update(key_share=True)
        )
        if row is None:
            raise RunNotFound(f"run {run_id} not found")
        return row

    async def update_controls(
        self, run_id: str, *, generation: int | None = None, **changes: Any
    ) -> RunRecord:
        """Merge ``changes`` (``suspend``, ``cancel``, ``approvals``) into the run's controls.

        ``generation`` records the Kubernetes generation the controls came from. Writes
        a ``Controls`` event, unless nothing changed (replays are silent no-ops).
        """
        _check_controls(changes)
        async with self.writing() as session:
            row = await self._locked_run(session, run_id)
            merged = {**row.controls, **changes}
            new_generation = row.generation if generation is None else generation
            if merged == row.controls and new_generation == row.generation:
                return RunRecord.of(row)
            now = _now()
            row.controls = merged
            row.generation = new_generation
            row.updated_at = now
            _add_event(
                session,
                run_id,
                "Controls",
                at=now,
                message=json.dumps(changes, sort_keys=True, default=str),
            )
            await session.flush()
            return RunRecord.of(row)

    async def approve(
        self, run_id: str, task: str, *, actor: str, comment: str | None = None
    ) -> bool:
        """Add ``task`` to the run's approvals; False when it was already approved.

        The ``Approved`` event records who approved (``actor``) and their ``comment``.
        """
        async with self.writing() as session:
            row = await self._locked_run(session, run_id)
            approvals = list(row.controls.get("approvals", []))
            if task in approvals:
                return False
            now = _now()
            row.controls = {**row.controls, "approvals": [*approvals, task]}
            row.updated_at = now
            _add_event(
                session,
                run_id,
                "Approved",
                at=now,
                task=task,
                actor=actor,
                message=comment,
            )
            return True

    # Task attempts

    @asynccontextmanager
    async def batch(
        self, run_id: str, *, announced: Announced | None = None
    ) -> AsyncIterator[Batch]:
        """Writes to one run in one transaction: what an engine pass costs the database.

        Committed when the block ends; nothing of it when the block raises. With
        ``announced``, the events it rejects are written out of the outbox already
        (:attr:`Batch.handled`): whoever holds the run handles them from memory, and
        marking them later would cost a transaction of its own.
        """
        async with self._begin() as conn:
            await check_fence(conn)
            writes = Batch(self, conn, run_id, announced)
            yield writes
            await writes.close()

    async def create_attempt(
        self, run_id: str, task: str, attempt: int, *, not_before: datetime | None = None
    ) -> AttemptRecord | None:
        """:meth:`Batch.create_attempt` in a transaction of its own."""
        async with self.batch(run_id) as b:
            return await b.create_attempt(task, attempt, not_before=not_before)

    def _check_outputs(self, task: str, outputs: dict[str, Any]) -> None:
        """Raise InvalidOutputs or OutputsTooLarge for outputs the store would refuse."""
        if not isinstance(outputs, dict):
            raise InvalidOutputs(f"outputs of task {task!r} must be a JSON object")
        try:
            encoded = json.dumps(outputs, separators=(",", ":"), ensure_ascii=False)
        except (TypeError, ValueError) as exc:
            raise InvalidOutputs(f"outputs of task {task!r} are not JSON: {exc}") from None
        size = len(encoded.encode())
        if size > self.max_output_bytes:
            raise OutputsTooLarge(task, size, self.max_output_bytes)

    async def transition_attempt(
        self,
        run_id: str,
        task: str,
        attempt: int,
        new: TaskPhase,
        *,
        expected: TaskPhase | None = None,
        reason: str | None = None,
        message: str | None = None,
        outputs: dict[str, Any] | None = None,
        job_name: str | None = None,
    ) -> bool:
        """:meth:`Batch.transition_attempt` in a transaction of its own."""
        async with self.batch(run_id) as b:
            return await b.transition_attempt(
                task,
                attempt,
                new,
                expected=expected,
                reason=reason,
                message=message,
                outputs=outputs,
                job_name=job_name,
            )

    async def mark_launched(self, launches: Sequence[Launch]) -> list[list[AttemptRecord] | Fenced]:
        """Record launches of several runs in one transaction: for each, the attempts as
        written, or :class:`Fenced` (nothing written for it) when its fence no longer
        holds. One statement checks the fences, one marks every attempt.

        From then on a missing pod means it vanished (a failed attempt), never that it
        still has to be created: the same attempt is never launched twice. The engine's
        passes on many runs share this transaction (a group commit).
        """
        async with self._begin() as conn:
            fences = {launch.fence for launch in launches if launch.fence is not None}
            lost = fences - await held_fences(conn, fences)
            keys = [
                (launch.run_id, task, attempt)
                for launch in launches
                if launch.fence not in lost
                for task, attempt in launch.attempts
            ]
            rows: Sequence[Row[Any]] = (
                (await conn.execute(_MARK_LAUNCHED, {"keys": keys, "now": _now()})).all()
                if keys
                else []
            )
            marked: dict[str, list[AttemptRecord]] = {}
            for row in rows:
                marked.setdefault(row.run_id, []).append(AttemptRecord.of(row))
        return [
            fenced_out(launch.fence)
            if launch.fence is not None and launch.fence in lost
            else marked.get(launch.run_id, [])
            for launch in launches
        ]

    async def children(self, run_id: str) -> list[RunRecord]:
        """The runs the ``workflow`` tasks of ``run_id`` started, oldest first."""
        query = select(RunRow).where(RunRow.parent_id == run_id).order_by(RunRow.created_at)
        async with self._transaction() as session:
            return [RunRecord.of(row) for row in await session.scalars(query)]

    async def find_cached(
        self, namespace: str, cache_key: str, *, since: datetime
    ) -> AttemptRecord | None:
        """The newest Succeeded attempt of ``namespace`` with ``cache_key`` that finished
        at or after ``since`` (the index ix_task_attempts_cache serves it)."""
        query = (
            select(AttemptRow)
            .join(RunRow, RunRow.id == AttemptRow.run_id)
            .where(
                AttemptRow.cache_key == cache_key,
                AttemptRow.phase == TaskPhase.SUCCEEDED.value,
                AttemptRow.finished_at >= since,
                RunRow.namespace == namespace,
            )
            .order_by(AttemptRow.finished_at.desc())
            .limit(1)
        )
        async with self._transaction() as session:
            row = await session.scalar(query)
            return AttemptRecord.of(row) if row is not None else None

    async def attempts(self, run_id: str) -> list[AttemptRecord]:
        """Every attempt of the run, ordered by task then attempt number."""
        query = (
            select(AttemptRow)
            .where(AttemptRow.run_id == run_id)
            .order_by(AttemptRow.task, AttemptRow.attempt)
        )
        async with self._transaction() as session:
            return [AttemptRecord.of(row) for row in await session.scalars(query)]

    async def latest_attempts(self, run_id: str) -> dict[str, AttemptRecord]:
        """The newest attempt of each task in the run, by task name."""
        async with self._begin() as conn:
            rows = await conn.execute(_NEWEST, {"run_id": run_id})
            return {row.task: AttemptRecord.of(row) for row in rows}

    async def snapshot(
        self, run_id: str
    ) -> tuple[RunRecord, dict[str, AttemptRecord], list[EventRecord]]:
        """The run, the newest attempt of each task and the outbox (:meth:`unposted_events`),
        read in one transaction: what an engine first reads of a run. Raises
        :class:`RunNotFound`."""
        async with self._begin() as conn:
            key = {"run_id": run_id}
            row = (await conn.execute(_RUN, key)).first()
            if row is None:
                raise RunNotFound(f"run {run_id} not found")
            latest = {r.task: AttemptRecord.of(r) for r in await conn.execute(_NEWEST, key)}
            outbox = [EventRecord.of(r) for r in await conn.execute(_UNPOSTED, key)]
            return RunRecord.of(row), latest, outbox

    async def events(self, run_id: str, *, after: int = 0) -> list[EventRecord]:
        """The run's event log in the order it was written; only ids above ``after``."""
        query = (
            select(EventRow)
            .where(EventRow.run_id == run_id, EventRow.id > after)
            .order_by(EventRow.id)
        )
        async with self._transaction() as session:
            return [EventRecord.of(row) for row in await session.scalars(query)]

    async def phase_summary(
        self, namespaces: Collection[str] = ()
    ) -> dict[RunPhase, tuple[int, datetime | None]]:
        """Runs per phase with the oldest one's clock start (creation when Pending, else start).

        For metrics: one grouped query, so gauges are recounted from the store, never kept
        by hand. ``namespaces`` limits it to those (all when empty).
        """
        since = func.min(func.coalesce(RunRow.started_at, RunRow.created_at))
        query = select(RunRow.phase, func.count(), since).group_by(RunRow.phase)
        if namespaces:
            query = query.where(RunRow.namespace.in_(list(namespaces)))
        async with self._transaction() as session:
            rows = (await session.execute(query)).all()
        return {RunPhase(phase): (int(count), oldest) for phase, count, oldest in rows}

    async def set_trace_id(self, run_id: str, trace_id: str) -> None:
        """Record the run's OpenTelemetry trace id, so history links to the trace."""
        async with self.writing() as session:
            await session.execute(
                update(RunRow).where(RunRow.id == run_id).values(trace_id=trace_id)
            )

    @property
    def engine(self) -> AsyncEngine:
        """The SQLAlchemy engine, for instrumentation (statement timing and errors) only."""
        return self._engine

    async def unposted_events(self, run_id: str) -> list[EventRecord]:
        """The run's events the operator has not handled yet (the outbox), oldest first."""
        async with self._begin() as conn:
            rows = await conn.execute(_UNPOSTED, {"run_id": run_id})
            return [EventRecord.of(row) for row in rows]

    async def mark_posted(self, event_ids: Collection[int]) -> None:
        """Take events out of the outbox: their Kubernetes Events are posted."""
        if not event_ids:
            return
        async with self._begin() as conn:
            await check_fence(conn)
            await conn.execute(_MARK_POSTED, {"ids": list(event_ids), "now": _now()})

    # Retention

    async def prune(self, *, older_than: timedelta) -> int:
        """Delete runs that finished more than ``older_than`` ago, with their history.

        Returns how many runs were deleted. Unfinished runs are never touched.
        """
        cutoff = _now() - older_than
        old = select(RunRow.id).where(RunRow.finished_at.is_not(None), RunRow.finished_at < cutoff)
        async with self._transaction() as session:
            await session.execute(
                delete(EventRow)
                .where(EventRow.run_id.in_(old))
                .execution_options(synchronize_session=False)
            )
            await session.execute(
                delete(AttemptRow)
                .where(AttemptRow.run_id.in_(old))
                .execution_options(synchronize_session=False)
            )
            deleted = await session.scalars(
                delete(RunRow)
                .where(RunRow.id.in_(old))
                .returning(RunRow.id)
                .execution_options(synchronize_session=False)
            )
            return len(deleted.all())


@dataclass(frozen=True)
class Launch:
    """Attempts of one run, as (task, attempt), whose executor objects (pods) now exist,
    with the fence its driver writes under (see :meth:`Store.mark_launched`)."""

    run_id: str
    attempts: tuple[tuple[str, int], ...]
    fence: Fence | None


@dataclass(frozen=True)
class Starting:
    """One attempt an engine pass starts (see :meth:`Batch.start_attempts`); a
    ``cache_key`` makes it, once Succeeded, a cache entry (:meth:`Store.find_cached`)."""

    task: str
    attempt: int
    create: bool  # the attempt is new (a first attempt), not a retry already recorded
    reason: str | None = None
    message: str | None = None
    job_name: str | None = None
    cache_key: str | None = None


class Batch:
    """The writes of one engine pass on one run, sharing one transaction.

    Every move is still a compare-and-set: when another writer got there first the move
    writes nothing, returns False and sets :attr:`lost`, so whoever holds the run in
    memory reloads it instead of trusting its copy. The rows as written (RETURNING) are
    collected in :attr:`run` and :attr:`attempts`, and the events in :attr:`events`
    once the batch is closed: the holder's copy is brought up to date without reading
    the run back.
    """

    def __init__(
        self, store: Store, conn: Connection, run_id: str, announced: Announced | None
    ) -> None:
        """Use :meth:`Store.batch`."""
        self.store, self.conn, self.run_id = store, conn, run_id
        self.announced = announced
        self.run: RunRecord | None = None
        self.attempts: dict[str, AttemptRecord] = {}  # task -> newest attempt written
        self.events: list[EventRecord] = []
        self.lost = False
        self._events: list[dict[str, Any]] = []
        self.handled: set[int] = set()  # ids of events written already out of the outbox

    def event(self, kind: str, **fields: Any) -> None:
        """Log an event of this run (written when the batch ends)."""
        values = _event_values(self.run_id, kind, **fields)
        if self.announced is not None and not self.announced(
            kind, values["from_phase"], values["to_phase"]
        ):
            values["posted_at"] = values["at"]
        self._events.append(values)

    def _wrote(self, row: Row[Any]) -> None:
        held = self.attempts.get(row.task)
        if held is None or held.attempt <= row.attempt:
            self.attempts[row.task] = AttemptRecord.of(row)

    async def close(self) -> None:
        """Write the pass's events (one statement, or pages of many: _insert_rows); their
        ids are the outbox's."""
        if not self._events:
            return
        # Ids come from a sequence, drawn in the VALUES list's order.
        ids = sorted(row.id for row in await _insert_rows(self.conn, _INSERT_EVENTS, self._events))
        self.events = [
            EventRecord(id=i, **{k: v for k, v in e.items() if k != "posted_at"})
            for i, e in zip(ids, self._events, strict=True)
        ]
        self.handled = {
            i for i, e in zip(ids, self._events, strict=True) if e["posted_at"] is not None
        }

    async def set_run_phase(
        self,
        new: RunPhase,
        *,
        expected: RunPhase | Collection[RunPhase] | None = None,
        message: str | None = None,
        reason: str | None = None,
        outputs: dict[str, Any] | None = None,
    ) -> bool:
        """Move the run to ``new`` if it is in an allowed (and expected) phase.

        Compare-and-set with its event. Returns False, without writing, when the move is
        not in RUN_TRANSITIONS or the run is no longer in an expected phase. ``message``
        and ``reason`` describe the new phase (None clears); ``outputs`` (the workflow's,
        on success) are stored with it when given.
        """
        new = RunPhase(new)
        if isinstance(expected, RunPhase):
            expected = {expected}
        sources = _sources(RUN_TRANSITIONS, new, expected)
        if not sources:
            return False
        now = _now()
        moved = await _compare_and_set(
            self.conn,
            RUNS,
            {"id": self.run_id},
            sources,
            new,
            {
                "message": message,
                "reason": reason,
                "updated_at": now,
                **({"outputs": outputs} if outputs is not None else {}),
            },
            now,
            missing=RunNotFound(f"run {self.run_id} not found"),
        )
        if moved is None:
            self.lost = True
            return False
        current, row = moved
        self.run = RunRecord.of(row)
        self.event(
            "RunPhase", at=now, from_phase=current, to_phase=new, reason=reason, message=message
        )
        return True

    async def create_attempt(
        self, task: str, attempt: int, *, not_before: datetime | None = None
    ) -> AttemptRecord | None:
        """Record a Pending attempt; None when this (run, task, attempt) already exists.

        ``not_before`` is the earliest start (retry backoff). Raises RunNotFound.
        """
        row = await self._insert_pending(task, attempt, not_before, _now())
        return None if row is None else AttemptRecord.of(row)

    async def create_attempts(self, tasks: Collection[str]) -> int:
        """Record a Pending first attempt of each of ``tasks`` (a fan-out's instances: in
        one transaction, all or none exist); those that exist are left. The count made."""
        pending = TaskPhase.PENDING.value
        rows = await self._insert_attempts(
            [{"task": t, "attempt": 1, "phase": pending, "not_before": None} for t in tasks],
            _now(),
        )
        return len(rows)

    async def _insert_pending(
        self, task: str, attempt: int, not_before: datetime | None, now: datetime
    ) -> Row[Any] | None:
        """Insert a Pending attempt and its event; None when it already exists."""
        if attempt < 1:
            raise ValueError(f"attempt numbers start at 1, got {attempt}")
        pending = {"phase": TaskPhase.PENDING.value, "not_before": not_before}
        rows = await self._insert_attempts([{"task": task, "attempt": attempt, **pending}], now)
        return rows[0] if rows else None

    async def _insert_attempts(self, values: list[dict[str, Any]], now: datetime) -> list[Row[Any]]:
        """Insert attempts, skipping those that exist; the rows made, in the order given,
        each with its creation event (and its start's, for one inserted Running).

        One statement for them all (in pages past a few rows: _insert_rows)."""
        if not values:
            return []
        try:
            rows = await _insert_rows(
                self.conn,
                self.store._new_attempts,
                [{"run_id": self.run_id, "created_at": now, **v} for v in values],
            )
        except IntegrityError:
            # The one constraint an insert that skips duplicates can break: the reference
            # to the run (no read of the run first: a statement fewer per start).
            raise RunNotFound(f"run {self.run_id} not found") from None
        made = {(row.task, row.attempt): row for row in rows}
        ordered = [made[k] for v in values if (k := (v["task"], v["attempt"])) in made]
        for row in ordered:
            self._wrote(row)
            at = {"at": now, "task": row.task, "attempt": row.attempt}
            self.event("TaskPhase", **at, to_phase=TaskPhase.PENDING, reason="Created")
            if row.phase == TaskPhase.RUNNING.value:
                self.event(
                    "TaskPhase",
                    **at,
                    from_phase=TaskPhase.PENDING,
                    to_phase=TaskPhase.RUNNING,
                    reason=row.reason,
                    message=row.message,
                )
        return ordered

    async def start_attempts(self, starts: Sequence[Starting]) -> list[bool]:
        """Move each attempt Pending -> Running (creating those marked ``create``): what
        starting tasks costs. For each, False when another writer started it first.

        The attempts to create are inserted Running in one statement: a row this insert
        made cannot have been started by anyone else, so no compare-and-set is needed;
        the others (retries, rows that existed) move by compare-and-set.
        """
        now = _now()
        fresh = [
            {
                "task": s.task,
                "attempt": s.attempt,
                "phase": TaskPhase.RUNNING.value,
                "started_at": now,
                "reason": s.reason,
                "message": s.message,
                "job_name": s.job_name,
                "cache_key": s.cache_key,
            }
            for s in starts
            if s.create
        ]
        inserted = {(row.task, row.attempt) for row in await self._insert_attempts(fresh, now)}
        won = []
        for s in starts:
            if (s.task, s.attempt) in inserted:
                won.append(True)
                continue
            values: dict[str, Any] = {"reason": s.reason, "message": s.message}
            if s.job_name is not None:
                values["job_name"] = s.job_name
            if s.cache_key is not None:
                values["cache_key"] = s.cache_key
            won.append(
                await self._move_attempt(
                    s.task, s.attempt, TaskPhase.RUNNING, {TaskPhase.PENDING}, values, now
                )
            )
        return won

    async def reuse_cached(
        self, task: str, attempt: int, *, create: bool, source: AttemptRecord, message: str
    ) -> bool:
        """Record the attempt Succeeded with ``source``'s outputs (reason ``Cached``);
        False when another writer started it first."""
        now = _now()
        if create:
            await self._insert_pending(task, attempt, None, now)
        started: dict[str, Any] = {"reason": "Cached", "message": message}
        if not await self._move_attempt(
            task, attempt, TaskPhase.RUNNING, {TaskPhase.PENDING}, started, now
        ):
            return False
        done = {
            **started,
            "outputs": dict(source.outputs or {}),
            "cached_from": {"runId": source.run_id, "task": source.task, "attempt": source.attempt},
        }
        return await self._move_attempt(
            task, attempt, TaskPhase.SUCCEEDED, {TaskPhase.RUNNING}, done, now
        )

    async def _move_attempt(
        self,
        task: str,
        attempt: int,
        new: TaskPhase,
        sources: Collection[TaskPhase],
        values: dict[str, Any],
        now: datetime,
    ) -> bool:
        """Compare-and-set one attempt's phase and log the event."""
        moved = await _compare_and_set(
            self.conn,
            ATTEMPTS,
            {"run_id": self.run_id, "task": task, "attempt": attempt},
            sources,
            new,
            values,
            now,
            missing=AttemptNotFound(
                f"attempt {attempt} of task {task!r} in run {self.run_id} not found"
            ),
        )
        if moved is None:
            self.lost = True
            return False
        current, row = moved
        self._wrote(row)
        self.event(
            "TaskPhase",
            at=now,
            task=task,
            attempt=attempt,
            from_phase=current,
            to_phase=new,
            reason=values.get("reason"),
            message=values.get("message"),
        )
        return True

    async def transition_attempt(
        self,
        task: str,
        attempt: int,
        new: TaskPhase,
        *,
        expected: TaskPhase | None = None,
        reason: str | None = None,
        message: str | None = None,
        outputs: dict[str, Any] | None = None,
        job_name: str | None = None,
    ) -> bool:
        """Move an attempt to ``new`` with a compare-and-set on its current phase.

        The attempt must be in ``expected`` (or, without it, any phase TASK_TRANSITIONS
        allows to reach ``new``); otherwise, or if a concurrent writer got there first,
        returns False and writes nothing. ``outputs`` and ``job_name`` are stored when
        given (left as they are when None); ``reason``/``message`` describe the new phase.
        Raises OutputsTooLarge (before writing anything, so the batch may go on) past
        ``max_output_bytes``, and AttemptNotFound for an attempt never created.
        """
        if outputs is not None:
            self.store._check_outputs(task, outputs)
        new = TaskPhase(new)
        sources = _sources(TASK_TRANSITIONS, new, None if expected is None else {expected})
        if not sources:
            return False
        values: dict[str, Any] = {"reason": reason, "message": message}
        if outputs is not None:
            values["outputs"] = outputs
        if job_name is not None:
            values["job_name"] = job_name
        return await self._move_attempt(task, attempt, new, sources, values, _now())
