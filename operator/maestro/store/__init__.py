"""The context store: run state in PostgreSQL (or an explicit SQLite file).

Everything that runs work takes a :class:`Store`, opened with :meth:`Store.open`.
"""

from maestro.store.errors import (
    AttemptNotFound,
    Fenced,
    InvalidDatabaseURL,
    InvalidOutputs,
    OutputsTooLarge,
    RunNotFound,
    SchemaError,
    StoreError,
    StoreUnavailable,
)
from maestro.store.migrate import current, head, upgrade
from maestro.store.records import AttemptRecord, EventRecord, RunRecord
from maestro.store.repository import (
    DEFAULT_CONTROLS,
    Announced,
    Batch,
    Launch,
    Starting,
    Store,
)

__all__ = [
    "DEFAULT_CONTROLS",
    "Announced",
    "AttemptNotFound",
    "AttemptRecord",
    "Batch",
    "EventRecord",
    "Fenced",
    "InvalidDatabaseURL",
    "InvalidOutputs",
    "Launch",
    "OutputsTooLarge",
    "RunNotFound",
    "RunRecord",
    "SchemaError",
    "Starting",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "current",
    "head",
    "upgrade",
]
