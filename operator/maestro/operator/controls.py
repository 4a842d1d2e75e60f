"""A person's edits of a running WorkflowRun: suspend, cancel, approvals.

The spec's person-controlled fields are copied into the store (with who set them,
from ``managedFields``), then the run's driver is woken to act on them. Most events a
run's watch sees are the operator's own status patches: they change no control and
write nothing. A finished run changes no more, but its status still observes each new
generation, as kstatus expects.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

from maestro.api.phases import RunPhase
from maestro.engine.driver import Waker
from maestro.engine.engine import Engine
from maestro.k8s.client import RUNS, Kube, NotFound
from maestro.operator.known import Known
from maestro.operator.status import observe_generation


def controls_of_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The person-controlled fields of a WorkflowRun spec, as the store keeps them."""
    return {
        "suspend": bool(spec.get("suspend", False)),
        "cancel": bool(spec.get("cancel", False)),
        "approvals": sorted(set(spec.get("approvals") or [])),
        "noCache": bool(spec.get("noCache", False)),
    }


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


class Controls:
    """Copies spec edits into the store and makes statuses observe them."""

    def __init__(self, engine: Engine, kube: Kube, waker: Waker, known: Known) -> None:
        """Shares the controller's memory of runs (:class:`~maestro.operator.known.Known`)."""
        self.engine, self.kube, self.waker, self.known = engine, kube, waker, known

    async def sync(self, body: Mapping[str, Any]) -> None:
        """Copy suspend/cancel/approvals from the spec into the store, then wake the run."""
        meta = body["metadata"]
        run_id = self.known.ids.get(meta["uid"])
        generation = int(meta.get("generation") or 1)
        status = body.get("status") or {}
        if run_id is None:
            # Not started yet: the daemon reads the live spec when it creates the run.
            # A run refused at the start has no daemon left to observe an edit.
            if status.get("phase") == RunPhase.FAILED.value:
                await self.observe(meta, status, generation)
            return
        if run_id in self.known.finished:
            # Nothing in a finished run changes, but its status must observe the edit.
            if self.known.observed.get(run_id, 0) < generation:
                await self.observe(meta, status, generation, run_id)
            return
        spec = body.get("spec") or {}
        wanted = controls_of_spec(spec)
        known = self.known.controls.get(run_id) or {}
        if {k: known.get(k) for k in wanted} == wanted:
            if self.known.generations.get(run_id) != generation:
                # Nothing to act on, but status must observe the new generation (kstatus).
                self.known.generations[run_id] = generation
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
        self.known.controls[run_id] = dict(run.controls)
        self.known.generations[run_id] = generation
        self.waker(run_id)

    async def observe(
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
            self.known.observed[run_id] = generation
        with contextlib.suppress(NotFound):
            await self.kube.patch_status(
                RUNS, meta["namespace"], meta["name"], observe_generation(status, generation)
            )
