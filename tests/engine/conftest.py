"""Fixtures for the engine tests: a harness on each backend, or on SQLite only."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from kit import Harness, harness


@pytest.fixture
async def h(database_url: str, tmp_path: Path) -> AsyncIterator[Harness]:
    """A harness on a fresh database: SQLite, then PostgreSQL."""
    async with harness(database_url, tmp_path) as made:
        yield made


@pytest.fixture
async def h_sqlite(tmp_path: Path) -> AsyncIterator[Harness]:
    """A harness on SQLite only, for slow tests whose subject is not the backend."""
    async with harness(f"sqlite:///{tmp_path / 'maestro.db'}", tmp_path) as made:
        yield made
