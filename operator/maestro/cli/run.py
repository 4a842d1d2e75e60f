"""``maestro run --local``: run a workflow on this machine, with its history in a store."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets as random
import signal
import sys
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path

import click
import httpx
from rich.console import Console
from rich.live import Live
from rich.table import Table

from maestro.api.models import Workflow, WorkflowRun, WorkflowSpec
from maestro.api.phases import RunPhase, TaskPhase
from maestro.cli.files import load_file
from maestro.dag import fanout
from maestro.dag.validate import call_problems
from maestro.engine.driver import Waker, drive
from maestro.engine.engine import Engine, InvalidRun, Pass
from maestro.engine.executor import Executor
from maestro.executors.approval import ApprovalExecutor
from maestro.executors.http import HttpExecutor
from maestro.executors.local import LocalExecutor
from maestro.executors.secrets import EnvSecrets
from maestro.executors.workflow import LocalWorkflows
from maestro.store import AttemptRecord, RunRecord, Store, StoreError

_COLORS = {
    "Pending": "dim",
    "Running": "cyan",
    "Succeeded": "green",
    "Failed": "red",
    "Skipped": "yellow",
    "Cancelled": "magenta",
}


def state_dir() -> Path:
    """Where local runs keep their database and attempt directories."""
    base = os.environ.get("MAESTRO_HOME")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg) / "maestro"


def default_database_url() -> str:
    """A SQLite file under :func:`state_dir` (local mode's explicit default)."""
    return f"sqlite:///{state_dir() / 'maestro.db'}"


def _parse_params(values: tuple[str, ...]) -> dict[str, str]:
    params: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r}: expected key=value", param_hint="-p")
        params[key] = value
    return params


def _workflow_from(file: Path) -> tuple[str, WorkflowSpec, dict[str, str]]:
    """The workflow to run: a Workflow, or a WorkflowRun (inline or referencing a Workflow
    in the same file or next to it)."""
    docs = load_file(file)
    for doc in docs:
        if doc.problems:
            raise click.ClickException(f"{doc.where}: {doc.problems[0]}")
    workflows = {
        d.manifest.metadata.name: d.manifest for d in docs if isinstance(d.manifest, Workflow)
    }
    runs = [d.manifest for d in docs if isinstance(d.manifest, WorkflowRun)]
    if runs:
        run = runs[0]
        if run.spec.workflow_spec is not None:
            return run.metadata.name or "run", run.spec.workflow_spec, dict(run.spec.params)
        ref = run.spec.workflow_ref
        assert ref is not None
        if ref.name not in workflows:
            for sibling in sorted(file.parent.glob("*.y*ml")):
                for doc in load_file(sibling):
                    if (
                        isinstance(doc.manifest, Workflow)
                        and doc.manifest.metadata.name == ref.name
                    ):
                        workflows[ref.name] = doc.manifest
        if ref.name not in workflows:
            raise click.ClickException(
                f"{file}: spec.workflowRef.name: no Workflow named {ref.name!r} in this file "
                "or the files beside it"
            )
        return ref.name, workflows[ref.name].spec, dict(run.spec.params)
    if not workflows:
        raise click.ClickException(f"{file}: no Workflow or WorkflowRun in it")
    name, workflow = next(iter(workflows.items()))
    return name or "workflow", workflow.spec, {}


def _library(files: list[Path]) -> dict[str, WorkflowSpec]:
    """Every Workflow in ``files`` by name: what ``workflow`` tasks may call."""
    found: dict[str, WorkflowSpec] = {}
    for path in files:
        for doc in load_file(path):
            if isinstance(doc.manifest, Workflow) and doc.manifest.metadata.name:
                found[doc.manifest.metadata.name] = doc.manifest.spec
    return found


def _duration(a: datetime | None, b: datetime | None) -> str:
    if a is None:
        return ""
    if b is None:
        return "…"
    return f"{(b - a).total_seconds():.1f}s"


def _rows(
    spec: WorkflowSpec, latest: Mapping[str, AttemptRecord]
) -> list[tuple[str, AttemptRecord | None]]:
    """Table rows: each task, or a fan-out's instances in item order in its place."""
    found: list[tuple[str, AttemptRecord | None]] = []
    for name, members in fanout.rows((t.name for t in spec.all_tasks()), latest):
        if members and name not in latest:
            found += [(m, latest[m]) for m in members]
        else:
            found.append((name, latest.get(name)))
    return found


def _table(run: RunRecord, spec: WorkflowSpec, latest: Mapping[str, AttemptRecord]) -> Table:
    table = Table(title=f"{run.name}  ({run.id})  {run.phase.value}", title_justify="left")
    for col in ("task", "phase", "attempt", "duration", "message"):
        table.add_column(col, overflow="fold")
    for name, att in _rows(spec, latest):
        phase = att.phase.value if att else "Pending"
        table.add_row(
            name,
            f"[{_COLORS[phase]}]{phase}[/]",
            str(att.attempt) if att else "",
            _duration(att.started_at, att.finished_at) if att else "",
            (att.message or "") if att else "",
        )
    return table


async def _run(
    url: str,
    file: Path | None,
    params: dict[str, str],
    resume: str | None,
    console: Console,
    no_cache: bool,
    library: dict[str, WorkflowSpec],
) -> int:
    try:
        store = await Store.open(url, migrate=True)
    except StoreError as err:
        raise click.ClickException(str(err)) from None
    waker = Waker()
    async with httpx.AsyncClient() as client:
        secrets = EnvSecrets()
        children = LocalWorkflows(library, waker)
        executors: dict[str, Executor] = {
            "container": LocalExecutor(state_dir() / "attempts", secrets, waker),
            "http": HttpExecutor(secrets, waker, client),
            "approval": ApprovalExecutor(),
            "workflow": children,
        }
        engine = Engine(store, executors)
        children.bind(engine)
        try:
            if resume is not None:
                run = await store.get_run(resume)
            else:
                assert file is not None
                wf_name, spec, file_params = _workflow_from(file)
                calls = call_problems(wf_name, {**library, wf_name: spec}, all_known=True)
                if calls:
                    raise InvalidRun([str(p) for p in calls])
                name = f"{wf_name}-{random.token_hex(3)}"
                run = await engine.create_run(
                    namespace="local",
                    name=name,
                    spec=spec,
                    params={**file_params, **params},
                    workflow_name=wf_name,
                    controls={"noCache": True} if no_cache else None,
                )
        except InvalidRun as err:
            for problem in err.problems:
                console.print(f"[red]maestro: error:[/] {problem}", highlight=False)
            await store.close()
            return 1
        except StoreError as err:
            await store.close()
            raise click.ClickException(str(err)) from None
        spec, _ = engine.spec_of(run)
        console.print(
            f"run [bold]{run.name}[/] id [bold]{run.id}[/] (store: {store.description})\n"
            "local mode: container tasks run their command on THIS machine, as you, without "
            "the image or any sandbox; only run workflows you trust.\n"
            "tasks see a minimal environment (PATH, HOME, locale) plus MAESTRO_* variables.\n"
            f"resume after an interruption with: maestro run --local --resume {run.id}",
            highlight=False,
        )
        final = await _drive_with_display(engine, run, spec, waker, console)
        await _summary(store, final, spec, console)
        await store.close()
    return 0 if final.phase is RunPhase.SUCCEEDED else 1


async def _drive_with_display(
    engine: Engine, run: RunRecord, spec: WorkflowSpec, waker: Waker, console: Console
) -> RunRecord:
    """Drive the run; Ctrl-C asks for a cancel (finally tasks run), a second one aborts."""
    loop = asyncio.get_running_loop()
    interrupts = 0

    def on_interrupt() -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts == 1:
            console.print("[yellow]cancelling (Ctrl-C again to stop at once)[/]")
            loop.create_task(engine.update_controls(run.id, cancel=True)).add_done_callback(
                lambda _: waker(run.id)
            )
        else:
            driving.cancel()

    seen: dict[str, tuple[int, TaskPhase]] = {}
    kinds = {t.name: t.kind for t in spec.all_tasks()}
    live = Live(console=console, auto_refresh=False) if console.is_terminal else None

    async def on_pass(step: Pass) -> None:
        latest = await engine.store.latest_attempts(step.run.id)
        if live is not None:
            live.update(_table(step.run, spec, latest), refresh=True)
            return
        for name, att in latest.items():
            if seen.get(name) != (att.attempt, att.phase):
                seen[name] = (att.attempt, att.phase)
                # A gate shows what its approver is asked while it waits.
                shown = att.phase.finished or kinds.get(fanout.base(name)) == "approval"
                note = f": {att.message}" if att.message and shown else ""
                console.print(
                    f"{datetime.now():%H:%M:%S} {name} #{att.attempt} {att.phase.value}{note}",
                    highlight=False,
                )

    driving = asyncio.ensure_future(drive(engine, run.id, waker, on_pass=on_pass))
    loop.add_signal_handler(signal.SIGINT, on_interrupt)
    try:
        with live if live is not None else contextlib.nullcontext():
            return await driving
    except asyncio.CancelledError:
        return await engine.abort(run.id, "stopped by a second Ctrl-C")
    finally:
        loop.remove_signal_handler(signal.SIGINT)


async def _summary(store: Store, run: RunRecord, spec: WorkflowSpec, console: Console) -> None:
    latest = await store.latest_attempts(run.id)
    table = Table(title="summary", title_justify="left")
    for col in ("task", "phase", "attempts", "duration", "outputs / message"):
        table.add_column(col, overflow="fold")
    for name, att in _rows(spec, latest):
        if att is None:
            table.add_row(name, "-", "0", "", "")
            continue
        detail = (
            ", ".join(f"{k}={v}" for k, v in (att.outputs or {}).items())
            if att.phase is TaskPhase.SUCCEEDED
            else att.message or ""
        )
        table.add_row(
            name,
            f"[{_COLORS[att.phase.value]}]{att.phase.value}[/]",
            str(att.attempt),
            _duration(att.started_at, att.finished_at),
            detail,
        )
    console.print(table)
    color = "green" if run.phase is RunPhase.SUCCEEDED else "red"
    took = _duration(run.started_at, run.finished_at)
    console.print(f"run {run.name}: [{color}]{run.phase.value}[/] in {took}: {run.message}")
    if run.outputs:
        console.print("outputs: " + json.dumps(run.outputs, separators=(", ", ": ")))


@click.command("run")
@click.argument("file", required=False, type=click.Path(path_type=Path, dir_okay=False))
@click.argument("more", nargs=-1, type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--local",
    is_flag=True,
    help="Run on this machine: container tasks run their commands here, as you, "
    "without the image (required: cluster runs use submit).",
)
@click.option("-p", "--param", "params", multiple=True, metavar="KEY=VALUE", help="A run param.")
@click.option("--resume", metavar="RUN_ID", help="Continue an interrupted run.")
@click.option("--no-cache", is_flag=True, help="Run cached tasks again instead of reusing outputs.")
@click.option(
    "--database-url",
    envvar="MAESTRO_DATABASE_URL",
    help="Store URL (default: a SQLite file under $MAESTRO_HOME or ~/.local/state/maestro).",
)
def run_cmd(
    file: Path | None,
    more: tuple[Path, ...],
    local: bool,
    params: tuple[str, ...],
    resume: str | None,
    no_cache: bool,
    database_url: str | None,
) -> None:
    """Run a Workflow (or WorkflowRun) FILE to its end and print a summary.

    Workflows in FILE and in the MORE files are what its `workflow` tasks may call (with
    --resume, give the files again). Exits 0 only when the run Succeeded.
    """
    if not local:
        raise click.UsageError("only --local runs are done here; on a cluster use `maestro submit`")
    files = [*([file] if file else []), *more]
    if not files and resume is None:
        raise click.UsageError("give a FILE to run or --resume RUN_ID")
    url = database_url or default_database_url()
    if database_url is None:
        state_dir().mkdir(parents=True, exist_ok=True)
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    code = asyncio.run(
        _run(
            url,
            file if resume is None else None,
            _parse_params(params),
            resume,
            console,
            no_cache,
            _library(files),
        )
    )
    sys.exit(code)
