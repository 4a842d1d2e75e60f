"""WorkflowSchedules: a Kopf daemon per schedule creates its runs (rules: dag/schedules).

Thin: it reads the schedule and its runs, asks :func:`maestro.dag.schedules.tick` what
to do, does it, and writes status. Every replica has a daemon per schedule; only the
one holding the schedule's bucket acts. Runs are named from the scheduled time, so a
daemon that restarts (operator restart, a bucket handed over) never creates one twice.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from maestro.api.models import API_VERSION, WorkflowScheduleSpec
from maestro.api.parse import describe
from maestro.dag.schedules import ScheduledRun, Tick, run_name, tick, uses_seconds
from maestro.k8s.client import SCHEDULES, Kube, NotFound
from maestro.operator.status import iso

log = logging.getLogger("maestro.schedules")

LABEL_SCHEDULE = "maestro.dev/schedule"
# How often a replica that does not hold a schedule's bucket checks whether it does now.
OWNER_POLL_SECONDS = 1.0
ANNOTATION_SCHEDULED_AT = "maestro.dev/scheduled-at"


@dataclass(frozen=True)
class ScheduleSettings:
    """``allow_seconds``: the e2e test hook (six-field schedules, a 1 s poll)."""

    allow_seconds: bool = False
    # How often active runs are re-read (Forbid waits, history limits) between due times.
    poll_seconds: float = 10.0


def _time(value: Any) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _scheduled_run(obj: Mapping[str, Any]) -> ScheduledRun:
    meta, status = obj["metadata"], obj.get("status") or {}
    created = _time(meta.get("creationTimestamp")) or datetime.now(UTC)
    return ScheduledRun(meta["name"], status.get("phase"), created, _time(status.get("finishedAt")))


def _condition(
    kind: str, ok: bool, reason: str, message: str, previous: Mapping[str, Any], now: datetime
) -> dict[str, Any]:
    state = "True" if ok else "False"
    old = previous.get(kind) or {}
    since = old.get("lastTransitionTime") if old.get("status") == state else None
    return {
        "type": kind,
        "status": state,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since or iso(now),
    }


def run_for(
    schedule: Mapping[str, Any],
    spec: WorkflowScheduleSpec,
    scheduled: datetime,
    *,
    name: str | None = None,
    generate_name: str | None = None,
) -> dict[str, Any]:
    """The WorkflowRun a schedule creates (labelled and owned by it, so its concurrency
    policy and history limits count it)."""
    meta = schedule["metadata"]
    identity = {"name": name} if name else {"generateName": generate_name}
    return {
        "apiVersion": API_VERSION,
        "kind": "WorkflowRun",
        "metadata": {
            **identity,
            "namespace": meta["namespace"],
            "labels": {LABEL_SCHEDULE: meta["name"]},
            "annotations": {ANNOTATION_SCHEDULED_AT: iso(scheduled)},
            # Deleting the schedule deletes its runs, as a CronJob's Jobs go with it.
            "ownerReferences": [
                {
                    "apiVersion": API_VERSION,
                    "kind": "WorkflowSchedule",
                    "name": meta["name"],
                    "uid": meta["uid"],
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": spec.run_template.model_dump(by_alias=True, exclude_none=True),
    }


class ScheduleController:
    """Drives every WorkflowSchedule of the watched namespaces."""

    def __init__(self, kube: Kube, settings: ScheduleSettings, owns: Callable[[str], bool]) -> None:
        """``kube`` creates, cancels and deletes runs and writes schedule status;
        ``owns(uid)`` says whether this replica holds the schedule's bucket (every
        replica runs a daemon per schedule, only the holder acts)."""
        self.kube = kube
        self.settings = settings
        self.owns = owns

    def _poll(self) -> float:
        return 1.0 if self.settings.allow_seconds else self.settings.poll_seconds

    async def daemon(self, body: Mapping[str, Any], stopped: Any) -> None:
        """Until the schedule is deleted: act, then sleep until the next time or poll."""
        written: dict[str, Any] = dict(body.get("status") or {})
        while not stopped:
            if not self.owns(str(body["metadata"].get("uid"))):
                await stopped.wait(OWNER_POLL_SECONDS)
                # Another replica wrote meanwhile: start from what the object shows.
                written = dict(body.get("status") or {})
                continue
            try:
                wait = await self.step(body, written)
            except NotFound:
                return  # the schedule is gone; Kopf stops the daemon too
            except Exception:
                log.exception(
                    "schedule %s/%s",
                    body["metadata"].get("namespace"),
                    body["metadata"].get("name"),
                )
                wait = self._poll()
            await stopped.wait(wait)

    async def step(self, body: Mapping[str, Any], written: dict[str, Any]) -> float:
        """One tick; returns the seconds to sleep. ``written`` is the last status sent."""
        meta = body["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        now = datetime.now(UTC)
        previous = {c.get("type"): c for c in written.get("conditions") or []}
        generation = meta.get("generation")
        try:
            spec = WorkflowScheduleSpec.model_validate(body.get("spec") or {})
        except ValidationError as err:
            problem = "; ".join(f"spec.{line}" for line in describe(err))
            await self._write(
                namespace, name, written, self._invalid(problem, previous, now, generation)
            )
            return self._poll()
        if uses_seconds(spec.schedule) and not self.settings.allow_seconds:
            problem = (
                f"spec.schedule: {spec.schedule!r} has a seconds field, a test hook the "
                "operator refuses unless started with --allow-seconds-schedules"
            )
            await self._write(
                namespace, name, written, self._invalid(problem, previous, now, generation)
            )
            return self._poll()

        objs = await self.kube.list_runs(namespace, label_selector=f"{LABEL_SCHEDULE}={name}")
        runs = [_scheduled_run(o) for o in objs]
        created = _time(meta.get("creationTimestamp")) or now
        last = _time(written.get("lastScheduleTime"))
        decision = tick(spec, last, created, runs, now)
        await self._act(body, spec, decision)

        status: dict[str, Any] = {
            "lastScheduleTime": iso(decision.start)
            if decision.start
            else written.get("lastScheduleTime"),
            "nextScheduleTime": iso(decision.next_time),
            "lastRunName": run_name(name, decision.start)
            if decision.start
            else written.get("lastRunName"),
            "active": [{"name": n} for n in decision.active]
            + ([{"name": run_name(name, decision.start)}] if decision.start else []),
            "observedGeneration": generation,
        }
        succeeded = [r for r in runs if r.phase == "Succeeded" and r.finished]
        if succeeded:
            status["lastSuccessfulTime"] = iso(max(r.finished for r in succeeded if r.finished))
        message = decision.skipped or "scheduling"
        if decision.missed > 0:
            message += f"; {decision.missed} earlier time(s) missed, only the latest started"
        status["conditions"] = [
            _condition(
                "Ready",
                True,
                "Scheduling" if not decision.skipped else decision.skipped.split(":")[0],
                message,
                previous,
                now,
            ),
            _condition("Stalled", False, "Scheduling", message, previous, now),
        ]
        for cond in status["conditions"]:
            cond["observedGeneration"] = generation
        await self._write(namespace, name, written, status)
        if decision.next_time is None:
            return self._poll()
        until_next = (decision.next_time - datetime.now(UTC)).total_seconds()
        return max(0.05, min(until_next, self._poll()))

    def _invalid(
        self, problem: str, previous: Mapping[str, Any], now: datetime, generation: Any
    ) -> dict[str, Any]:
        conditions = [
            _condition("Ready", False, "Invalid", problem, previous, now),
            _condition("Stalled", True, "Invalid", problem, previous, now),
        ]
        for cond in conditions:
            cond["observedGeneration"] = generation
        return {
            "conditions": conditions,
            "nextScheduleTime": None,
            "observedGeneration": generation,
        }

    async def _act(
        self, body: Mapping[str, Any], spec: WorkflowScheduleSpec, decision: Tick
    ) -> None:
        meta = body["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        for run in decision.cancel:
            with contextlib.suppress(NotFound):
                await self.kube.patch_run_spec(namespace, run, {"spec": {"cancel": True}})
        for run in decision.delete:
            await self.kube.delete_run(namespace, run)
        if decision.start is None:
            return
        created = run_name(name, decision.start)
        body_run = run_for(body, spec, decision.start, name=created)
        if await self.kube.create_run_once(namespace, body_run):
            await self.kube.emit_event(
                dict(body),
                reason="RunCreated",
                message=f"created run {created} for {iso(decision.start)}",
            )

    async def _write(
        self, namespace: str, name: str, written: dict[str, Any], status: dict[str, Any]
    ) -> None:
        """Patch status only when it changed: a schedule at rest costs no writes."""
        changed = {k: v for k, v in status.items() if written.get(k) != v}
        if not changed:
            return
        await self.kube.patch_status(SCHEDULES, namespace, name, changed)
        written.update(changed)
