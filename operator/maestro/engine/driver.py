"""Drive one run to its end in this process (local mode, benchmarks, tests)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable

from maestro.engine.engine import Engine, Pass
from maestro.store import RunRecord


class Waker:
    """Executors call it with a run id when they learn something; drive loops wait on it."""

    def __init__(self) -> None:
        """No run is waiting yet."""
        self._events: dict[str, asyncio.Event] = {}

    def __call__(self, run_id: str) -> None:
        """Wake whoever drives ``run_id``."""
        self._events.setdefault(run_id, asyncio.Event()).set()

    def woken(self, run_ids: Iterable[str]) -> int:
        """How many of ``run_ids`` were woken and have not waited since (the queue depth)."""
        return sum(1 for r in run_ids if (e := self._events.get(r)) is not None and e.is_set())

    async def wait(self, run_id: str, seconds: float) -> None:
        """Return when woken or after ``seconds``, whichever comes first."""
        event = self._events.setdefault(run_id, asyncio.Event())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), seconds)
        event.clear()


async def drive(
    engine: Engine,
    run_id: str,
    waker: Waker,
    *,
    poll_seconds: float = 1.0,
    on_pass: Callable[[Pass], Awaitable[None]] | None = None,
) -> RunRecord:
    """Reconcile until the run finishes.

    ``poll_seconds`` bounds the wait between passes so changes made by another
    process (an approval or cancel through the CLI) are seen without a signal: after
    each wait the engine checks the stored run against the copy it holds.
    """
    while True:
        step = await engine.reconcile(run_id)
        if on_pass is not None:
            await on_pass(step)
        if step.run.phase.finished:
            engine.forget(run_id)
            return step.run
        if step.progressed:
            continue
        timeout = poll_seconds
        if step.decision.wake_at is not None:
            delay = (step.decision.wake_at - engine.clock()).total_seconds()
            timeout = max(0.0, min(timeout, delay))
        await waker.wait(run_id, timeout)
        await engine.observe(run_id)
