"""``maestro schedule``: list, trigger now, suspend and resume WorkflowSchedules."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import click
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from maestro.api.models import WorkflowScheduleSpec
from maestro.api.parse import describe
from maestro.cli.cluster import _age, _call, _common
from maestro.operator.schedules import run_for


@click.group("schedule")
def schedule() -> None:
    """WorkflowSchedules: create WorkflowRuns on a cron schedule."""


@schedule.command("list")
@_common
def list_cmd(namespace: str, kubeconfig: str | None) -> None:
    """Schedules of the namespace with their last and next times and active runs."""
    items = _call(kubeconfig, lambda k: k.list_schedules(namespace))
    table = Table()
    for col in ("name", "schedule", "suspend", "active", "last", "next", "ready"):
        table.add_column(col, overflow="fold")
    for obj in items:
        spec, status = obj.get("spec") or {}, obj.get("status") or {}
        ready: dict[str, Any] = next(
            (c for c in status.get("conditions") or [] if c["type"] == "Ready"), {}
        )
        zone = spec.get("timeZone")
        table.add_row(
            obj["metadata"]["name"],
            spec.get("schedule", "") + (f" ({zone})" if zone else ""),
            str(bool(spec.get("suspend"))).lower(),
            ", ".join(a["name"] for a in status.get("active") or []),
            f"{_age(status.get('lastScheduleTime'))} ago" if status.get("lastScheduleTime") else "",
            status.get("nextScheduleTime") or "",
            ready.get("status", "") if ready.get("status") == "True" else ready.get("message", ""),
        )
    Console().print(table)


@schedule.command("trigger")
@click.argument("name")
@_common
def trigger_cmd(name: str, namespace: str, kubeconfig: str | None) -> None:
    """Create a run of schedule NAME now (as `kubectl create job --from=cronjob/...`).

    The run counts for the schedule's concurrency policy and history limits. Prints
    the run's name.
    """

    async def work(kube: Any) -> dict[str, Any]:
        obj = await kube.get_schedule(namespace, name)
        try:
            spec = WorkflowScheduleSpec.model_validate(obj.get("spec") or {})
        except ValidationError as err:
            raise click.ClickException(
                f"workflowschedule {name}: " + "; ".join(f"spec.{x}" for x in describe(err))
            ) from None
        body = run_for(obj, spec, datetime.now(UTC), generate_name=f"{name}-manual-")
        created: dict[str, Any] = await kube.create_run(namespace, body)
        return created

    click.echo(_call(kubeconfig, work)["metadata"]["name"])


def _set_suspend(name: str, namespace: str, kubeconfig: str | None, value: bool) -> None:
    _call(kubeconfig, lambda k: k.patch_schedule(namespace, name, {"spec": {"suspend": value}}))
    click.echo(f"workflowschedule {name} {'suspended' if value else 'resumed'}")


@schedule.command("suspend")
@click.argument("name")
@_common
def suspend_cmd(name: str, namespace: str, kubeconfig: str | None) -> None:
    """Stop creating runs (running ones go on)."""
    _set_suspend(name, namespace, kubeconfig, True)


@schedule.command("resume")
@click.argument("name")
@_common
def resume_cmd(name: str, namespace: str, kubeconfig: str | None) -> None:
    """Create runs again; times missed meanwhile follow the CronJob rules."""
    _set_suspend(name, namespace, kubeconfig, False)
