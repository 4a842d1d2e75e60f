"""The WorkflowRun ``status`` as a view of the store (summaries; detail stays in the store).

Conditions follow kstatus, so ``kubectl wait --for=condition=Succeeded``, Flux and
Argo CD read health without plugins:
- ``Ready``: True once the run Succeeded; False otherwise, with the reason.
- ``Succeeded``: Unknown while the run goes on, then True or False.
- ``Reconciling``: True while the run goes on (kstatus: InProgress).
- ``Stalled``: True when the run Failed, was Cancelled or cannot start (kstatus: Failed).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from maestro.api.models import WorkflowSpec
from maestro.api.phases import RunPhase
from maestro.dag import fanout
from maestro.store import AttemptRecord, RunRecord

# Per-task outputs shown in status are cut to this size; the store keeps them whole.
MAX_OUTPUT_SUMMARY = 1024
MAX_VALUE_CHARS = 256
MAX_MESSAGE_CHARS = 512
# What outputs and messages of all tasks may take together: etcd refuses objects over
# 1.5 MiB, so with many tasks each one's share shrinks (a 1,000-task run stays < 1 MB).
TASK_DETAIL_BUDGET = 384 * 1024
MIN_DETAIL = 96


def iso(ts: datetime | None) -> str | None:
    """RFC 3339 in UTC with a Z, as Kubernetes writes times."""
    if ts is None:
        return None
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def duration(start: datetime | None, end: datetime | None) -> str | None:
    """``1h2m3s`` style, like kubectl's ages."""
    if start is None or end is None:
        return None
    secs = max(0, int((end - start).total_seconds()))
    h, rest = divmod(secs, 3600)
    m, s = divmod(rest, 60)
    return (f"{h}h" if h else "") + (f"{m}m" if h or m else "") + f"{s}s"


def summarize_outputs(
    outputs: Mapping[str, Any] | None, limit: int = MAX_OUTPUT_SUMMARY
) -> dict[str, Any] | None:
    """Outputs small enough for status: long values cut, the whole within ``limit`` bytes."""
    if outputs is None:
        return None
    out: dict[str, Any] = {}
    used = 2
    value_chars = min(MAX_VALUE_CHARS, limit // 2)
    for key, value in outputs.items():
        text = value if isinstance(value, str) else json.dumps(value)
        if len(text) > value_chars:
            value = text[: value_chars - 1] + "…"
        size = len(key) + len(json.dumps(value)) + 4
        if used + size > limit:
            out["…"] = "more in the store: maestro get"
            break
        out[key] = value
        used += size
    return out


def _condition(
    kind: str,
    status: str,
    reason: str,
    message: str,
    generation: int | None,
    previous: Mapping[str, Mapping[str, Any]],
    now: datetime,
) -> dict[str, Any]:
    old = previous.get(kind)
    since = old.get("lastTransitionTime") if old and old.get("status") == status else None
    return {
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since or iso(now),
        "observedGeneration": generation,
    }


def conditions(
    phase: RunPhase,
    reason: str,
    message: str,
    generation: int | None,
    previous: Sequence[Mapping[str, Any]],
    now: datetime,
) -> list[dict[str, Any]]:
    """The four kstatus conditions for a run in ``phase``."""
    prev = {str(c.get("type")): c for c in previous}
    ok = phase is RunPhase.SUCCEEDED
    failed = phase.finished and not ok
    states = {
        "Ready": "True" if ok else "False",
        "Succeeded": "True" if ok else "False" if failed else "Unknown",
        "Reconciling": "False" if phase.finished else "True",
        "Stalled": "True" if failed else "False",
    }
    return [
        _condition(kind, state, reason, message, generation, prev, now)
        for kind, state in states.items()
    ]


def run_status(
    run: RunRecord,
    spec: WorkflowSpec,
    latest: Mapping[str, AttemptRecord],
    *,
    live_message: str,
    generation: int | None,
    previous_conditions: Sequence[Mapping[str, Any]],
    now: datetime,
    include_spec: bool,
) -> dict[str, Any]:
    """The full ``status`` of a WorkflowRun, built from the store."""
    tasks: dict[str, Any] = {}
    first_start: dict[str, datetime | None] = {}
    done = 0
    names: list[str] = []
    for name, members in fanout.rows((t.name for t in spec.all_tasks()), latest):
        if members and name not in latest:
            # A fan-out's own entry sums up its instances, which follow it.
            phases = [latest[m].phase for m in members]
            tasks[name] = {
                "phase": fanout.summary(phases).value,
                "attempts": 0,
                "message": fanout.progress(phases),
            }
        names += [name] if not members or name in latest else members
    share = max(MIN_DETAIL, TASK_DETAIL_BUDGET // max(1, len(names)))
    output_limit = min(MAX_OUTPUT_SUMMARY, share * 2 // 3)
    message_limit = min(MAX_MESSAGE_CHARS, share // 3)
    kinds = {t.name: t.kind for t in spec.all_tasks()}
    for name in names:
        att = latest.get(name)
        if att is None:
            tasks[name] = {"phase": "Pending", "attempts": 0}
            continue
        done += att.phase.finished
        first_start[name] = att.started_at
        entry: dict[str, Any] = {
            "phase": att.phase.value,
            "attempts": att.attempt,
            "startedAt": iso(att.started_at),
            "finishedAt": iso(att.finished_at),
            "reason": att.reason,
            "message": (att.message or "")[:message_limit] or None,
            # The attempt's handle: a workflow task's is its child WorkflowRun.
            ("childRun" if kinds.get(fanout.base(name)) == "workflow" else "podName"): (
                att.job_name
            ),
            "cachedFrom": att.cached_from,
            "outputs": summarize_outputs(att.outputs, output_limit),
        }
        tasks[name] = {k: v for k, v in entry.items() if v is not None}
    message = run.message if run.phase.finished else (live_message or run.message or "")
    reason = run.reason or run.phase.value
    status: dict[str, Any] = {
        "phase": run.phase.value,
        "runId": run.id,
        "workflowName": run.workflow_name,
        "startedAt": iso(run.started_at),
        "finishedAt": iso(run.finished_at),
        # Only a finished run has a duration: a running one's would be stale between
        # status writes (`kubectl get` shows its STARTED age instead).
        "duration": duration(run.started_at, run.finished_at),
        "progress": f"{done}/{len(names)}",
        "message": message or "",
        "tasks": tasks,
        "conditions": conditions(
            run.phase, reason, message or run.phase.value, generation, previous_conditions, now
        ),
        "observedGeneration": generation,
    }
    if run.outputs is not None:
        status["outputs"] = summarize_outputs(run.outputs)
    if include_spec:
        status["workflowSpec"] = run.spec
    return status


def not_started_status(
    phase: RunPhase,
    reason: str,
    message: str,
    generation: int | None,
    previous_conditions: Sequence[Mapping[str, Any]],
    now: datetime,
) -> dict[str, Any]:
    """Status of a run the store does not have yet: waiting for, or refused at, the start."""
    conds = conditions(phase, reason, message, generation, previous_conditions, now)
    if not phase.finished:
        # Waiting on something a person must fix (a missing Workflow): kstatus reads
        # Stalled only when Reconciling is not True. The run may still start, so
        # Succeeded stays Unknown.
        for c in conds:
            if c["type"] in ("Stalled", "Reconciling"):
                c["status"] = "True" if c["type"] == "Stalled" else "False"
    return {
        "phase": phase.value,
        "message": message,
        "conditions": conds,
        "observedGeneration": generation,
    }


def observe_generation(status: Mapping[str, Any], generation: int) -> dict[str, Any]:
    """The status patch that says a finished run has seen spec ``generation``.

    A spec edit of a finished run (a late cancel, an approval, a GitOps sync) changes
    nothing in the run, but kstatus and Argo CD read the run as InProgress until
    ``observedGeneration`` (of the status and of each condition) catches up.
    """
    return {
        "observedGeneration": generation,
        "conditions": [
            {**c, "observedGeneration": generation} for c in status.get("conditions") or []
        ],
    }
