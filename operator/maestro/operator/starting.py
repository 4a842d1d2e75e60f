"""Starting a WorkflowRun: from its spec (and Workflow) to the store's run, retried
until it happens once.

A run that cannot start yet (its Workflow missing or invalid) shows Pending and is
looked at again; one that never can (an invalid spec, a forbidden namespace) shows
Failed and its driver ends. A retry run (the ``RETRY_OF`` annotation) starts from the
old run's snapshot. Nothing here drives a started run: :mod:`.driving` does.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from maestro.api.models import WorkflowRunSpec, WorkflowSpec
from maestro.api.parse import describe
from maestro.api.phases import RunPhase
from maestro.dag.validate import resolve_params, validate
from maestro.engine.engine import Engine, InvalidRun
from maestro.k8s.client import RETRY_OF, APIError, Kube, NotFound
from maestro.operator.controls import controls_of_spec
from maestro.operator.known import Known
from maestro.operator.logs import log_trouble
from maestro.operator.metrics import Metrics
from maestro.operator.publishing import StatusWriter
from maestro.operator.settings import STORE_RETRY_SECONDS, Settings, retry_delay
from maestro.operator.status import not_started_status
from maestro.operator.workspaces import WorkspaceError, ensure_claims
from maestro.store import Fenced, RunNotFound, RunRecord, StoreError

log = logging.getLogger("maestro.operator")

# How long to wait before looking again for a Workflow that is missing or invalid.
WORKFLOW_RETRY_SECONDS = 10.0


class Pending(Exception):
    """The run cannot start yet (or at all); carries the status to show."""

    def __init__(self, phase: RunPhase, reason: str, message: str) -> None:
        """``phase`` is Pending (looked at again later) or a finished one (the end)."""
        super().__init__(message)
        self.phase, self.reason, self.message = phase, reason, message


def _created(meta: Mapping[str, Any]) -> datetime | None:
    """The resource's creationTimestamp: how long a not-started run has waited."""
    stamp = meta.get("creationTimestamp")
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")) if stamp else None


class Starter:
    """Creates the store's run for a WorkflowRun, once."""

    def __init__(
        self,
        engine: Engine,
        kube: Kube,
        metrics: Metrics,
        settings: Settings,
        known: Known,
        admitting: asyncio.Semaphore,
    ) -> None:
        """Shares the controller's memory of runs (a started run is recorded in it) and
        its admission slots (each try to start a run holds one; waits between tries none)."""
        self.engine, self.kube, self.metrics = engine, kube, metrics
        self.settings, self.known = settings, known
        self.admitting = admitting

    async def start(
        self, body: Mapping[str, Any], writer: StatusWriter, previous: list[Any], stopped: Any
    ) -> RunRecord | None:
        """The store's run, once it starts; None when it never will or the driver stops.

        Until then the status shows why it waits (or why it failed) and the start is
        tried again: later for a missing Workflow, soon for a store or API outage.
        ``previous`` are the conditions the status showed when the driver started.
        """
        meta = body["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        failures = 0
        while not stopped:
            try:
                async with self.admitting:
                    return await self.ensure_run(body)
            except Pending as why:
                failures = 0
                if not why.phase.finished and controls_of_spec(body.get("spec") or {})["cancel"]:
                    # Nothing started, so nothing to stop: the cancel is the end.
                    why = Pending(RunPhase.CANCELLED, "RunCancelled", f"cancelled: {why.message}")
                status = not_started_status(
                    # body[...] each time: the supervisor swaps the body's content on every
                    # change, a `meta` taken earlier stays at the daemon's first sight.
                    why.phase,
                    why.reason,
                    why.message,
                    body["metadata"].get("generation"),
                    previous,
                    self.settings.clock.now(),
                )
                if why.phase.finished and writer.written.get("phase") != why.phase.value:
                    self.metrics.rejected()
                try:
                    await writer.offer(status.copy, final=True)
                except NotFound:
                    return None
                except APIError as err:
                    log.warning("run %s/%s: status not written: %s", namespace, name, err)
                self.metrics.not_stored(meta["uid"], why.phase, _created(meta))
                if why.phase.finished:
                    return None
                await stopped.wait(WORKFLOW_RETRY_SECONDS)
            except Fenced:
                raise  # the bucket moved: its new holder drives the run
            except StoreError as err:
                log.warning("run %s/%s waits for the store: %s", namespace, name, err)
                await stopped.wait(STORE_RETRY_SECONDS)
            except Exception as err:  # a pass's trouble never ends the driver
                failures += 1
                log_trouble(namespace, name, err)
                await stopped.wait(retry_delay(failures))
        return None

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
            raise Pending(
                RunPhase.PENDING,
                "WorkflowNotFound",
                f"spec.workflowRef.name: Workflow {name!r} does not exist in namespace "
                f"{namespace!r}; the run starts when it appears",
            ) from None
        try:
            wf_spec = WorkflowSpec.model_validate(obj.get("spec") or {})
        except ValidationError as err:
            raise Pending(
                RunPhase.PENDING,
                "InvalidWorkflow",
                f"Workflow {name!r} is invalid: " + "; ".join(describe(err)),
            ) from None
        problems = validate(wf_spec)
        if problems:
            raise Pending(
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
            self.known.started(uid, existing)
            return existing
        if namespace in self.settings.protected_namespaces:
            raise Pending(
                RunPhase.FAILED,
                "NamespaceForbidden",
                f"metadata.namespace: {namespace!r} is the operator's own namespace, where runs "
                "are not allowed (the operator's flag --allow-runs-in-own-namespace lifts it)",
            )
        try:
            spec = WorkflowRunSpec.model_validate(body.get("spec") or {})
        except ValidationError as err:
            raise Pending(RunPhase.FAILED, "InvalidSpec", "; ".join(describe(err))) from None
        source_id = (meta.get("annotations") or {}).get(RETRY_OF)
        if source_id:
            return await self._create_retry(body, spec, source_id)
        wf_name, wf_spec = await self._resolve(namespace, spec)
        wf_spec = self._with_service_account(wf_spec, spec)
        problems = [f"spec.workflowSpec: {p}" for p in validate(wf_spec)] if wf_name is None else []
        problems += resolve_params(wf_spec, spec.params)[1]
        if problems:
            raise Pending(RunPhase.FAILED, "InvalidSpec", "; ".join(problems))
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
            raise Pending(RunPhase.FAILED, "InvalidSpec", "; ".join(err.problems)) from None
        self.known.started(uid, run)
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
            raise Pending(RunPhase.FAILED, "WorkspaceError", str(err)) from None

    async def _create_retry(
        self, body: Mapping[str, Any], spec: WorkflowRunSpec, source_id: str
    ) -> RunRecord:
        """A retry runs the old run's snapshot again, reusing what succeeded."""
        meta = body["metadata"]
        try:
            source = await self.engine.store.get_run(source_id)
        except RunNotFound:
            raise Pending(
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
        self.known.started(meta["uid"], run)
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
