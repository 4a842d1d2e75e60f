"""``/healthz`` (liveness), ``/readyz`` (readiness) and ``/metrics`` over aiohttp.

Liveness only proves the event loop answers: a database outage must not restart
the pod. Readiness checks the database (bounded by the store's ping timeout) and
that the watches run and the bucket leases are renewed; it also says which buckets
this replica holds. ``/metrics`` and ``/readyz`` say more about the
operator than liveness does, so they can live on a port of their own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from maestro.operator.metrics import Metrics
from maestro.store import Store, StoreError

log = logging.getLogger("maestro.operator")


class Health:
    """The probe and metrics server."""

    def __init__(self, store: Store, metrics: Metrics, watching: asyncio.Event) -> None:
        """``watching`` is set once Kopf reports it is ready (its watches start then)."""
        self.store = store
        self.metrics = metrics
        self.watching = watching
        # Who this replica is and what it holds (the supervisor's), shown by /readyz.
        self.ownership: Callable[[], dict[str, Any]] = dict
        self._runners: list[web.AppRunner] = []

    async def healthz(self, _: web.Request) -> web.Response:
        """The loop answers: alive."""
        return web.json_response({"status": "ok"})

    async def readyz(self, _: web.Request) -> web.Response:
        """200 when the database answers and watches run; 503 naming what is wrong."""
        problems: dict[str, str] = {}
        try:
            await self.store.ping()
        except StoreError as err:
            # The detail names the database host: it goes to the log, not to whoever
            # can reach the probe port.
            log.warning("readiness: %s", err)
            problems["database"] = "unreachable (the operator log says why)"
        if not self.watching.is_set():
            problems["watches"] = "watches or bucket leases are not running yet"
        if problems:
            return web.json_response(
                {"status": "not ready", **problems, **self.ownership()}, status=503
            )
        return web.json_response({"status": "ok", **self.ownership()})

    async def metrics_view(self, _: web.Request) -> web.Response:
        """Prometheus text format."""
        await self.metrics.refresh()
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def start(self, host: str, health_port: int, metrics_port: int) -> None:
        """``/healthz`` on ``health_port``; ``/readyz`` and ``/metrics`` on ``metrics_port``.

        Equal ports serve all three on one listener.
        """
        routes: dict[int, list[tuple[str, Any]]] = {health_port: [("/healthz", self.healthz)]}
        routes.setdefault(metrics_port, []).extend(
            [("/readyz", self.readyz), ("/metrics", self.metrics_view)]
        )
        for port, handlers in sorted(routes.items()):
            app = web.Application()
            for path, handler in handlers:
                app.router.add_get(path, handler)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, host, port).start()
            self._runners.append(runner)

    async def stop(self) -> None:
        """Stop serving."""
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()
