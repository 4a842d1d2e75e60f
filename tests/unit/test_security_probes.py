"""/readyz says the database is down without naming where it is."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest

from maestro.operator.health import Health
from maestro.operator.metrics import Metrics
from maestro.store import Store, StoreUnavailable


class _DownStore:
    """A store whose database cannot be reached (the one layer /readyz talks to)."""

    async def ping(self) -> None:
        raise StoreUnavailable("cannot reach db.internal.example:5432/maestro: timeout")


async def test_readyz_hides_the_database_host_and_logs_it(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    watching = asyncio.Event()
    watching.set()
    # Metrics instrument a real engine; only the probe's store is the unreachable one.
    metrics_store = await Store.open(f"sqlite:///{tmp_path}/m.db", migrate=True)
    metrics = Metrics(metrics_store, api_writes=lambda: 0.0, watching=watching.is_set)
    health = Health(_DownStore(), metrics, watching)  # type: ignore[arg-type]
    try:
        with caplog.at_level(logging.WARNING, logger="maestro.operator"):
            response = await health.readyz(None)  # type: ignore[arg-type]
    finally:
        await metrics_store.close()
    assert response.status == 503
    assert response.text is not None
    body = json.loads(response.text)
    assert body["database"] == "unreachable (the operator log says why)"
    assert "db.internal.example" not in response.text
    assert "db.internal.example" in caplog.text  # the operator's admin can still see it
