"""/readyz says the database is down without naming where it is."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from maestro.operator.health import Health
from maestro.operator.metrics import Metrics
from maestro.store import StoreUnavailable


class _DownStore:
    """A store whose database cannot be reached (the one layer /readyz talks to)."""

    async def ping(self) -> None:
        raise StoreUnavailable("cannot reach db.internal.example:5432/maestro: timeout")


async def test_readyz_hides_the_database_host_and_logs_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    watching = asyncio.Event()
    watching.set()
    health = Health(_DownStore(), Metrics(lambda: 0.0, lambda: 0.0), watching)  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="maestro.operator"):
        response = await health.readyz(None)  # type: ignore[arg-type]
    assert response.status == 503
    assert response.text is not None
    body = json.loads(response.text)
    assert body["database"] == "unreachable (the operator log says why)"
    assert "db.internal.example" not in response.text
    assert "db.internal.example" in caplog.text  # the operator's admin can still see it
