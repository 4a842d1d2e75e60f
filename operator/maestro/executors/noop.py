"""An executor that runs nothing: every attempt succeeds, with no outputs, when polled.

It measures the engine alone (benchmarks, scale tests): whatever time a run takes
with it is the engine's and the store's.
"""

from __future__ import annotations

import time

from maestro.engine.driver import Waker
from maestro.engine.engine import Engine
from maestro.engine.executor import AttemptContext, Result, Wake
from maestro.store import Store


class NoopExecutor:
    """Records starts and the time spent inside itself, so callers can subtract it."""

    def __init__(self, wake: Wake) -> None:
        """``wake`` is told when an attempt starts, so the driver polls it at once."""
        self.wake = wake
        self.started: list[tuple[str, int]] = []
        self.seconds = 0.0

    def handle(self, ctx: AttemptContext) -> str | None:
        """No external object."""
        return None

    async def start(self, ctx: AttemptContext) -> None:
        """Record the start; the attempt is finished as soon as it is polled."""
        t = time.perf_counter()
        self.started.append((ctx.task.name, ctx.attempt))
        self.wake(ctx.run.id)
        self.seconds += time.perf_counter() - t

    async def poll(self, ctx: AttemptContext) -> Result | None:
        """Always done."""
        t = time.perf_counter()
        result = Result.succeeded({})
        self.seconds += time.perf_counter() - t
        return result

    async def stop(self, ctx: AttemptContext) -> None:
        """Nothing to stop."""


def noop_engine(store: Store) -> tuple[Engine, NoopExecutor, Waker]:
    """An engine on ``store`` whose container, HTTP and approval tasks all run on one
    NoopExecutor (its ``started`` and ``seconds`` cover them all), and its waker."""
    waker = Waker()
    noop = NoopExecutor(waker)
    return Engine(store, {"container": noop, "http": noop, "approval": noop}), noop, waker
