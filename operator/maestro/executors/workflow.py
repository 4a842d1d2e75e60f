"""``workflow`` tasks: a child run of another Workflow, awaited; its outputs are the task's.

:class:`ClusterWorkflows` creates a WorkflowRun owned by the parent run (the operator
runs it like any other, so it shows in ``kubectl get``, is cancelled with the parent and
garbage-collected with it). :class:`LocalWorkflows` runs the child in this process's
engine from the Workflow files given to ``maestro run --local``. Either way the child's
record in the store says when it ended and with which outputs, and carries the parent's
id (``maestro history`` links both ways).

Depth is checked when a child starts, by walking the parent links in the store: a
workflow that calls itself, directly or not, stops at ``MAX_CALL_DEPTH`` with a clear
error (``maestro validate`` finds such cycles earlier when it is given the files).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from typing import Any

from maestro.api.models import API_VERSION, MAX_CALL_DEPTH, WorkflowCall, WorkflowSpec
from maestro.api.phases import RunPhase
from maestro.dag.fanout import label_value
from maestro.engine.driver import Waker, drive
from maestro.engine.engine import Engine, InvalidRun
from maestro.engine.executor import AttemptContext, Result, StartRejected
from maestro.executors.container import pod_name
from maestro.k8s.client import Conflict, Kube, NotFound
from maestro.store import RunRecord, Store

LABEL_PARENT_ID = "maestro.dev/parent-run-id"
LABEL_PARENT_TASK = "maestro.dev/parent-task"


def _call(ctx: AttemptContext) -> WorkflowCall:
    call = ctx.task.workflow
    assert call is not None
    return call


async def _check_depth(store: Store, run: RunRecord) -> None:
    """Refuse a child deeper than MAX_CALL_DEPTH (the loop is bounded by it too)."""
    depth, cur = 0, run
    while cur.parent_id is not None and depth < MAX_CALL_DEPTH:
        cur = await store.get_run(cur.parent_id)
        depth += 1
    if depth >= MAX_CALL_DEPTH:
        raise StartRejected(
            f"run {run.name}: workflow calls nest deeper than {MAX_CALL_DEPTH} runs "
            "(does a workflow call itself?)",
            "InputError",
        )


def _result(child: RunRecord | None) -> Result | None:
    """The task's result once the child ended: its outputs, or why it did not succeed."""
    if child is None or not child.phase.finished:
        return None
    if child.phase is RunPhase.SUCCEEDED:
        return Result.succeeded(dict(child.outputs or {}), f"child run {child.name} succeeded")
    why = f": {child.message}" if child.message else ""
    return Result.failed(f"child run {child.name} {child.phase.value.lower()}{why}", "ChildFailed")


class ClusterWorkflows:
    """Child runs as WorkflowRuns owned by the parent; results read from the store."""

    def __init__(self, kube: Kube, store: Store) -> None:
        """Create children through ``kube``; read their ends from ``store``."""
        self.kube = kube
        self.store = store
        self._uids: dict[tuple[str, str], str] = {}  # (namespace, child name) -> uid

    def handle(self, ctx: AttemptContext) -> str | None:
        """The child WorkflowRun's name (from parent, task and attempt, hashed when long)."""
        return pod_name(ctx.run.name, ctx.task.name, ctx.attempt)

    def manifest(self, ctx: AttemptContext, spec: WorkflowSpec) -> dict[str, Any]:
        """The child WorkflowRun of one attempt."""
        call = _call(ctx)
        run = ctx.run
        child_spec: dict[str, Any] = {"workflowRef": {"name": call.name}, "params": call.params}
        # The child acts as the parent's ServiceAccount: calling a workflow never lends
        # its author more rights than the caller has (docs/security.md).
        if spec.service_account_name:
            child_spec["serviceAccountName"] = spec.service_account_name
        if run.controls.get("noCache"):
            child_spec["noCache"] = True
        return {
            "apiVersion": API_VERSION,
            "kind": "WorkflowRun",
            "metadata": {
                "name": self.handle(ctx),
                "namespace": run.namespace,
                "labels": {
                    LABEL_PARENT_ID: run.id,
                    LABEL_PARENT_TASK: label_value(ctx.task.name),
                },
                "ownerReferences": [
                    {
                        "apiVersion": API_VERSION,
                        "kind": "WorkflowRun",
                        "name": run.name,
                        "uid": run.uid,
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
            },
            "spec": child_spec,
        }

    async def start(self, ctx: AttemptContext) -> None:
        """Create the child WorkflowRun (idempotent: an existing one is adopted when ours)."""
        await _check_depth(self.store, ctx.run)
        spec = WorkflowSpec.model_validate(ctx.run.spec)
        body = self.manifest(ctx, spec)
        name = body["metadata"]["name"]
        try:
            made = await self.kube.create_run(ctx.run.namespace, body)
        except Conflict:
            made = await self.kube.get_run(ctx.run.namespace, name)
            labels = (made.get("metadata") or {}).get("labels") or {}
            if labels.get(LABEL_PARENT_ID) != ctx.run.id:
                raise StartRejected(
                    f"a WorkflowRun named {name} exists and is not a child of this run",
                    "NameTaken",
                ) from None
        self._uids[(ctx.run.namespace, name)] = made["metadata"]["uid"]

    async def poll(self, ctx: AttemptContext) -> Result | None:
        """The child's end, from the store (the operator records it as for any run)."""
        name = ctx.handle or self.handle(ctx)
        assert name is not None
        key = (ctx.run.namespace, name)
        uid = self._uids.get(key)
        if uid is None:
            try:
                uid = (await self.kube.get_run(ctx.run.namespace, name))["metadata"]["uid"]
            except NotFound:
                return Result.failed(f"child run {name} was deleted", "Deleted")
            self._uids[key] = uid
        result = _result(await self.store.find_run(ctx.run.namespace, uid))
        if result is not None:
            self._uids.pop(key, None)
        return result

    async def stop(self, ctx: AttemptContext) -> None:
        """Cancel the child (its finally tasks run; it records its own end)."""
        name = ctx.handle or self.handle(ctx)
        assert name is not None
        with contextlib.suppress(NotFound):  # already gone: nothing runs
            await self.kube.patch_run_spec(ctx.run.namespace, name, {"spec": {"cancel": True}})


class LocalWorkflows:
    """Child runs driven in this process, from the Workflows given on the command line."""

    def __init__(self, workflows: Mapping[str, WorkflowSpec], waker: Waker) -> None:
        """Run children of ``workflows`` (by name); ``bind`` the engine before use."""
        self.workflows = workflows
        self.waker = waker
        self.engine: Engine | None = None
        self._drives: dict[str, asyncio.Task[RunRecord]] = {}

    def bind(self, engine: Engine) -> None:
        """The engine children run in (it holds this executor, so it comes second)."""
        self.engine = engine

    def _engine(self) -> Engine:
        assert self.engine is not None, "LocalWorkflows.bind(engine) was not called"
        return self.engine

    def handle(self, ctx: AttemptContext) -> str | None:
        """The child run's name."""
        return pod_name(ctx.run.name, ctx.task.name, ctx.attempt)

    @staticmethod
    def _uid(ctx: AttemptContext) -> str:
        # Deterministic: a start repeated after a crash finds the child it made.
        return f"{ctx.run.id}/{ctx.task.name}/{ctx.attempt}"

    async def start(self, ctx: AttemptContext) -> None:
        """Record the child run (idempotent on its uid) and drive it in the background."""
        engine = self._engine()
        call = _call(ctx)
        spec = self.workflows.get(call.name)
        if spec is None:
            known = ", ".join(sorted(self.workflows)) or "none"
            raise StartRejected(
                f"workflow {call.name!r} is not among the files given (Workflows: {known})",
                "InputError",
            )
        await _check_depth(engine.store, ctx.run)
        try:
            child = await engine.create_run(
                namespace=ctx.run.namespace,
                name=self.handle(ctx) or call.name,
                spec=spec,
                params=call.params,
                workflow_name=call.name,
                uid=self._uid(ctx),
                controls={"noCache": True} if ctx.run.controls.get("noCache") else None,
                parent_id=ctx.run.id,
            )
        except InvalidRun as err:
            raise StartRejected(f"child workflow {call.name!r}: {err}", "InputError") from None
        self._drive(child, ctx.run.id)

    def _drive(self, child: RunRecord, parent_id: str) -> None:
        if child.phase.finished or child.id in self._drives:
            return
        task = asyncio.create_task(drive(self._engine(), child.id, self.waker))
        task.add_done_callback(lambda _: self.waker(parent_id))
        self._drives[child.id] = task

    async def poll(self, ctx: AttemptContext) -> Result | None:
        """The child's end; a child left by a crashed process is driven again."""
        store = self._engine().store
        child = await store.find_run(ctx.run.namespace, self._uid(ctx))
        if child is None:
            return None
        self._drive(child, ctx.run.id)  # no-op while driven or once ended
        result = _result(child)
        if result is not None:
            self._drives.pop(child.id, None)
        return result

    async def stop(self, ctx: AttemptContext) -> None:
        """Cancel the child (its finally tasks run, then it ends Cancelled)."""
        store = self._engine().store
        child = await store.find_run(ctx.run.namespace, self._uid(ctx))
        if child is not None and not child.phase.finished:
            await store.update_controls(child.id, cancel=True)
            self.waker(child.id)
