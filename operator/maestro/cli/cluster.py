"""Cluster verbs: submit, get, watch, logs, approve, cancel, retry (through the API server)."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.live import Live
from rich.table import Table

from maestro.cli.run import default_database_url
from maestro.executors.container import LABEL_RUN, LABEL_TASK, run_label
from maestro.k8s.client import (
    Conflict,
    Kube,
    NotFound,
    load_config,
    retry_manifest,
    run_manifest,
)
from maestro.store import Store, StoreError

T = TypeVar("T")
_FINISHED = ("Succeeded", "Failed", "Cancelled")
_COLORS = {"Succeeded": "green", "Failed": "red", "Running": "cyan", "Cancelled": "magenta"}


def _call(kubeconfig: str | None, work: Callable[[Kube], Awaitable[T]]) -> T:
    async def main() -> T:
        kube = Kube(await load_config(kubeconfig))
        try:
            return await work(kube)
        finally:
            await kube.close()

    try:
        return asyncio.run(main())
    except NotFound as err:
        raise click.ClickException(f"{err} not found") from None


def _common(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("-n", "--namespace", default="default", show_default=True)(f)
    return click.option("--kubeconfig", envvar="KUBECONFIG", help="Default: ~/.kube/config.")(f)


def _age(ts: str | None) -> str:
    if not ts:
        return ""
    secs = int(
        (datetime.now(UTC) - datetime.fromisoformat(ts.replace("Z", "+00:00"))).total_seconds()
    )
    return f"{secs // 3600}h{secs % 3600 // 60}m" if secs >= 3600 else f"{secs // 60}m{secs % 60}s"


def _tasks_table(obj: dict[str, Any]) -> Table:
    status = obj.get("status") or {}
    meta = obj["metadata"]
    phase = status.get("phase", "Pending")
    title = f"{meta['name']}  {phase}  {status.get('progress', '')}  {status.get('message', '')}"
    table = Table(title=title, title_justify="left")
    for col in ("task", "phase", "attempts", "started", "message"):
        table.add_column(col, overflow="fold")
    for name, t in (status.get("tasks") or {}).items():
        color = _COLORS.get(t.get("phase", ""), "white")
        table.add_row(
            name,
            f"[{color}]{t.get('phase', '')}[/]",
            str(t.get("attempts", 0)),
            (t.get("startedAt") or "")[11:19],
            t.get("message", ""),
        )
    return table


@click.command("submit")
@click.argument("workflow")
@click.option("-p", "--param", "params", multiple=True, metavar="KEY=VALUE")
@click.option("--name", help="Run name (default: WORKFLOW- plus a random suffix).")
@_common
def submit_cmd(
    workflow: str, params: tuple[str, ...], name: str | None, namespace: str, kubeconfig: str | None
) -> None:
    """Start a run of WORKFLOW; prints the WorkflowRun's name."""
    values = {}
    for item in params:
        key, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r}: expected key=value", param_hint="-p")
        values[key] = value
    body = run_manifest(workflow, values, name=name)
    created = _call(kubeconfig, lambda k: k.create_run(namespace, body))
    click.echo(created["metadata"]["name"])


@click.command("get")
@click.argument("run", required=False)
@_common
def get_cmd(run: str | None, namespace: str, kubeconfig: str | None) -> None:
    """List runs, or show one run's tasks."""
    console = Console()
    if run is not None:
        console.print(_tasks_table(_call(kubeconfig, lambda k: k.get_run(namespace, run))))
        return
    items = _call(kubeconfig, lambda k: k.list_runs(namespace))
    table = Table()
    for col in ("name", "phase", "progress", "age", "duration", "message"):
        table.add_column(col, overflow="fold")
    for obj in items:
        st = obj.get("status") or {}
        table.add_row(
            obj["metadata"]["name"],
            st.get("phase", ""),
            st.get("progress", ""),
            _age(obj["metadata"].get("creationTimestamp")),
            st.get("duration", ""),
            st.get("message", ""),
        )
    console.print(table)


@click.command("watch")
@click.argument("run")
@click.option("--interval", default=1.0, show_default=True, help="Seconds between refreshes.")
@_common
def watch_cmd(run: str, interval: float, namespace: str, kubeconfig: str | None) -> None:
    """Show a run's tasks live until it finishes; exit 0 only when it Succeeded."""

    async def follow(kube: Kube) -> str:
        console = Console()
        with Live(console=console, auto_refresh=False) as live:
            while True:
                obj = await kube.get_run(namespace, run)
                live.update(_tasks_table(obj), refresh=True)
                phase = str((obj.get("status") or {}).get("phase", ""))
                if phase in _FINISHED:
                    return phase
                await asyncio.sleep(interval)

    sys.exit(0 if _call(kubeconfig, follow) == "Succeeded" else 1)


@click.command("logs")
@click.argument("run")
@click.argument("task", required=False)
@_common
def logs_cmd(run: str, task: str | None, namespace: str, kubeconfig: str | None) -> None:
    """Print the container logs of a run's tasks (every attempt, oldest first)."""

    async def read(kube: Kube) -> None:
        selector = f"{LABEL_RUN}={run_label(run)}" + (f",{LABEL_TASK}={task}" if task else "")
        pods = await kube.core.list_namespaced_pod(namespace, label_selector=selector)
        if not pods.items:
            raise click.ClickException(
                f"no pods for run {run!r}" + (f" task {task!r}" if task else "")
            )
        for pod in sorted(pods.items, key=lambda p: p.metadata.creation_timestamp):
            labels = pod.metadata.labels or {}
            click.echo(
                f"==> {labels.get(LABEL_TASK)} attempt {labels.get('maestro.dev/attempt')} "
                f"({pod.metadata.name})"
            )
            try:
                click.echo(await kube.pod_log(namespace, pod.metadata.name), nl=False)
            except NotFound as err:
                click.echo(f"(no log: {err})")

    _call(kubeconfig, read)


async def _patch_spec(
    kube: Kube, namespace: str, run: str, change: Callable[[dict[str, Any]], dict[str, Any]]
) -> None:
    try:
        await kube.change_run_spec(namespace, run, change)
    except Conflict as err:
        raise click.ClickException(str(err)) from None


def _local_store_call(database_url: str | None, work: Callable[[Store], Awaitable[T]]) -> T:
    async def main() -> T:
        store = await Store.open(database_url or default_database_url())
        try:
            return await work(store)
        finally:
            await store.close()

    try:
        return asyncio.run(main())
    except StoreError as err:
        raise click.ClickException(str(err)) from None


_local = click.option(
    "--local", is_flag=True, help="RUN is a local run's id (maestro run --local), not a resource."
)
_database = click.option(
    "--database-url", envvar="MAESTRO_DATABASE_URL", help="With --local: the store URL."
)


@click.command("approve")
@click.argument("run")
@click.argument("task")
@_local
@_database
@_common
def approve_cmd(
    run: str,
    task: str,
    local: bool,
    database_url: str | None,
    namespace: str,
    kubeconfig: str | None,
) -> None:
    """Open approval gate TASK of RUN (adds it to spec.approvals, or to a local run's store)."""
    if local:
        actor = os.environ.get("USER", "cli")
        _local_store_call(database_url, lambda s: s.approve(run, task, actor=actor))
        click.echo(f"approved {task} in {run}")
        return

    def add(spec: dict[str, Any]) -> dict[str, Any]:
        return {"approvals": sorted({*(spec.get("approvals") or []), task})}

    _call(kubeconfig, lambda k: _patch_spec(k, namespace, run, add))
    click.echo(f"approved {task} in {run}")


@click.command("cancel")
@click.argument("run")
@_local
@_database
@_common
def cancel_cmd(
    run: str, local: bool, database_url: str | None, namespace: str, kubeconfig: str | None
) -> None:
    """Cancel RUN: running tasks are stopped, finally tasks run, the run ends Cancelled."""
    if local:
        _local_store_call(database_url, lambda s: s.update_controls(run, cancel=True))
    else:
        _call(kubeconfig, lambda k: _patch_spec(k, namespace, run, lambda _: {"cancel": True}))
    click.echo(f"cancelling {run}")


@click.command("retry")
@click.argument("run")
@_common
def retry_cmd(run: str, namespace: str, kubeconfig: str | None) -> None:
    """Start a new run of RUN's workflow snapshot that reuses its succeeded tasks' outputs."""

    async def retry(kube: Kube) -> str:
        old = await kube.get_run(namespace, run)
        run_id = (old.get("status") or {}).get("runId")
        if not run_id:
            raise click.ClickException(f"run {run!r} has not started, there is nothing to retry")
        created = await kube.create_run(namespace, retry_manifest(old, run_id))
        return str(created["metadata"]["name"])

    click.echo(_call(kubeconfig, retry))


COMMANDS = [submit_cmd, get_cmd, watch_cmd, logs_cmd, approve_cmd, cancel_cmd, retry_cmd]
