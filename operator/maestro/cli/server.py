"""``maestro server``: the HTTP API and web UI, one process beside the operator."""

from __future__ import annotations

import asyncio
import logging
import sys

import click
import uvicorn

from maestro.cli.operator import setup_logging
from maestro.k8s.client import Kube, load_config
from maestro.k8s.config import ConfigError
from maestro.server.app import create_app
from maestro.store import Store, StoreError


@click.command("server")
@click.option("--database-url", envvar="MAESTRO_DATABASE_URL", required=True, help="Store URL.")
@click.option("--kubeconfig", envvar="KUBECONFIG", help="Default: in-cluster or ~/.kube/config.")
@click.option(
    "--listen-address",
    default="127.0.0.1",
    show_default=True,
    help="Address to serve on (0.0.0.0 in a pod).",
)
@click.option("--port", default=8000, show_default=True)
@click.option(
    "--allow-anonymous",
    is_flag=True,
    help="Serve requests without a token as system:anonymous (RBAC still decides).",
)
@click.option(
    "--auth-cache-seconds",
    default=5.0,
    show_default=True,
    help="How long a TokenReview or SubjectAccessReview answer is reused.",
)
@click.option("--connect-timeout", default=5.0, show_default=True, help="Seconds.")
@click.option(
    "--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True
)
@click.option("-v", "--verbose", is_flag=True)
def server_cmd(
    database_url: str,
    kubeconfig: str | None,
    listen_address: str,
    port: int,
    allow_anonymous: bool,
    auth_cache_seconds: float,
    connect_timeout: float,
    log_format: str,
    verbose: bool,
) -> None:
    """Serve the Maestro HTTP API (OpenAPI at /openapi.json) and the web UI (/ui/)."""
    setup_logging(log_format, verbose)

    async def main() -> int:
        log = logging.getLogger("maestro.server")
        try:
            # The server reads; migrating is the operator's (or `maestro db upgrade`'s) job.
            store = await Store.open(database_url, connect_timeout=connect_timeout)
        except StoreError as err:
            log.error("cannot start: %s", err)
            return 1
        try:
            kube = Kube(await load_config(kubeconfig))
        except ConfigError as err:
            log.error("cannot start: %s", err)
            await store.close()
            return 1
        app = create_app(
            store, kube, allow_anonymous=allow_anonymous, auth_cache_seconds=auth_cache_seconds
        )
        config = uvicorn.Config(
            app, host=listen_address, port=port, log_config=None, access_log=verbose
        )
        log.info("store: %s; serving on http://%s:%d", store.description, listen_address, port)
        try:
            await uvicorn.Server(config).serve()
        finally:
            await kube.close()
            await store.close()
        return 0

    sys.exit(asyncio.run(main()))
