"""``/healthz`` (liveness), ``/readyz`` (readiness) and ``/metrics`` over aiohttp.

Liveness only proves the event loop answers: a database outage must not restart
the pod. Readiness checks the database (bounded by the store's ping timeout) and
that Kopf's watches are running.
"""

from __future__ import annotations

import asyncio

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from maestro.operator.metrics import Metrics
from maestro.store import Store, StoreError


class Health:
    """The probe and metrics server."""

    def __init__(self, store: Store, metrics: Metrics, watching: asyncio.Event) -> None:
        """``watching`` is set once Kopf reports it is ready (its watches start then)."""
        self.store = store
        self.metrics = metrics
        self.watching = watching
        self._runner: web.AppRunner | None = None

    async def healthz(self, _: web.Request) -> web.Response:
        """The loop answers: alive."""
        return web.json_response({"status": "ok"})

    async def readyz(self, _: web.Request) -> web.Response:
        """200 when the database answers and watches run; 503 naming what is wrong."""
        problems: dict[str, str] = {}
        try:
            await self.store.ping()
        except StoreError as err:
            problems["database"] = str(err)
        if not self.watching.is_set():
            problems["watches"] = "Kopf watches are not running yet"
        if problems:
            return web.json_response({"status": "not ready", **problems}, status=503)
        return web.json_response({"status": "ok"})

    async def metrics_view(self, _: web.Request) -> web.Response:
        """Prometheus text format."""
        await self.metrics.refresh()
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def start(self, host: str, health_port: int, metrics_port: int) -> None:
        """Serve probes on ``health_port`` and metrics on ``metrics_port`` (may be equal)."""
        app = web.Application()
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics_view)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        for port in sorted({health_port, metrics_port}):
            await web.TCPSite(self._runner, host, port).start()

    async def stop(self) -> None:
        """Stop serving."""
        if self._runner is not None:
            await self._runner.cleanup()
