"""``maestro history``: run history from the store, also after the resources are gone."""

from __future__ import annotations

import asyncio
from datetime import datetime

import click
from rich.console import Console
from rich.table import Table

from maestro.cli import columns
from maestro.cli.run import default_database_url
from maestro.store import RunNotFound, RunRecord, Store, StoreError


def _t(ts: datetime | None) -> str:
    return ts.strftime("%Y-%m-%d %H:%M:%S") if ts else ""


# Run ids are UUIDs; this many leading characters name a run (like git's short hashes).
SHORT_ID = 8


async def _find(store: Store, run_id: str, namespace: str | None) -> RunRecord:
    """The run with this id, or the one run whose id starts with it."""
    try:
        return await store.get_run(run_id)
    except RunNotFound:
        found = [r for r in await store.list_runs(namespace=namespace) if r.id.startswith(run_id)]
        if len(found) == 1:
            return found[0]
        if found:
            raise RunNotFound(f"run id {run_id!r} is ambiguous: {len(found)} runs match") from None
        raise


async def _show(url: str, run_id: str | None, namespace: str | None, limit: int) -> None:
    store = await Store.open(url)
    console = Console()
    try:
        if run_id is None:
            click.echo(f"runs in {store.description}")
            runs = await store.list_runs(namespace=namespace)
            rows = [
                (
                    r.id[:SHORT_ID],
                    f"{r.namespace}/{r.name}",
                    r.workflow_name or "",
                    r.phase.value,
                    r.started_at.strftime("%m-%d %H:%M") if r.started_at else "",
                    r.message or "",
                )
                for r in runs[-limit:]
            ]
            headers = ("id", "run", "workflow", "phase", "started", "message")
            click.echo(columns.render(headers, rows))
            return
        run = await _find(store, run_id, namespace)
        console.print(
            f"run {run.namespace}/{run.name} ({run.id}): {run.phase.value} {run.message or ''}",
            soft_wrap=True,
        )
        console.print(f"started {_t(run.started_at)}, finished {_t(run.finished_at) or '-'}")
        if run.outputs:
            console.print(f"outputs {run.outputs}", soft_wrap=True)
        if run.parent_id is not None:
            parent = await store.get_run(run.parent_id)
            console.print(f"child of run {parent.namespace}/{parent.name} ({parent.id})")
        for child in await store.children(run.id):
            console.print(
                f"child run {child.namespace}/{child.name} ({child.id}): {child.phase.value}",
                soft_wrap=True,
            )
        attempts = Table(title="attempts", title_justify="left")
        for col in ("task", "try", "phase", "reason", "started"):
            attempts.add_column(col, no_wrap=True)
        attempts.add_column("message / outputs", overflow="fold", ratio=1)
        for a in await store.attempts(run.id):
            detail = str(a.outputs) if a.outputs else a.message or ""
            if a.cached_from:
                detail = f"{a.message}: {detail}"  # where a Cached attempt's outputs came from
            attempts.add_row(
                a.task,
                str(a.attempt),
                a.phase.value,
                a.reason or "",
                a.started_at.strftime("%H:%M:%S") if a.started_at else "",
                detail,
            )
        console.print(attempts)
        log = Table(title="events", title_justify="left")
        for col in ("at", "kind", "task", "change", "by"):
            log.add_column(col, no_wrap=True)
        log.add_column("message", overflow="fold", ratio=1)
        for e in await store.events(run.id):
            task = f"{e.task}#{e.attempt}" if e.task and e.attempt else e.task or ""
            change = f"{e.from_phase or ''}→{e.to_phase}" if e.to_phase else ""
            log.add_row(
                e.at.strftime("%H:%M:%S"),
                e.kind,
                task,
                change,
                e.actor or "",
                e.message or "",
            )
        console.print(log)
    finally:
        await store.close()


@click.command("history")
@click.argument("run_id", required=False)
@click.option("-n", "--namespace", help="Only runs of this namespace ('local' for local runs).")
@click.option("--limit", default=50, show_default=True, help="Newest runs to list.")
@click.option(
    "--database-url",
    envvar="MAESTRO_DATABASE_URL",
    help="Store URL (default: the local runs' SQLite file).",
)
def history_cmd(
    run_id: str | None, namespace: str | None, limit: int, database_url: str | None
) -> None:
    """List stored runs, or show one run's attempts and event log (RUN_ID or its start)."""
    try:
        asyncio.run(_show(database_url or default_database_url(), run_id, namespace, limit))
    except (StoreError, RunNotFound) as err:
        raise click.ClickException(str(err)) from None
