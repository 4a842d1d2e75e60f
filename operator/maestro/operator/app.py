"""Assemble and run the operator: store (fail fast), engine, executors, Kopf, probes."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from dataclasses import dataclass, field
from typing import Any

import kopf

from maestro.api.models import GROUP, VERSION
from maestro.engine.driver import Waker
from maestro.engine.engine import Engine
from maestro.engine.executor import Executor
from maestro.executors.approval import ApprovalExecutor
from maestro.executors.container import ContainerExecutor
from maestro.executors.http import EgressPolicy, HttpExecutor, egress_client, own_addresses
from maestro.executors.secrets import KubeSecrets
from maestro.executors.workflow import ClusterWorkflows
from maestro.k8s.client import Kube, load_config
from maestro.operator.health import Health
from maestro.operator.leasing import LeaseKeeper
from maestro.operator.metrics import Metrics
from maestro.operator.publishing import announced
from maestro.operator.runs import RunController, Settings
from maestro.operator.schedules import ScheduleController, ScheduleSettings
from maestro.operator.supervisor import Supervisor
from maestro.operator.tracing import RunTracer
from maestro.operator.workflows import reconcile_workflow
from maestro.store import Store

log = logging.getLogger("maestro.operator")


@dataclass
class OperatorConfig:
    """Everything ``maestro operator`` accepts."""

    database_url: str
    namespaces: list[str] = field(default_factory=list)
    kubeconfig: str | None = None
    migrate: bool = False
    connect_timeout: float = 5.0
    max_output_bytes: int = 64 * 1024
    # This replica's name in the store's bucket leases (unique among live replicas).
    replica: str = "maestro"
    # A crashed replica's buckets are taken over this long after its last renewal.
    lease_seconds: float = 5.0
    renew_seconds: float = 1.0
    db_pool_size: int = 30
    listen_address: str = "127.0.0.1"
    health_port: int = 8080
    metrics_port: int = 8080
    status_interval: float = 1.0
    otlp_endpoint: str | None = None
    default_service_account: str = "default"
    # The operator's namespace (and its database Secret): no runs there unless allowed.
    own_namespace: str | None = None
    allow_runs_in_own_namespace: bool = False
    egress_allow: list[str] = field(default_factory=list)
    egress_deny: list[str] = field(default_factory=list)
    allow_seconds_schedules: bool = False


def build_registry(kube: Kube, schedules: ScheduleController) -> kopf.OperatorRegistry:
    """Kopf handlers: thin calls into the controllers (Kopf passes everything by keyword).

    WorkflowRuns and their pods are not watched through Kopf: the replica's
    :class:`~maestro.operator.supervisor.Supervisor` drives the runs of its buckets.
    """
    registry = kopf.OperatorRegistry()

    # A private registry has none of Kopf's default login handlers: in a pod the
    # service account, elsewhere the kubeconfig ($KUBECONFIG or --kubeconfig).
    @kopf.on.login(registry=registry)
    def login(**kw: Any) -> kopf.ConnectionInfo | None:
        return kopf.login_with_service_account(**kw) or kopf.login_with_kubeconfig(**kw)

    @kopf.on.event(GROUP, VERSION, "workflows", registry=registry)
    async def workflow_event(**kw: Any) -> None:
        if kw["type"] != "DELETED":
            await reconcile_workflow(kube, kw["body"])

    @kopf.daemon(GROUP, VERSION, "workflowschedules", registry=registry, cancellation_timeout=10)
    async def schedule_daemon(**kw: Any) -> None:
        await schedules.daemon(kw["body"], kw["stopped"])

    return registry


async def _ready_when(
    kopf_ready: asyncio.Event, supervisor: Supervisor, watching: asyncio.Event
) -> None:
    """Set ``watching`` once Kopf is ready, the leases renewed and every watch listed."""
    await kopf_ready.wait()
    while not supervisor.ready:
        await asyncio.sleep(0.1)
    watching.set()


async def _stop_gracefully(
    supervisor: Supervisor,
    kopf_ready: asyncio.Event,
    stop: asyncio.Event | None,
    kopf_stop: asyncio.Event,
) -> None:
    """On SIGTERM/SIGINT (or ``stop``): hand the buckets over first, then stop Kopf.

    Kopf's own signal handlers would stop Kopf first (its schedule daemons, seconds),
    while this replica's runs wait for nobody; ours replace them once Kopf has started.
    """
    signalled = asyncio.Event()
    await kopf_ready.wait()
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, signalled.set)
    waits = [asyncio.ensure_future(signalled.wait())]
    if stop is not None:
        waits.append(asyncio.ensure_future(stop.wait()))
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for fut in waits:
            fut.cancel()
    log.info("stopping: handing this replica's buckets over")
    try:
        await supervisor.shutdown()
    finally:
        kopf_stop.set()


def configure_kopf(settings: kopf.OperatorSettings, config: OperatorConfig) -> None:
    """Keep Kopf's bookkeeping small and out of our status."""
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    # Kopf would post an Event per handler run: we post our own, fewer and clearer.
    settings.posting.enabled = False
    # Watching named namespaces needs nothing cluster-wide: no CRD or Namespace watch
    # (the namespaced install grants none). CRDs are then discovered at start only.
    settings.scanning.disabled = bool(config.namespaces)
    settings.watching.connect_timeout = 60
    # Kopf's default backoffs (1, 1, 2, 3, 5, 8, 13, 21 s) leave a watch dead for up to
    # 21 s after the API server is back; every 2 s for about 5 minutes instead.
    settings.networking.error_backoffs = [0.5, 1.0, *[2.0] * 150]
    settings.watching.server_timeout = 300
    # Every replica is active: the store's bucket leases split the work, not peering.
    settings.peering.standalone = True


# Connections to the API server for the operator's requests (pod creations, status
# patches, Events), besides its watches: enough for a burst to keep the API server busy.
REQUEST_CONNECTIONS = 16


def _settle_garbage_collector() -> None:
    """Keep the collector off what lives as long as the process, and let it run less often.

    Everything made so far (modules, the API client's ~800 model classes, settings) stays
    to the end: frozen, a full collection no longer walks it. Every engine pass allocates
    thousands of short-lived objects (rows, statements, JSON), so the default first
    threshold (700) ran a collection every few passes: ~0.5 s of CPU in the 100-run
    benchmark, ~0.06 s with these (docs/performance.md).
    """
    gc.freeze()
    gc.set_threshold(20_000, 20, 100)


async def run_operator(
    config: OperatorConfig, store: Store, stop: asyncio.Event | None = None
) -> None:
    """Run until ``stop`` is set (or the process is signalled). The store is required."""
    # Two watches per namespace watched (runs, pods) hold a connection each for good.
    watches = 2 * max(1, len(config.namespaces))
    api = await load_config(config.kubeconfig, connections=REQUEST_CONNECTIONS + watches)
    kube = Kube(api)
    waker = Waker()
    watching = asyncio.Event()  # Kopf's watches and the pod watches all run
    kopf_ready = asyncio.Event()
    metrics = Metrics(
        store,
        namespaces=config.namespaces,
        api_writes=lambda: float(kube.writes),
        watching=watching.is_set,
    )
    health = Health(store, metrics, watching)
    await health.start(config.listen_address, config.health_port, config.metrics_port)
    policy = EgressPolicy.of(config.egress_allow, config.egress_deny, own_addresses())
    protected = (
        frozenset({config.own_namespace})
        if config.own_namespace and not config.allow_runs_in_own_namespace
        else frozenset()
    )
    async with egress_client(policy) as client:
        container = ContainerExecutor(kube, waker)
        executors: dict[str, Executor] = {
            "container": container,
            "http": HttpExecutor(KubeSecrets(kube), waker, client),
            "approval": ApprovalExecutor(),
            "workflow": ClusterWorkflows(kube, store),
        }
        engine = Engine(store, executors, announced=announced)
        tracer = RunTracer.configure(config.otlp_endpoint)
        runs = RunController(
            engine,
            kube,
            waker,
            metrics,
            Settings(
                status_interval=config.status_interval,
                default_service_account=config.default_service_account,
                protected_namespaces=protected,
            ),
            tracer,
        )
        # Renewals on a thread, loop and connection of their own: busy drivers must never
        # make this replica's leases lapse.
        keeper = LeaseKeeper(
            lambda: Store.open(
                config.database_url,
                connect_timeout=config.connect_timeout,
                pool_size=1,
                idle_in_transaction=config.lease_seconds,
            ),
            config.replica,
            lease_seconds=config.lease_seconds,
            renew_seconds=config.renew_seconds,
        )
        supervisor = Supervisor(
            keeper,
            runs,
            kube,
            container,
            metrics,
            namespaces=config.namespaces,
            renew_seconds=config.renew_seconds,
        )
        health.ownership = supervisor.ownership
        schedules = ScheduleController(
            kube,
            ScheduleSettings(allow_seconds=config.allow_seconds_schedules),
            owns=supervisor.owns,
        )
        registry = build_registry(kube, schedules)
        kopf_stop = asyncio.Event()
        supervising = asyncio.create_task(supervisor.run())

        def failed(task: asyncio.Task[None]) -> None:
            if not task.cancelled() and task.exception() is not None:
                log.error("cannot keep the bucket leases: %s", task.exception())
                kopf_stop.set()  # fail fast: a replica without leases drives nothing

        supervising.add_done_callback(failed)
        tasks = [
            supervising,
            asyncio.create_task(_ready_when(kopf_ready, supervisor, watching)),
            asyncio.create_task(_stop_gracefully(supervisor, kopf_ready, stop, kopf_stop)),
        ]
        settings = kopf.OperatorSettings()
        configure_kopf(settings, config)
        _settle_garbage_collector()
        try:
            await kopf.operator(
                registry=registry,
                settings=settings,
                clusterwide=not config.namespaces,
                namespaces=config.namespaces,
                standalone=True,
                ready_flag=kopf_ready,
                stop_flag=kopf_stop,
            )
        finally:
            await supervisor.shutdown()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            tracer.shutdown()
            await health.stop()
            await kube.close()
    if not supervising.cancelled() and (error := supervising.exception()) is not None:
        raise error
