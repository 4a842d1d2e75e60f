"""The hot path's statements on PostgreSQL, executed on psycopg below SQLAlchemy.

An engine pass is one transaction of a few small statements. Through SQLAlchemy's async
engine a transaction of one ``SELECT 1`` cost 1.3-1.9 ms of the operator's CPU (the
greenlet bridge, parameter and result processing, the connection's bookkeeping), on a
connection of the same pool driven by psycopg 0.6-0.7 ms; the operator's CPU per task
fell to 0.80x (docs/performance.md, sixth round).

The statements stay SQLAlchemy Core, built once; SQLAlchemy compiles each once per
process for the psycopg dialect and binds its parameters (:meth:`construct_expanded_state`
with the types' own processors: NUL-free text and JSON, UTC timestamps), so there is one
definition of every statement and of every column's conversion. Only the round trips move
here, on a connection of SQLAlchemy's own pool. SQLite (local runs) keeps SQLAlchemy's
path: :class:`Connection` is what both give the repository.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import psycopg
from psycopg import pq
from psycopg.rows import namedtuple_row
from sqlalchemy import Dialect, Insert
from sqlalchemy.exc import DBAPIError, MultipleResultsFound, NoResultFound, StatementError
from sqlalchemy.sql.compiler import Compiled
from sqlalchemy.sql.expression import ClauseElement, Executable

# Called with each statement's seconds, or None when it failed (metrics).
Observer = Callable[[float | None], None]


class Result(Protocol):
    """The rows of one statement, as the repository reads them."""

    def __iter__(self) -> Iterator[Any]: ...

    def first(self) -> Any: ...

    def one(self) -> Any: ...

    def all(self) -> Sequence[Any]: ...


class Connection(Protocol):
    """What the repository's Core statements run on: SQLAlchemy's ``AsyncConnection``
    (SQLite, and ORM sessions' connections) or :class:`Direct` (PostgreSQL's hot path)."""

    @property
    def dialect(self) -> Dialect: ...

    async def execute(self, statement: Executable, parameters: Any = None) -> Result: ...

    async def scalar(self, statement: Executable, parameters: Any = None) -> Any: ...


class Rows:
    """A statement's rows, fetched (named tuples: ``row.task``, as SQLAlchemy's rows)."""

    def __init__(self, rows: list[Any]) -> None:
        self._rows = rows

    def __iter__(self) -> Iterator[Any]:
        return iter(self._rows)

    def first(self) -> Any:
        return self._rows[0] if self._rows else None

    def one(self) -> Any:
        if not self._rows:
            raise NoResultFound("no row was found when one was required")
        if len(self._rows) > 1:
            raise MultipleResultsFound("multiple rows were found when one was required")
        return self._rows[0]

    def all(self) -> Sequence[Any]:
        return self._rows


@dataclass(frozen=True)
class Prepared:
    """A statement compiled for psycopg, with its parameters' bind processors."""

    statement: Executable  # kept with its compilation, so its id stays its own
    compiled: Compiled
    processors: Mapping[str, Callable[[Any], Any]]

    def bind(self, parameters: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
        """The SQL text and its parameters as psycopg takes them: expanding IN lists
        rendered, every value through its column type's bind processor."""
        state = self.compiled.construct_expanded_state(dict(parameters))  # type: ignore[attr-defined]
        processors = {**self.processors, **state.processors}  # the expanded ones' own
        values = {
            k: processors[k](v) if k in processors else v for k, v in state.parameters.items()
        }
        return state.statement, values


class Statements:
    """Each statement compiled once for one dialect (the statements are built once, so
    this stays as small as the hot path's set of statement shapes)."""

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self._prepared: dict[tuple[int, tuple[str, ...]], Prepared] = {}

    def prepared(self, statement: Executable, keys: tuple[str, ...]) -> Prepared:
        """``statement`` compiled; an INSERT without ``values()`` for the columns ``keys``
        (as SQLAlchemy names them: from the first parameter set)."""
        columns = keys if isinstance(statement, Insert) else ()
        found = self._prepared.get((id(statement), columns))
        if found is None:
            assert isinstance(statement, ClauseElement)
            compiled = statement.compile(dialect=self.dialect, column_keys=list(columns))
            processors = {}
            for param, name in compiled.bind_names.items():  # type: ignore[attr-defined]
                process = param.type.dialect_impl(self.dialect).bind_processor(self.dialect)
                if process is not None:
                    processors[name] = process
            found = Prepared(statement, compiled, processors)
            self._prepared[(id(statement), columns)] = found
        return found


class Direct:
    """One PostgreSQL connection in a transaction, running Core statements on psycopg.

    Errors come out as SQLAlchemy's (``DBAPIError.instance``, as SQLAlchemy wraps them),
    so callers catch one tree whichever path ran the statement.
    """

    def __init__(
        self,
        raw: psycopg.AsyncConnection[Any],
        statements: Statements,
        observers: Sequence[Observer],
    ) -> None:
        self.raw, self.statements, self.observers = raw, statements, observers

    @property
    def dialect(self) -> Dialect:
        return self.statements.dialect

    async def execute(
        self, statement: Executable, parameters: Mapping[str, Any] | None = None
    ) -> Rows:
        """Run ``statement`` with one parameter set (several rows go in one statement:
        see repository._insert_rows)."""
        values = parameters or {}
        sql, bound = self.statements.prepared(statement, tuple(values)).bind(values)
        started = time.perf_counter()
        try:
            async with self.raw.cursor(row_factory=namedtuple_row) as cur:
                await cur.execute(sql, bound)
                res = cur.pgresult
                # Tested on the result's status, not ``description``, which builds column
                # objects: no rows for a statement without any.
                ok = res is not None and res.status == pq.ExecStatus.TUPLES_OK
                rows = await cur.fetchall() if ok else []
        except psycopg.Error as exc:
            for observe in self.observers:
                observe(None)
            raise translated(exc, sql, bound, self.dialect) from exc
        for observe in self.observers:
            observe(time.perf_counter() - started)
        return Rows(rows)

    async def scalar(
        self, statement: Executable, parameters: Mapping[str, Any] | None = None
    ) -> Any:
        row = (await self.execute(statement, parameters)).first()
        return None if row is None else row[0]


def translated(exc: psycopg.Error, sql: str, params: Any, dialect: Dialect) -> StatementError:
    """psycopg's error as SQLAlchemy would have raised it (an IntegrityError, ...)."""
    return DBAPIError.instance(sql, params, exc, psycopg.Error, dialect=dialect)
