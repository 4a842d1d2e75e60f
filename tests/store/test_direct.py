"""PostgreSQL's hot path on psycopg (store.direct): what SQLAlchemy's path gave, kept."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import psycopg
import pytest

from maestro.api.phases import TaskPhase
from maestro.store import RunNotFound, Store, StoreUnavailable
from maestro.store.repository import Starting

pytestmark = pytest.mark.postgres


@pytest.fixture
async def pg_store(postgres_url: str) -> AsyncIterator[Store]:
    opened = await Store.open(postgres_url, migrate=True)
    try:
        yield opened
    finally:
        await opened.close()


async def _run_id(store: Store) -> str:
    run = await store.create_run(
        namespace="team-a",
        name="r1",
        workflow_name="w",
        spec={"tasks": [{"name": "a"}]},
        params={"when": "now"},
        uid="uid-1",
    )
    return run.id


async def test_a_pass_reads_back_what_it_wrote_typed_as_on_sqlalchemy(pg_store: Store) -> None:
    run_id = await _run_id(pg_store)
    async with pg_store.batch(run_id) as writes:
        (won,) = await writes.start_attempts([Starting("a", 1, True, message="go\x00")])
    assert won
    attempt = writes.attempts["a"]
    assert attempt.phase is TaskPhase.RUNNING
    assert attempt.message == "go\ufffd"
    assert attempt.started_at is not None
    assert attempt.started_at.utcoffset() == timedelta(0)
    # The events of the pass (Created, then Running) have ascending ids, in that order.
    assert [e.to_phase for e in writes.events] == ["Pending", "Running"]
    assert writes.events[0].id < writes.events[1].id
    run, latest, outbox = await pg_store.snapshot(run_id)
    assert latest == {"a": attempt}
    assert run.params == {"when": "now"}
    # Without an `announced` filter every event is in the outbox: the run's creation's too.
    assert [e.id for e in outbox][1:] == [e.id for e in writes.events]


async def test_many_rows_go_in_pages_and_keep_their_order(pg_store: Store) -> None:
    run_id = await _run_id(pg_store)
    tasks = [f"t{i:03d}" for i in range(150)]  # 64 + 64 + 16 + 6 rows per INSERT
    async with pg_store.batch(run_id) as writes:
        assert await writes.create_attempts(tasks) == 150
    assert [e.task for e in writes.events] == tasks
    ids = [e.id for e in writes.events]
    assert ids == sorted(ids)
    assert sorted(await pg_store.latest_attempts(run_id)) == tasks


async def test_errors_keep_their_meaning(pg_store: Store) -> None:
    """A foreign key the insert breaks is still the run's absence (SQLAlchemy's
    IntegrityError, translated once), and the transaction is rolled back whole."""
    with pytest.raises(RunNotFound):
        async with pg_store.batch("no-such-run") as writes:
            await writes.create_attempts(["a"])


async def test_every_statement_is_observed(pg_store: Store) -> None:
    seen: list[float | None] = []
    pg_store.watch_statements(seen.append)
    await _run_id(pg_store)
    assert seen
    assert all(s is not None and s >= 0 for s in seen)
    seen.clear()
    with pytest.raises(RunNotFound):
        async with pg_store.batch("no-such-run") as writes:
            await writes.create_attempts(["a"])
    assert seen == [None]  # the failed statement, counted as an error


async def test_a_connection_the_server_dropped_fails_once_and_is_replaced(
    pg_store: Store, postgres_url: str
) -> None:
    run_id = await _run_id(pg_store)
    with psycopg.connect(postgres_url.replace("+psycopg", ""), autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE usename = current_user AND pid <> pg_backend_pid()"
        )
    # The pooled connection that was dropped fails its transaction once (no password in
    # the message); the pool then opens a new one.
    with pytest.raises(StoreUnavailable) as failed:
        await pg_store.latest_attempts(run_id)
    assert "pw-" not in str(failed.value)
    assert await pg_store.latest_attempts(run_id) == {}
