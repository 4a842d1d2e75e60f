"""``maestro history``: run history from the store, also after the resources are gone."""

from __future__ import annotations

import asyncio
from datetime import datetime

import click
from rich.console import Console
from rich.table import Table

from maestro.cli.run import default_database_url
from maestro.store import RunNotFound, Store, StoreError


def _t(ts: datetime | None) -> str:
    return ts.strftime("%Y-%m-%d %H:%M:%S") if ts else ""


async def _show(url: str, run_id: str | None, namespace: str | None, limit: int) -> None:
    store = await Store.open(url)
    console = Console()
    try:
        if run_id is None:
            table = Table(title=f"runs in {store.description}", title_justify="left")
            for col in (
                "id",
                "namespace",
                "name",
                "workflow",
                "phase",
                "started",
                "finished",
                "message",
            ):
                table.add_column(col, overflow="fold")
            runs = await store.list_runs(namespace=namespace)
            for r in runs[-limit:]:
                table.add_row(
                    r.id,
                    r.namespace,
                    r.name,
                    r.workflow_name or "",
                    r.phase.value,
                    _t(r.started_at),
                    _t(r.finished_at),
                    r.message or "",
                )
            console.print(table)
            return
        run = await store.get_run(run_id)
        console.print(
            f"run {run.namespace}/{run.name} ({run.id}): {run.phase.value} {run.message or ''}"
        )
        attempts = Table(title="attempts", title_justify="left")
        for col in (
            "task",
            "attempt",
            "phase",
            "reason",
            "started",
            "finished",
            "message / outputs",
        ):
            attempts.add_column(col, overflow="fold")
        for a in await store.attempts(run.id):
            detail = str(a.outputs) if a.outputs else a.message or ""
            attempts.add_row(
                a.task,
                str(a.attempt),
                a.phase.value,
                a.reason or "",
                _t(a.started_at),
                _t(a.finished_at),
                detail,
            )
        console.print(attempts)
        log = Table(title="events", title_justify="left")
        for col in ("at", "kind", "task", "from", "to", "reason", "message"):
            log.add_column(col, overflow="fold")
        for e in await store.events(run.id):
            task = f"{e.task}#{e.attempt}" if e.task else ""
            log.add_row(
                _t(e.at),
                e.kind,
                task,
                e.from_phase or "",
                e.to_phase or "",
                e.reason or "",
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
    """List stored runs, or show one run's attempts and event log."""
    try:
        asyncio.run(_show(database_url or default_database_url(), run_id, namespace, limit))
    except (StoreError, RunNotFound) as err:
        raise click.ClickException(str(err)) from None
