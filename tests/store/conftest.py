"""Fixtures for the store tests: an open, migrated store on each backend."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from maestro.store import RunRecord, Store

MakeRun = Callable[..., Awaitable[RunRecord]]


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    """A migrated store on a fresh database (SQLite file, then PostgreSQL), 1 KiB output cap."""
    opened = await Store.open(database_url, migrate=True, max_output_bytes=1024)
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
def make_run(store: Store) -> MakeRun:
    """Create a run in ``store`` with sensible defaults; keyword arguments override them."""

    async def make(**overrides: Any) -> RunRecord:
        fields: dict[str, Any] = {
            "namespace": "team-a",
            "name": "nightly-1",
            "workflow_name": "nightly",
            "spec": {"tasks": [{"name": "build"}, {"name": "test", "dependsOn": ["build"]}]},
            "params": {"env": "prod", "n": 3},
        }
        fields.update(overrides)
        return await store.create_run(**fields)

    return make
