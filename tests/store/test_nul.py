"""NUL characters, which PostgreSQL text and JSONB cannot hold, never block a write."""

from __future__ import annotations

from maestro.api.phases import TaskPhase
from maestro.store import Store
from store.conftest import MakeRun


async def test_nul_in_params_and_messages_is_stored_replaced(
    store: Store, make_run: MakeRun
) -> None:
    run = await make_run(params={"x": "a\x00b", "k\x00": "v"})
    again = await store.get_run(run.id)
    assert again.params == {"x": "a\ufffdb", "k\ufffd": "v"}


async def test_nul_in_an_attempt_message_and_outputs_is_stored_replaced(
    store: Store, make_run: MakeRun
) -> None:
    """A task's failure message or outputs (an HTTP body, a termination message) with NUL."""
    run = await make_run()
    await store.create_attempt(run.id, "build", 1)
    assert await store.transition_attempt(run.id, "build", 1, TaskPhase.RUNNING)
    assert await store.transition_attempt(
        run.id,
        "build",
        1,
        TaskPhase.FAILED,
        reason="UnexpectedStatus",
        message="status 500: \x00oops",
        outputs={"body": "\x00"},
    )
    attempt = (await store.latest_attempts(run.id))["build"]
    assert (attempt.phase, attempt.message) == (TaskPhase.FAILED, "status 500: \ufffdoops")
    assert attempt.outputs == {"body": "\ufffd"}
