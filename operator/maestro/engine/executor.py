"""The contract between the engine and the executors of each kind of task.

A new kind of task is one new module that implements :class:`Executor`. The engine
never imports executors: the CLI and the operator hand them in.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from maestro.api.models import Task
from maestro.api.phases import TaskPhase
from maestro.dag.scheduler import Controls
from maestro.store import RunRecord

# Called with a run id when an executor learns something about that run.
Wake = Callable[[str], None]


@dataclass(frozen=True)
class AttemptContext:
    """One attempt as an executor sees it."""

    run: RunRecord
    task: Task  # templates already expanded when passed to start()
    attempt: int
    handle: str | None  # the executor's own name for the attempt (a pod name), if any
    inputs: Mapping[str, Any]  # {"params": {...}, "tasks": {upstream: outputs}}
    controls: Controls
    started_at: datetime | None = None


class StartRejected(Exception):
    """``start`` can never succeed for this attempt (the API refused it for good).

    ``message`` names what was refused and why, in the API's own words; ``reason`` is
    recorded with the failed attempt (``InputError`` is not retried: same input, same
    refusal).
    """

    def __init__(self, message: str, reason: str = "Rejected") -> None:
        super().__init__(message)
        self.message, self.reason = message, reason


@dataclass(frozen=True)
class Result:
    """How an attempt ended."""

    phase: TaskPhase  # Succeeded or Failed
    message: str = ""
    reason: str | None = None
    outputs: dict[str, Any] | None = None

    @classmethod
    def succeeded(cls, outputs: dict[str, Any], message: str = "succeeded") -> Result:
        """A successful attempt with its outputs."""
        return cls(TaskPhase.SUCCEEDED, message, "Succeeded", outputs)

    @classmethod
    def failed(cls, message: str, reason: str = "Error") -> Result:
        """A failed attempt with a message that says exactly what happened."""
        return cls(TaskPhase.FAILED, message, reason)


class Executor(Protocol):
    """Runs attempts of one kind of task.

    ``start`` and ``stop`` must be idempotent: after a crash the engine may call
    them again for the same attempt, and the attempt must still run at most once.
    ``start`` raises :class:`StartRejected` when the attempt can never start, anything
    else only for infrastructure trouble (retried on the next pass); whatever goes
    wrong with the task itself once started is reported by ``poll``. An executor with
    a handle (a pod) is started again until its start succeeded once, never after:
    its object missing later means it vanished.
    """

    def handle(self, ctx: AttemptContext) -> str | None:
        """A deterministic name for the attempt, recorded when it starts."""
        ...

    async def start(self, ctx: AttemptContext) -> None:
        """Begin the attempt."""
        ...

    async def poll(self, ctx: AttemptContext) -> Result | None:
        """The attempt's result, or None while it runs."""
        ...

    async def stop(self, ctx: AttemptContext) -> None:
        """Stop the attempt (a timeout or a cancel); no result is expected after."""
        ...
