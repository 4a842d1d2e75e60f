"""Approval gates: an attempt succeeds once the run's approvals name its task."""

from __future__ import annotations

from maestro.api.phases import TaskPhase
from maestro.engine.executor import AttemptContext, Result


class ApprovalExecutor:
    """Nothing to start or stop: the gate is the run's ``approvals`` list.

    An approval given before the gate is reached counts (a GitOps change may carry
    it ahead of time). Timeouts come from the task's ``timeoutSeconds``.
    """

    def handle(self, ctx: AttemptContext) -> str | None:
        """Approval gates have no external object."""
        return None

    async def start(self, ctx: AttemptContext) -> None:
        """Nothing to start: the gate waits for people."""

    async def poll(self, ctx: AttemptContext) -> Result | None:
        """Open when approved."""
        if ctx.task.name in ctx.controls.approvals:
            return Result(TaskPhase.SUCCEEDED, "approved", "Approved", {"approved": True})
        return None

    async def stop(self, ctx: AttemptContext) -> None:
        """Nothing to stop."""
