"""``maestro operator``: the one way to start the operator."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import zlib

import click

from maestro.operator.app import OperatorConfig, run_operator
from maestro.store import Store, StoreError


class _JsonFormatter(logging.Formatter):
    """One JSON object per line, for cluster log collectors."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(fmt: str, verbose: bool) -> None:
    """Plain or JSON logs on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    # Kopf is chatty at INFO about every handler call; warnings are what matter.
    logging.getLogger("kopf").setLevel(logging.INFO if verbose else logging.WARNING)


def _default_priority() -> int:
    # Kopf peering freezes operators with equal priorities: derive distinct ones per pod.
    return zlib.crc32(os.environ.get("HOSTNAME", "maestro").encode()) % 1000 + 1


@click.command("operator")
@click.option("--database-url", envvar="MAESTRO_DATABASE_URL", required=True, help="Store URL.")
@click.option(
    "--namespace", "namespaces", multiple=True, help="Namespace to watch (repeat); default all."
)
@click.option("--kubeconfig", envvar="KUBECONFIG", help="Default: in-cluster or ~/.kube/config.")
@click.option(
    "--migrate/--no-migrate",
    default=False,
    show_default=True,
    help="Upgrade the database schema at start (otherwise refuse an old one).",
)
@click.option("--connect-timeout", default=5.0, show_default=True, help="Seconds.")
@click.option(
    "--max-output-bytes", default=64 * 1024, show_default=True, help="Cap on one task's outputs."
)
@click.option("--peering", help="Kopf peering name for HA (several replicas, one active).")
@click.option("--priority", type=int, default=None, help="Peering priority (default: per pod).")
@click.option(
    "--peering-lifetime",
    type=click.IntRange(min=2),
    default=6,
    show_default=True,
    help="Seconds a replica's peering record stays valid: a killed active replica is "
    "replaced after about this long (it is refreshed every second or so meanwhile).",
)
@click.option(
    "--listen-address",
    default="127.0.0.1",
    show_default=True,
    help="Address of the probe and metrics server (0.0.0.0 in a pod).",
)
@click.option("--health-port", default=8080, show_default=True, help="/healthz and /readyz.")
@click.option("--metrics-port", default=8080, show_default=True, help="/metrics.")
@click.option(
    "--status-interval",
    default=1.0,
    show_default=True,
    help="Seconds between status patches of one run (the final state always goes).",
)
@click.option(
    "--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True
)
@click.option("-v", "--verbose", is_flag=True)
def operator_cmd(
    database_url: str,
    namespaces: tuple[str, ...],
    kubeconfig: str | None,
    migrate: bool,
    connect_timeout: float,
    max_output_bytes: int,
    peering: str | None,
    priority: int | None,
    peering_lifetime: int,
    listen_address: str,
    health_port: int,
    metrics_port: int,
    status_interval: float,
    log_format: str,
    verbose: bool,
) -> None:
    """Run the Maestro operator (Kopf) against the current cluster."""
    setup_logging(log_format, verbose)
    if kubeconfig:
        os.environ["KUBECONFIG"] = kubeconfig  # Kopf's login reads it from there
    config = OperatorConfig(
        database_url=database_url,
        namespaces=list(namespaces),
        kubeconfig=kubeconfig,
        migrate=migrate,
        connect_timeout=connect_timeout,
        max_output_bytes=max_output_bytes,
        peering=peering,
        priority=priority if priority is not None else _default_priority(),
        peering_lifetime=peering_lifetime,
        listen_address=listen_address,
        health_port=health_port,
        metrics_port=metrics_port,
        status_interval=status_interval,
    )
    sys.exit(asyncio.run(_main(config)))


async def _main(config: OperatorConfig) -> int:
    log = logging.getLogger("maestro.operator")
    try:
        store = await Store.open(
            config.database_url,
            migrate=config.migrate,
            connect_timeout=config.connect_timeout,
            max_output_bytes=config.max_output_bytes,
        )
    except StoreError as err:
        # Fail fast, one line, before any watch starts (no silent fallback).
        log.error("cannot start: %s", err)
        return 1
    log.info("store: %s", store.description)
    try:
        await run_operator(config, store)
    finally:
        await store.close()
    return 0
