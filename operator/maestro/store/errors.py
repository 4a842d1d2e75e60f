"""Errors raised by the context store. Every one is a :class:`StoreError`."""

from __future__ import annotations


class StoreError(Exception):
    """Base class of every error the store raises."""


class InvalidDatabaseURL(StoreError):
    """The database URL is not one the store accepts (``postgresql://`` or ``sqlite:///``)."""


class StoreUnavailable(StoreError):
    """The database cannot be reached. The message names host, port and database only."""


class SchemaError(StoreError):
    """The database schema is missing, older or unknown to this Maestro, or failed to migrate."""


class RunNotFound(StoreError):
    """No run has the given id."""


class AttemptNotFound(StoreError):
    """No task attempt has the given (run, task, attempt)."""


class OutputsTooLarge(StoreError):
    """A task's outputs exceed the configured cap; nothing was written."""

    def __init__(self, task: str, size: int, cap: int) -> None:
        super().__init__(f"outputs of task {task!r} are {size} bytes, over the cap of {cap} bytes")
        self.task = task
        self.size = size
        self.cap = cap


class InvalidOutputs(StoreError):
    """A task's outputs are not a JSON object."""


class Fenced(StoreError):
    """A write on a run's behalf by a replica that no longer holds the run's bucket.

    Nothing was written; the run is someone else's now (or this replica's again under
    a new epoch, with a new driver).
    """
