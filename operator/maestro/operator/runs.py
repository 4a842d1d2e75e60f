"""WorkflowRun lifecycle: one driving loop per run, fed by pod events and timers.

The replica's supervisor (operator/supervisor.py) starts :meth:`RunController.daemon`
for every WorkflowRun in the buckets it holds (again after a restart or a handover),
so every unfinished run is picked up from the store and the live pods. The loop owns
nothing it could lose: it starts from the store, and a write refused because the
bucket moved (:class:`~maestro.store.Fenced`) ends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import ValidationError

from maestro.api.models import WorkflowRunSpec, WorkflowSpec
from maestro.api.parse import describe
from maestro.api.phases import RunPhase
from maestro.dag.validate import resolve_params, validate
from maestro.engine.driver import Waker
from maestro.engine.engine import Engine, InvalidRun
from maestro.k8s.client import (
    RETRY_OF,
    RUNS,
    APIError,
    Kube,
    NamespaceTerminating,
    NotFound,
    PermanentAPIError,
)
from maestro.operator.logs import bind_run, event_line
from maestro.operator.metrics import Metrics
from maestro.operator.status import not_started_status, observe_generation, run_status
from maestro.operator.tracing import RunTracer
from maestro.operator.workspaces import WorkspaceError, ensure_claims
from maestro.store import EventRecord, Fenced, RunNotFound, RunRecord, StoreError

log = logging.getLogger("maestro.operator")

# How long to wait before looking again for a Workflow that is missing or invalid.
WORKFLOW_RETRY_SECONDS = 10.0
# Even with no event, a run is looked at this often (a missed watch event heals).
RESYNC_SECONDS = 30.0
# A store outage is retried this often; readiness reports it meanwhile.
STORE_RETRY_SECONDS = 2.0
# Any other trouble in a pass (the API server down, a bug) is retried after a delay that
# doubles from the first to the last, so a run resumes seconds after the API is back
# (a driver that gave up would wait for its bucket to move before running again).
RETRY_FIRST_SECONDS = 0.5
RETRY_MAX_SECONDS = 5.0
# Specs larger than this are not copied into status (etcd objects are capped at 1.5 MiB).
MAX_SPEC_IN_STATUS = 256 * 1024


@dataclass
class Settings:
    """Operator tunables."""

    status_interval: float = 1.0
    # What a run acts as when neither it nor its Workflow names a ServiceAccount.
    default_service_account: str = "default"
    # Namespaces runs may not use (the operator's own, with its database Secret).
    protected_namespaces: frozenset[str] = frozenset()


def controls_of_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The person-controlled fields of a WorkflowRun spec, as the store keeps them."""
    return {
        "suspend": bool(spec.get("suspend", False)),
        "cancel": bool(spec.get("cancel", False)),
        "approvals": sorted(set(spec.get("approvals") or [])),
        "noCache": bool(spec.get("noCache", False)),
    }


def _created(meta: Mapping[str, Any]) -> datetime | None:
    """The resource's creationTimestamp: how long a not-started run has waited."""
    stamp = meta.get("creationTimestamp")
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")) if stamp else None


def editor_of(meta: Mapping[str, Any], field: str) -> str:
    """Who last set ``spec.<field>``: the newest field manager that owns it.

    The CLI patches as the caller's user (SelfSubjectReview); kubectl, Argo CD and Flux
    use their own manager names (``kubectl-patch``, ``argocd-controller``, ...).
    """
    owners = [
        (str(m.get("time") or ""), str(m.get("manager") or ""))
        for m in meta.get("managedFields") or []
        if f"f:{field}" in ((m.get("fieldsV1") or {}).get("f:spec") or {})
    ]
    return max(owners)[1] if owners else "unknown"


class _Pending(Exception):
    """The run cannot start yet (or at all); carries the status to show."""

    def __init__(self, phase: RunPhase, reason: str, message: str) -> None:
        super().__init__(message)
        self.phase, self.reason, self.message = phase, reason, message


class _StatusWriter:
    """At most one status patch per interval per run; the final state always flushes."""

    def __init__(self, kube: Kube, metrics: Metrics, namespace: str, name: str, interval: float):
        self.kube, self.metrics = kube, metrics
        self.namespace, self.name = namespace, name
        self.interval = interval
        self.written: dict[str, Any] = {}
        self.pending: dict[str, Any] | None = None
        self.last_at = 0.0

    @staticmethod
    def _comparable(status: Mapping[str, Any]) -> dict[str, Any]:
        # Duration ticks every second: on its own it is no reason to write.
        return {k: v for k, v in status.items() if k != "duration"}

    def due_in(self) -> float | None:
        """Seconds until a held-back status may be written, None when nothing waits."""
        if self.pending is None:
            return None
        return max(0.0, self.last_at + self.interval - time.monotonic())

    async def offer(self, status: dict[str, Any], *, final: bool = False) -> None:
        """Write now when allowed, otherwise hold it for :meth:`flush`."""
        if self._comparable(status) == self._comparable(self.written):
            self.pending = None
            return
        self.pending = status
        if final or time.monotonic() - self.last_at >= self.interval:
            await self.flush()

    async def flush(self) -> None:
        """Write the held-back status, if any."""
        if self.pending is None:
            return
        status, self.pending = self.pending, None
        await self.kube.patch_status(RUNS, self.namespace, self.name, status)
        self.metrics.status_patches.inc()
        self.written = status
        self.last_at = time.monotonic()


_RUN_EVENTS = {
    (None, "Running"): ("RunStarted", False),
    ("Pending", "Running"): ("RunStarted", False),
    ("Suspended", "Running"): ("RunResumed", False),
    (None, "Suspended"): ("RunSuspended", False),
    (None, "Succeeded"): ("RunSucceeded", False),
    (None, "Failed"): ("RunFailed", True),
    (None, "Cancelled"): ("RunCancelled", True),
}


def _k8s_event(e: EventRecord) -> tuple[str, str, bool] | None:
    """The Kubernetes Event (reason, message, warning) for a store event, if any."""
    if e.kind == "RunPhase":
        found = _RUN_EVENTS.get((e.from_phase, e.to_phase or "")) or _RUN_EVENTS.get(
            (None, e.to_phase or "")
        )
        if found is None or (found[0] == "RunStarted" and e.from_phase not in (None, "Pending")):
            return None
        return found[0], e.message or e.to_phase or "", found[1]
    if e.kind == "TaskPhase" and e.to_phase == "Failed":
        reason = "TaskTimedOut" if e.reason == "TimedOut" else "TaskFailed"
        return reason, f"{e.task} attempt {e.attempt}: {e.message or 'failed'}", True
    if e.kind == "Approved":
        by = f"{e.task} approved by {e.actor or 'unknown'}"
        return "TaskApproved", by + (f": {e.message}" if e.message else ""), False
    return None


def retry_delay(failures: int) -> float:
    """Seconds to wait after ``failures`` passes in a row went wrong (1-based)."""
    return float(min(RETRY_MAX_SECONDS, RETRY_FIRST_SECONDS * 2 ** max(0, failures - 1)))


def event_name(run: RunRecord, event_id: int) -> str:
    """The Kubernetes Event's name for one store event: posting it twice is a 409."""
    prefix = run.name[:200].rstrip(".-")
    return f"{prefix}.{run.id[:8]}.{event_id}"


def _namespace_gone(namespace: str) -> str:
    return f"cancelled: namespace {namespace} is being deleted"


class RunController:
    """Everything the operator does with WorkflowRuns."""

    def __init__(
        self,
        engine: Engine,
        kube: Kube,
        waker: Waker,
        metrics: Metrics,
        settings: Settings,
        tracer: RunTracer,
    ) -> None:
        """Share one engine, API client and waker between all runs."""
        self.engine = engine
        self.kube = kube
        self.waker = waker
        self.metrics = metrics
        self.settings = settings
        self.tracer = tracer
        self._ids: dict[str, str] = {}  # WorkflowRun uid -> store run id
        self._controls: dict[str, dict[str, Any]] = {}  # run id -> controls last written
        self._generations: dict[str, int] = {}  # run id -> latest metadata.generation seen
        self.active: set[str] = set()  # run ids whose loop runs in this process
        metrics.queue_depth.set_function(lambda: float(waker.woken(self.active)))
        self._finished: set[str] = set()  # run ids whose daemon wrote the final status
        self._observed: dict[str, int] = {}  # run id -> generation the status last showed

    # Start ----------------------------------------------------------------------------

    async def _resolve(
        self, namespace: str, spec: WorkflowRunSpec
    ) -> tuple[str | None, WorkflowSpec]:
        if spec.workflow_spec is not None:
            return None, spec.workflow_spec
        assert spec.workflow_ref is not None
        name = spec.workflow_ref.name
        try:
            obj = await self.kube.get_workflow(namespace, name)
        except NotFound:
            raise _Pending(
                RunPhase.PENDING,
                "WorkflowNotFound",
                f"spec.workflowRef.name: Workflow {name!r} does not exist in namespace "
                f"{namespace!r}; the run starts when it appears",
            ) from None
        try:
            wf_spec = WorkflowSpec.model_validate(obj.get("spec") or {})
        except ValidationError as err:
            raise _Pending(
                RunPhase.PENDING,
                "InvalidWorkflow",
                f"Workflow {name!r} is invalid: " + "; ".join(describe(err)),
            ) from None
        problems = validate(wf_spec)
        if problems:
            raise _Pending(
                RunPhase.PENDING,
                "InvalidWorkflow",
                f"Workflow {name!r} is invalid: " + "; ".join(map(str, problems)),
            )
        return name, wf_spec

    async def ensure_run(self, body: Mapping[str, Any]) -> RunRecord:
        """The store's run for this WorkflowRun, created (with its snapshot) on first sight."""
        meta = body["metadata"]
        namespace, name, uid = meta["namespace"], meta["name"], meta["uid"]
        existing = await self.engine.store.find_run(namespace, uid)
        if existing is not None:
            source_id = (meta.get("annotations") or {}).get(RETRY_OF)
            if source_id and existing.phase is RunPhase.PENDING:
                await self.engine.seed_from(existing.id, source_id)  # a crash cut it short
            self._ids[uid] = existing.id
            self._controls[existing.id] = dict(existing.controls)
            return existing
        if namespace in self.settings.protected_namespaces:
            raise _Pending(
                RunPhase.FAILED,
                "NamespaceForbidden",
                f"metadata.namespace: {namespace!r} is the operator's own namespace, where runs "
                "are not allowed (the operator's flag --allow-runs-in-own-namespace lifts it)",
            )
        try:
            spec = WorkflowRunSpec.model_validate(body.get("spec") or {})
        except ValidationError as err:
            raise _Pending(RunPhase.FAILED, "InvalidSpec", "; ".join(describe(err))) from None
        source_id = (meta.get("annotations") or {}).get(RETRY_OF)
        if source_id:
            return await self._create_retry(body, spec, source_id)
        wf_name, wf_spec = await self._resolve(namespace, spec)
        wf_spec = self._with_service_account(wf_spec, spec)
        problems = [f"spec.workflowSpec: {p}" for p in validate(wf_spec)] if wf_name is None else []
        problems += resolve_params(wf_spec, spec.params)[1]
        if problems:
            raise _Pending(RunPhase.FAILED, "InvalidSpec", "; ".join(problems))
        await self._workspaces(namespace, name, uid, wf_spec)
        try:
            run = await self.engine.create_run(
                namespace=namespace,
                name=name,
                spec=wf_spec,
                params=spec.params,
                workflow_name=wf_name,
                uid=uid,
                generation=int(meta.get("generation") or 1),
                controls=controls_of_spec(body.get("spec") or {}),
                parent_id=await self._parent_of(meta),
            )
        except InvalidRun as err:
            raise _Pending(RunPhase.FAILED, "InvalidSpec", "; ".join(err.problems)) from None
        self._ids[uid] = run.id
        self._controls[run.id] = dict(run.controls)
        return run

    async def _parent_of(self, meta: Mapping[str, Any]) -> str | None:
        """The store id of the run whose workflow task made this one (its controller
        owner), so history links them and the parent is woken when this one ends."""
        for ref in meta.get("ownerReferences") or []:
            if ref.get("kind") == "WorkflowRun" and ref.get("controller"):
                parent = await self.engine.store.find_run(meta["namespace"], str(ref.get("uid")))
                return parent.id if parent is not None else None
        return None

    async def _workspaces(self, namespace: str, name: str, uid: str, spec: WorkflowSpec) -> None:
        """The run's workspace claims, before any task can mount them."""
        try:
            await ensure_claims(self.kube, namespace, name, uid, spec)
        except WorkspaceError as err:
            raise _Pending(RunPhase.FAILED, "WorkspaceError", str(err)) from None

    async def _create_retry(
        self, body: Mapping[str, Any], spec: WorkflowRunSpec, source_id: str
    ) -> RunRecord:
        """A retry runs the old run's snapshot again, reusing what succeeded."""
        meta = body["metadata"]
        try:
            source = await self.engine.store.get_run(source_id)
        except RunNotFound:
            raise _Pending(
                RunPhase.FAILED,
                "RetrySourceNotFound",
                f"metadata.annotations[{RETRY_OF}]: run {source_id} is not in the store",
            ) from None
        wf_spec = self._with_service_account(WorkflowSpec.model_validate(source.spec), spec)
        await self._workspaces(meta["namespace"], meta["name"], meta["uid"], wf_spec)
        run = await self.engine.create_run(
            namespace=meta["namespace"],
            name=meta["name"],
            spec=wf_spec,
            params={**source.params, **spec.params},
            workflow_name=source.workflow_name,
            uid=meta["uid"],
            generation=int(meta.get("generation") or 1),
            controls=controls_of_spec(body.get("spec") or {}),
        )
        if run.phase is RunPhase.PENDING:
            await self.engine.seed_from(run.id, source_id)
        self._ids[meta["uid"]] = run.id
        self._controls[run.id] = dict(run.controls)
        return run

    def _with_service_account(self, wf_spec: WorkflowSpec, spec: WorkflowRunSpec) -> WorkflowSpec:
        """The snapshot names the run's ServiceAccount: the run's, the Workflow's or the default.

        Resolved once, at creation: executors read it from the snapshot, so editing the
        Workflow later never changes what a started run acts as.
        """
        account = (
            spec.service_account_name
            or wf_spec.service_account_name
            or self.settings.default_service_account
        )
        return wf_spec.model_copy(update={"service_account_name": account})

    # Spec changes ----------------------------------------------------------------------

    async def sync_controls(self, body: Mapping[str, Any]) -> None:
        """Copy suspend/cancel/approvals from the spec into the store, then wake the run."""
        meta = body["metadata"]
        run_id = self._ids.get(meta["uid"])
        generation = int(meta.get("generation") or 1)
        status = body.get("status") or {}
        if run_id is None:
            # Not started yet: the daemon reads the live spec when it creates the run.
            # A run refused at the start has no daemon left to observe an edit.
            if status.get("phase") == RunPhase.FAILED.value:
                await self._observe(meta, status, generation)
            return
        if run_id in self._finished:
            # Nothing in a finished run changes, but its status must observe the edit.
            if self._observed.get(run_id, 0) < generation:
                await self._observe(meta, status, generation, run_id)
            return
        spec = body.get("spec") or {}
        wanted = controls_of_spec(spec)
        known = self._controls.get(run_id) or {}
        if {k: known.get(k) for k in wanted} == wanted:
            if self._generations.get(run_id) != generation:
                # Nothing to act on, but status must observe the new generation (kstatus).
                self._generations[run_id] = generation
                self.waker(run_id)
            return  # most events are our own status patches: nothing to do
        store = self.engine.store
        notes = spec.get("approvalNotes") or {}
        new = [t for t in wanted["approvals"] if t not in (known.get("approvals") or ())]
        if new:
            # Only a gate's approval is recorded (and announced): other names do nothing.
            workflow, _ = self.engine.spec_of(await store.get_run(run_id))
            gates = {t.name for t in workflow.all_tasks() if t.kind == "approval"}
            new = [t for t in new if t in gates]
        for task in new:
            note = notes.get(task) or {}
            by = note.get("by") or editor_of(meta, "approvals")
            await self.engine.approve(run_id, task, actor=by, comment=note.get("comment"))
        changes = dict(wanted)
        if wanted["cancel"] and not known.get("cancel"):
            changes["cancelledBy"] = editor_of(meta, "cancel")
        run = await self.engine.update_controls(run_id, generation=generation, **changes)
        self._controls[run_id] = dict(run.controls)
        self._generations[run_id] = generation
        self.waker(run_id)

    async def _observe(
        self,
        meta: Mapping[str, Any],
        status: Mapping[str, Any],
        generation: int,
        run_id: str | None = None,
    ) -> None:
        """Patch a finished run's status to show it has seen ``generation``."""
        if status.get("observedGeneration") == generation and run_id is None:
            return
        if run_id is not None:
            self._observed[run_id] = generation
        with contextlib.suppress(NotFound):
            await self.kube.patch_status(
                RUNS, meta["namespace"], meta["name"], observe_generation(status, generation)
            )

    def forget(self, uid: str) -> None:
        """Drop what this process knows of a run it stops driving (its bucket moved)."""
        run_id = self._ids.pop(uid, None)
        self.metrics.not_stored(uid, None)
        if run_id is None:
            return
        for known in (self._controls, self._generations, self._observed):
            known.pop(run_id, None)
        self._finished.discard(run_id)
        self.engine.forget(run_id)

    # Deletion --------------------------------------------------------------------------

    async def on_delete(self, body: Mapping[str, Any]) -> None:
        """Stop the run's pods and record the cancellation before the object goes."""
        meta = body["metadata"]
        run = await self.engine.store.find_run(meta["namespace"], meta["uid"])
        if run is not None and not run.phase.finished:
            try:
                gone = await self.kube.namespace_terminating(meta["namespace"])
            except APIError:
                gone = False  # the API is down: the cancel itself matters more than its wording
            why = _namespace_gone(meta["namespace"]) if gone else "the WorkflowRun was deleted"
            await self.engine.abort(run.id, why)
            log.info("run %s/%s cancelled: resource deleted", meta["namespace"], meta["name"])
        if run is not None:
            self._controls.pop(run.id, None)
            self._generations.pop(run.id, None)
            self._finished.discard(run.id)
            self._observed.pop(run.id, None)
        self._ids.pop(meta["uid"], None)
        self.metrics.not_stored(meta["uid"], None)

    # The loop --------------------------------------------------------------------------

    async def daemon(self, body: Mapping[str, Any], stopped: Any) -> None:
        """Drive one WorkflowRun until it finishes (and its TTL, if any, expires)."""
        meta = body["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        bind_run(namespace, name)  # this daemon's task logs about this run only
        writer = _StatusWriter(
            self.kube, self.metrics, namespace, name, self.settings.status_interval
        )
        previous = list((body.get("status") or {}).get("conditions") or [])
        writer.written = dict(body.get("status") or {})
        run: RunRecord | None = None
        failures = 0
        while run is None and not stopped:
            try:
                run = await self.ensure_run(body)
            except _Pending as why:
                failures = 0
                if not why.phase.finished and controls_of_spec(body.get("spec") or {})["cancel"]:
                    # Nothing started, so nothing to stop: the cancel is the end.
                    why = _Pending(RunPhase.CANCELLED, "RunCancelled", f"cancelled: {why.message}")
                now = datetime.now(UTC)
                status = not_started_status(
                    # body[...] each time: the supervisor swaps the body's content on every
                    # change, a `meta` taken earlier stays at the daemon's first sight.
                    why.phase,
                    why.reason,
                    why.message,
                    body["metadata"].get("generation"),
                    previous,
                    now,
                )
                if why.phase.finished and writer.written.get("phase") != why.phase.value:
                    self.metrics.rejected()
                try:
                    await writer.offer(status, final=True)
                except NotFound:
                    return
                except APIError as err:
                    log.warning("run %s/%s: status not written: %s", namespace, name, err)
                self.metrics.not_stored(meta["uid"], why.phase, _created(meta))
                if why.phase.finished:
                    return
                await stopped.wait(WORKFLOW_RETRY_SECONDS)
            except Fenced:
                raise  # the bucket moved: its new holder drives the run
            except StoreError as err:
                log.warning("run %s/%s waits for the store: %s", namespace, name, err)
                await stopped.wait(STORE_RETRY_SECONDS)
            except Exception as err:  # a pass's trouble never ends the driver
                failures += 1
                self._log_trouble(namespace, name, err)
                await stopped.wait(retry_delay(failures))
        if run is None:
            return
        bind_run(namespace, name, run.id)
        self.metrics.not_stored(meta["uid"], None)
        self.active.add(run.id)
        try:
            await self._drive(run, body, writer, previous, stopped)
        finally:
            self.active.discard(run.id)
            # Held only while this daemon drives it: a daemon started again (a bucket
            # handed back, an operator restart) loads it from the store.
            self.engine.forget(run.id)

    @staticmethod
    def _log_trouble(namespace: str, name: str, err: Exception) -> None:
        if isinstance(err, APIError):
            log.warning("run %s/%s: Kubernetes API: %s; retrying", namespace, name, err)
        else:
            log.exception("run %s/%s: unexpected error; retrying", namespace, name)

    async def _drive(
        self,
        run: RunRecord,
        body: Mapping[str, Any],
        writer: _StatusWriter,
        previous: list[Any],
        stopped: Any,
    ) -> None:
        """Pass after pass until the run finishes; no error ends the loop early.

        A store outage is waited out; an API error or a bug is retried with a short
        capped backoff; a namespace being deleted cancels the run.
        """
        failures = 0
        synced = False
        include_spec = len(str(run.spec)) <= MAX_SPEC_IN_STATUS
        trace_id = self.tracer.trace_id(run.id)
        while not stopped:
            try:
                if not synced:
                    if trace_id is not None and run.trace_id != trace_id:
                        await self.engine.store.set_trace_id(run.id, trace_id)
                    await self.sync_controls(body)
                    synced = True
                timeout = await self._pass(
                    run.id, body, writer, previous, stopped, include_spec, trace_id
                )
                failures = 0
            except Fenced:
                raise  # the bucket moved: its new holder drives the run
            except StoreError as err:
                log.warning(
                    "run %s/%s: store unavailable, retrying: %s", run.namespace, run.name, err
                )
                await stopped.wait(STORE_RETRY_SECONDS)
                continue
            except NamespaceTerminating:
                await self._namespace_deleted(run, stopped)
                continue  # the next pass writes the Cancelled status (or finds it gone)
            except Exception as err:  # a pass's trouble never ends the driver
                failures += 1
                self._log_trouble(run.namespace, run.name, err)
                await stopped.wait(retry_delay(failures))
                continue
            if timeout is None:
                return
            if timeout > 0:
                await self._wait(run.id, timeout, stopped)
            if writer.due_in() == 0.0:
                with contextlib.suppress(NotFound):
                    await writer.flush()

    async def _namespace_deleted(self, run: RunRecord, stopped: Any) -> None:
        """Record the run Cancelled; on trouble wait a little (the next pass tries again)."""
        try:
            await self.engine.abort(run.id, _namespace_gone(run.namespace))
        except Exception as err:  # the loop must go on: the next pass raises it again
            self._log_trouble(run.namespace, run.name, err)
            await stopped.wait(RETRY_MAX_SECONDS)
            return
        log.info("run %s/%s cancelled: its namespace is being deleted", run.namespace, run.name)

    async def _pass(
        self,
        run_id: str,
        body: Mapping[str, Any],
        writer: _StatusWriter,
        previous: list[Any],
        stopped: Any,
        include_spec: bool,
        trace_id: str | None,
    ) -> float | None:
        """One reconcile, its Events and status; how long to wait, None when done."""
        meta = body["metadata"]
        started = time.perf_counter()
        step = await self.engine.reconcile(run_id)
        self.metrics.reconcile_seconds.observe(time.perf_counter() - started)
        run, latest = step.run, step.latest
        spec, _ = self.engine.spec_of(run)
        await self._post_events(run, body, latest, spec)
        now = datetime.now(UTC)
        generation = self._generations.get(run.id, meta.get("generation"))
        status = run_status(
            run,
            spec,
            latest,
            live_message=step.decision.message,
            generation=generation,
            previous_conditions=writer.written.get("conditions") or previous,
            now=now,
            include_spec=include_spec,
        )
        if trace_id is not None:
            status["traceId"] = trace_id
        try:
            await writer.offer(status, final=run.phase.finished)
        except NotFound:
            return None  # the WorkflowRun is gone; the delete handler records it
        if run.phase.finished:
            self._finished.add(run.id)
            if run.parent_id is not None:
                self.waker(run.parent_id)  # its workflow task waits on this run
            self._observed[run.id] = int(generation or 1)
            live = int(body["metadata"].get("generation") or 1)
            if live > self._observed[run.id]:
                # An edit that came while the final status was being written.
                await self._observe(meta, status, live, run.id)
            self.engine.forget(run.id)
            await self._expire(run, body, stopped)
            return None
        if step.progressed:
            return 0.0
        timeout = RESYNC_SECONDS
        if step.decision.wake_at is not None:
            timeout = min(timeout, max(0.0, (step.decision.wake_at - now).total_seconds()))
        due = writer.due_in()
        if due is not None:
            timeout = min(timeout, due)
        return timeout

    async def _post_events(
        self,
        run: RunRecord,
        body: Mapping[str, Any],
        latest: Mapping[str, Any],
        spec: WorkflowSpec,
    ) -> None:
        """Empty the run's outbox: each store event's Kubernetes Event, exactly once.

        An event is marked posted only after its Event exists; the Event's name is
        derived from the store event, so a crash between the two posts nothing twice.
        """
        done: list[int] = []
        try:
            for e in await self.engine.pending_events(run.id):
                self.metrics.observe_event(e, run, latest, spec)
                self.tracer.observe_event(e, run, latest, spec)
                text, extra = event_line(e)
                log.info(text, extra=extra)
                try:
                    await self._record_event(run, body, e)
                except PermanentAPIError as err:  # refused for good (RBAC, a deleted namespace)
                    log.warning("run %s/%s: event not posted: %s", run.namespace, run.name, err)
                done.append(e.id)
        finally:
            # Also when a post failed for now: what was posted leaves the outbox, the rest
            # stays for the pass that is retried shortly.
            await self.engine.mark_posted(run.id, done)

    async def _wait(self, run_id: str, seconds: float, stopped: Any) -> None:
        """Until woken, ``seconds`` pass, or the supervisor stops the driver."""
        woken = asyncio.ensure_future(self.waker.wait(run_id, seconds))
        stop = asyncio.ensure_future(stopped.wait())
        try:
            await asyncio.wait({woken, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for fut in (woken, stop):
                fut.cancel()

    async def _record_event(self, run: RunRecord, body: Mapping[str, Any], e: EventRecord) -> None:
        found = _k8s_event(e)
        if found is not None:
            reason, message, warning = found
            await self.kube.emit_event(
                {
                    "apiVersion": "maestro.dev/v1alpha1",
                    "kind": "WorkflowRun",
                    "metadata": body["metadata"],
                },
                reason=reason,
                message=message,
                warning=warning,
                name=event_name(run, e.id),
            )

    async def _expire(self, run: RunRecord, body: Mapping[str, Any], stopped: Any) -> None:
        """``ttlSecondsAfterFinished``: delete the resource; the store keeps the history."""
        ttl = (body.get("spec") or {}).get("ttlSecondsAfterFinished")
        if ttl is None or run.finished_at is None:
            return
        due = run.finished_at + timedelta(seconds=int(ttl))
        wait = (due - datetime.now(UTC)).total_seconds()
        if wait > 0:
            await stopped.wait(wait)
            if stopped:
                return
        meta = body["metadata"]
        await self.kube.delete_run(meta["namespace"], meta["name"])
        log.info("run %s/%s deleted after its TTL", meta["namespace"], meta["name"])
