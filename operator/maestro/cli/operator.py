"""``maestro operator``: the one way to start the operator."""

from __future__ import annotations

import logging
import os
import socket
import sys

import click
import uvloop

from maestro.executors.http import EgressPolicy
from maestro.k8s.config import ConfigError
from maestro.operator.app import OperatorConfig, run_operator
from maestro.operator.logs import JsonFormatter, RunContextFilter, TextFormatter
from maestro.store import Store, StoreError


def setup_logging(fmt: str, verbose: bool) -> None:
    """Plain or JSON logs on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RunContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    # Kopf is chatty at INFO about every handler call; warnings are what matter.
    logging.getLogger("kopf").setLevel(logging.INFO if verbose else logging.WARNING)


def _default_replica() -> str:
    # Two live replicas must never share a name (both would think they hold the same
    # buckets): the pod's name in a cluster, else this host and process.
    return os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"


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
@click.option(
    "--replica",
    default=None,
    help="This replica's name in the store's bucket leases, unique among live replicas "
    "(default: $POD_NAME, else host-pid). Every replica is active; they share the runs.",
)
@click.option(
    "--lease-seconds",
    type=click.FloatRange(min=1.0),
    default=5.0,
    show_default=True,
    help="How long a replica's buckets stay its own without renewal: a crashed replica's "
    "runs are taken over after about this long.",
)
@click.option(
    "--renew-seconds",
    type=click.FloatRange(min=0.1),
    default=1.0,
    show_default=True,
    help="How often leases are renewed and buckets rebalanced (well under --lease-seconds).",
)
@click.option(
    "--db-pool-size",
    type=click.IntRange(min=2),
    default=30,
    show_default=True,
    help="Database connections this replica keeps (a third more in bursts, plus one for "
    "its leases): replicas x that must fit the server's max_connections.",
)
@click.option(
    "--listen-address",
    default="127.0.0.1",
    show_default=True,
    help="Address of the probe and metrics server (0.0.0.0 in a pod).",
)
@click.option("--health-port", default=8080, show_default=True, help="/healthz.")
@click.option(
    "--metrics-port",
    default=8080,
    show_default=True,
    help="/metrics and /readyz (a port of their own keeps them off the probe port).",
)
@click.option(
    "--default-service-account",
    default="default",
    show_default=True,
    help="ServiceAccount a run acts as when neither it nor its Workflow names one.",
)
@click.option(
    "--own-namespace",
    envvar="POD_NAMESPACE",
    help="The operator's namespace; runs there are refused (default: $POD_NAMESPACE).",
)
@click.option(
    "--allow-runs-in-own-namespace",
    is_flag=True,
    help="Let runs use the operator's own namespace (and so reach its Secrets' neighbours).",
)
@click.option(
    "--egress-allow",
    multiple=True,
    metavar="CIDR",
    help="HTTP tasks may reach this network despite the default denials (repeat).",
)
@click.option(
    "--egress-deny",
    multiple=True,
    metavar="CIDR",
    help="HTTP tasks may never reach this network; wins over --egress-allow (repeat).",
)
@click.option(
    "--allow-seconds-schedules",
    is_flag=True,
    help="Test hook: accept WorkflowSchedules with a sixth (seconds) cron field.",
)
@click.option(
    "--status-interval",
    default=1.0,
    show_default=True,
    help="Seconds between status patches of one run (the final state always goes).",
)
@click.option(
    "--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True
)
@click.option(
    "--otlp-endpoint",
    envvar="OTEL_EXPORTER_OTLP_ENDPOINT",
    help="Export run traces over OTLP/HTTP to this URL (default: no traces).",
)
@click.option("-v", "--verbose", is_flag=True)
def operator_cmd(
    database_url: str,
    namespaces: tuple[str, ...],
    kubeconfig: str | None,
    migrate: bool,
    connect_timeout: float,
    max_output_bytes: int,
    replica: str | None,
    lease_seconds: float,
    renew_seconds: float,
    db_pool_size: int,
    listen_address: str,
    health_port: int,
    metrics_port: int,
    status_interval: float,
    default_service_account: str,
    own_namespace: str | None,
    allow_runs_in_own_namespace: bool,
    egress_allow: tuple[str, ...],
    egress_deny: tuple[str, ...],
    allow_seconds_schedules: bool,
    log_format: str,
    otlp_endpoint: str | None,
    verbose: bool,
) -> None:
    """Run the Maestro operator (Kopf) against the current cluster."""
    setup_logging(log_format, verbose)
    try:
        EgressPolicy.of(egress_allow, egress_deny)
    except ValueError as err:
        raise click.BadParameter(str(err)) from None
    if renew_seconds * 2 > lease_seconds:
        raise click.BadParameter(
            f"--renew-seconds {renew_seconds} must be at most half of --lease-seconds "
            f"{lease_seconds}, or a lease may lapse between two renewals"
        )
    if kubeconfig:
        os.environ["KUBECONFIG"] = kubeconfig  # Kopf's login reads it from there
    config = OperatorConfig(
        database_url=database_url,
        namespaces=list(namespaces),
        kubeconfig=kubeconfig,
        migrate=migrate,
        connect_timeout=connect_timeout,
        max_output_bytes=max_output_bytes,
        replica=replica or _default_replica(),
        lease_seconds=lease_seconds,
        renew_seconds=renew_seconds,
        db_pool_size=db_pool_size,
        listen_address=listen_address,
        health_port=health_port,
        metrics_port=metrics_port,
        status_interval=status_interval,
        otlp_endpoint=otlp_endpoint,
        default_service_account=default_service_account,
        own_namespace=own_namespace,
        allow_runs_in_own_namespace=allow_runs_in_own_namespace,
        egress_allow=list(egress_allow),
        egress_deny=list(egress_deny),
        allow_seconds_schedules=allow_seconds_schedules,
    )
    # uvloop: the operator is a few thousand callbacks a second under load (psycopg's
    # waits, aiohttp's reads, the runs' wakeups), and the loop's own overhead is a part of
    # its CPU per task (0.94x, docs/performance.md, seventh round).
    sys.exit(uvloop.run(_main(config)))


async def _main(config: OperatorConfig) -> int:
    log = logging.getLogger("maestro.operator")
    try:
        store = await Store.open(
            config.database_url,
            migrate=config.migrate,
            connect_timeout=config.connect_timeout,
            max_output_bytes=config.max_output_bytes,
            pool_size=config.db_pool_size,
            # A replica paused mid-transaction past its lease must not keep holding the
            # rows of runs and buckets others have taken over (docs/operator.md).
            idle_in_transaction=config.lease_seconds,
        )
    except StoreError as err:
        # Fail fast, one line, before any watch starts (no silent fallback).
        log.error("cannot start: %s", err)
        return 1
    log.info("store: %s", store.description)
    try:
        await run_operator(config, store)
    except ConfigError as err:
        log.error("cannot start: %s", err)  # no way to the API server: fail fast
        return 1
    finally:
        await store.close()
    return 0
