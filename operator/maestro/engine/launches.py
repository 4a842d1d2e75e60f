"""Launch marks of every run's passes, written together (a group commit).

A pass that created pods records that they exist (:meth:`Store.mark_launched`) before
it ends. Under load many runs' passes do so at once, and each transaction would cost
its round trips (BEGIN, the fence, the update, COMMIT) for one statement's work. Here
the marks that arrive while one transaction writes wait for the next, which takes them
all: a lone pass waits for nothing more than its own transaction, a burst of a hundred
costs a few.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Collection

from maestro.store import AttemptRecord, Launch, Store
from maestro.store.fencing import FENCE


class LaunchMarks:
    """The one writer of launch marks of a process's engine."""

    def __init__(self, store: Store) -> None:
        """Write through ``store``."""
        self.store = store
        self._waiting: list[tuple[Launch, asyncio.Future[list[AttemptRecord]]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def mark(self, run_id: str, attempts: Collection[tuple[str, int]]) -> list[AttemptRecord]:
        """Record that these attempts of one run were launched, under the caller's fence:
        the attempts as written. Raises :class:`~maestro.store.Fenced` when the fence no
        longer holds (nothing written for this run), or what the transaction raised."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[list[AttemptRecord]] = loop.create_future()
        self._waiting.append((Launch(run_id, tuple(attempts), FENCE.get()), done))
        if self._writer is None:
            # A context of its own: the writer writes for many runs, none of whose fences
            # (a context variable) may be checked as the transaction's.
            self._writer = loop.create_task(self._write(), context=contextvars.Context())
        return await done

    async def _write(self) -> None:
        try:
            while self._waiting:
                group, self._waiting = self._waiting, []
                try:
                    outcomes = await self.store.mark_launched([launch for launch, _ in group])
                except asyncio.CancelledError:
                    for _, done in group:
                        done.cancel()
                    raise
                except Exception as err:
                    for _, done in group:
                        if not done.done():
                            done.set_exception(err)
                    continue
                for (_, done), outcome in zip(group, outcomes, strict=True):
                    if done.done():  # its pass was cancelled meanwhile
                        continue
                    if isinstance(outcome, Exception):
                        done.set_exception(outcome)
                    else:
                        done.set_result(outcome)
        finally:
            self._writer = None
            for _, done in self._waiting:  # cancelled itself (the process stops)
                done.cancel()
            self._waiting = []
