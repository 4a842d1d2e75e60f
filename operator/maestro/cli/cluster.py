"""Cluster verbs: submit, get, watch, logs, approve, cancel, retry (through the API server).

They follow kubectl's conventions: the namespace comes from the kubeconfig's current
context unless ``-n`` says otherwise, ``get`` takes ``-A`` and ``-o json|yaml|wide``, and
every mistake ends with one ``Error:`` line and a non-zero exit.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

import click
import yaml
from pydantic import ValidationError
from rich.console import Console
from rich.live import Live
from rich.table import Table

from maestro.api.models import WorkflowSpec
from maestro.cli import columns
from maestro.cli.run import default_database_url
from maestro.dag import fanout
from maestro.dag.validate import plan, resolve_params, validate
from maestro.executors.container import LABEL_RUN, LABEL_TASK, run_label
from maestro.k8s.client import (
    APIError,
    Conflict,
    Kube,
    NotFound,
    load_config,
    retry_manifest,
    run_manifest,
)
from maestro.k8s.config import ConfigError, current_namespace
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
        # ``what`` names the object ("workflowrun NS/NAME"); the API's own text repeats it.
        raise click.ClickException(f"{err.what} not found") from None
    except (ConfigError, APIError) as err:
        raise click.ClickException(str(err)) from None


def _namespace(namespace: str | None, kubeconfig: str | None) -> str:
    """``-n``, else the current context's namespace (as kubectl), else ``default``."""
    try:
        return namespace or current_namespace(kubeconfig)
    except ConfigError as err:
        raise click.ClickException(str(err)) from None


def _common(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option(
        "-n", "--namespace", help="Default: the kubeconfig context's namespace, else default."
    )(f)
    return click.option("--kubeconfig", envvar="KUBECONFIG", help="Default: ~/.kube/config.")(f)


def _age(ts: str | None) -> str:
    if not ts:
        return ""
    secs = int(
        (datetime.now(UTC) - datetime.fromisoformat(ts.replace("Z", "+00:00"))).total_seconds()
    )
    return f"{secs // 3600}h{secs % 3600 // 60}m" if secs >= 3600 else f"{secs // 60}m{secs % 60}s"


def _snapshot(obj: Mapping[str, Any]) -> WorkflowSpec | None:
    """The run's workflow snapshot from its status (None when left out or unreadable)."""
    raw = (obj.get("status") or {}).get("workflowSpec")
    if not raw:
        return None
    try:
        return WorkflowSpec.model_validate(raw)
    except ValidationError:
        return None


def task_order(obj: Mapping[str, Any]) -> list[str]:
    """A run's tasks in DAG order (dependencies first), finally tasks last.

    The API server stores ``status.tasks`` with its keys sorted; the snapshot in
    status gives the real order. Without it: by start time, never-started last.
    """
    tasks: Mapping[str, Any] = (obj.get("status") or {}).get("tasks") or {}
    spec = _snapshot(obj)
    if spec is not None and not validate(spec):
        order = list(plan(spec).order)
        return order + sorted(set(tasks) - set(order))
    return sorted(tasks, key=lambda n: (tasks[n].get("startedAt") or "~", n))


def _tasks_table(obj: dict[str, Any]) -> Table:
    status = obj.get("status") or {}
    meta = obj["metadata"]
    phase = status.get("phase", "Pending")
    title = f"{meta['name']}  {phase}  {status.get('progress', '')}  {status.get('message', '')}"
    table = Table(title=title, title_justify="left")
    # Names, phases and times never wrap; the message takes what is left of the line.
    table.add_column("task", no_wrap=True)
    table.add_column("phase", no_wrap=True)
    table.add_column("try", no_wrap=True, justify="right")
    table.add_column("started", no_wrap=True)
    table.add_column("message", overflow="fold", ratio=1)
    tasks = status.get("tasks") or {}
    for name in task_order(obj):
        t = tasks.get(name) or {"phase": "Pending"}
        color = _COLORS.get(t.get("phase", ""), "white")
        table.add_row(
            name,
            f"[{color}]{t.get('phase', '')}[/]",
            str(t.get("attempts", 0)),
            (t.get("startedAt") or "")[11:19],
            t.get("message", ""),
        )
    return table


def _runs_list(items: list[dict[str, Any]], *, all_namespaces: bool, wide: bool) -> str:
    headers = ["namespace"] if all_namespaces else []
    headers += ["name", "phase", "done", "age", "took"]
    if wide:
        headers += ["workflow", "run id"]
    headers.append("message")
    rows = []
    for obj in items:
        st = obj.get("status") or {}
        meta = obj["metadata"]
        row = [meta.get("namespace", "")] if all_namespaces else []
        row += [
            meta["name"],
            st.get("phase", ""),
            st.get("progress", ""),
            _age(meta.get("creationTimestamp")),
            st.get("duration") or _age(st.get("startedAt")),  # running: time since start
        ]
        if wide:
            row += [st.get("workflowName") or "", st.get("runId") or ""]
        row.append(st.get("message", ""))
        rows.append(row)
    # Like kubectl: -o wide shows whole messages, whatever the terminal's width.
    return columns.render(headers, rows, full=wide)


def _dump(obj: Any, output: str) -> None:
    if output == "json":
        click.echo(json.dumps(obj, indent=2))
    else:
        click.echo(yaml.safe_dump(obj, sort_keys=False), nl=False)


_output = click.option(
    "-o",
    "--output",
    type=click.Choice(["json", "yaml", "wide"]),
    help="json/yaml: the objects as the API server has them; wide: more columns.",
)


async def _follow(kube: Kube, namespace: str, run: str, interval: float, show: bool) -> str:
    """Poll RUN until it finishes (a live table when ``show``); its final phase."""
    console = Console()
    live = Live(console=console, auto_refresh=False) if show else None
    if live is not None:
        live.start()
    try:
        while True:
            obj = await kube.get_run(namespace, run)
            if live is not None:
                live.update(_tasks_table(obj), refresh=True)
            phase = str((obj.get("status") or {}).get("phase", ""))
            if phase in _FINISHED:
                return phase
            await asyncio.sleep(interval)
    finally:
        if live is not None:
            live.stop()


@click.command("submit")
@click.argument("workflow")
@click.option("-p", "--param", "params", multiple=True, metavar="KEY=VALUE")
@click.option("--name", help="Run name (default: WORKFLOW- plus a random suffix).")
@click.option("--watch", is_flag=True, help="Show the run's tasks live until it ends.")
@click.option("--wait", is_flag=True, help="Wait quietly until the run ends.")
@click.option("--interval", default=1.0, show_default=True, help="Seconds between refreshes.")
@click.option(
    "--no-cache", is_flag=True, help="Run cached tasks again (sets spec.noCache on the run)."
)
@_common
def submit_cmd(
    workflow: str,
    params: tuple[str, ...],
    name: str | None,
    watch: bool,
    wait: bool,
    interval: float,
    no_cache: bool,
    namespace: str | None,
    kubeconfig: str | None,
) -> None:
    """Start a run of WORKFLOW; prints the WorkflowRun's name.

    With --watch or --wait, exit 0 only when the run Succeeded.
    """
    ns = _namespace(namespace, kubeconfig)
    values = {}
    for item in params:
        key, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r}: expected key=value", param_hint="-p")
        values[key] = value
    body = run_manifest(workflow, values, name=name, no_cache=no_cache)

    async def submit(kube: Kube) -> str | None:
        # Checked here too, so a typo fails now rather than as a run stuck Pending.
        try:
            found = await kube.get_workflow(ns, workflow)
        except NotFound:
            raise click.ClickException(
                f"workflow {workflow!r} not found in namespace {ns!r}"
            ) from None
        try:
            spec = WorkflowSpec.model_validate(found.get("spec") or {})
        except ValidationError:
            spec = None  # the operator reports an invalid Workflow on the run
        if spec is not None:
            problems = resolve_params(spec, values)[1]
            if problems:
                raise click.ClickException(f"workflow {workflow!r}: " + "; ".join(problems))
        created = await kube.create_run(ns, body)
        run = str(created["metadata"]["name"])
        click.echo(run)
        if not (watch or wait):
            return None
        return await _follow(kube, ns, run, interval, show=watch)

    phase = _call(kubeconfig, submit)
    if phase is not None and phase != "Succeeded":
        sys.exit(1)


@click.command("get")
@click.argument("run", required=False)
@click.option("-A", "--all-namespaces", is_flag=True, help="List runs of every namespace.")
@_output
@_common
def get_cmd(
    run: str | None,
    all_namespaces: bool,
    output: str | None,
    namespace: str | None,
    kubeconfig: str | None,
) -> None:
    """List runs, or show one run's tasks (in DAG order, finally tasks last)."""
    console = Console()
    if run is not None:
        ns = _namespace(namespace, kubeconfig)
        obj = _call(kubeconfig, lambda k: k.get_run(ns, run))
        if output in ("json", "yaml"):
            _dump(obj, output)
        else:
            console.print(_tasks_table(obj))
        return
    ns_or_all = None if all_namespaces else _namespace(namespace, kubeconfig)
    items = _call(kubeconfig, lambda k: k.list_runs(ns_or_all))
    if output in ("json", "yaml"):
        _dump({"apiVersion": "v1", "kind": "List", "items": items}, output)
        return
    if not items:
        where = "any namespace" if ns_or_all is None else f"namespace {ns_or_all!r}"
        click.echo(f"No runs in {where}.", err=True)
        return
    click.echo(_runs_list(items, all_namespaces=all_namespaces, wide=output == "wide"))


@click.command("watch")
@click.argument("run")
@click.option("--interval", default=1.0, show_default=True, help="Seconds between refreshes.")
@_common
def watch_cmd(run: str, interval: float, namespace: str | None, kubeconfig: str | None) -> None:
    """Show a run's tasks live until it finishes; exit 0 only when it Succeeded."""
    ns = _namespace(namespace, kubeconfig)
    phase = _call(kubeconfig, lambda k: _follow(k, ns, run, interval, show=True))
    sys.exit(0 if phase == "Succeeded" else 1)


async def _print_logs(
    kube: Kube, namespace: str, run: str, task: str | None, follow: bool
) -> tuple[int, int]:
    """Print each pod's log once, oldest first; (pods seen, logs fetched)."""
    selector = f"{LABEL_RUN}={run_label(run)}" + (
        f",{LABEL_TASK}={fanout.label_value(task)}" if task else ""
    )
    done: set[str] = set()
    fetched = 0
    while True:
        for pod in await kube.list_pods(namespace, selector):
            meta, status = pod["metadata"], pod.get("status") or {}
            name = meta["name"]
            if name in done:
                continue
            ended = status.get("phase") in ("Succeeded", "Failed")
            if follow and not ended and status.get("phase") != "Running":
                continue  # not started yet: its turn comes on a later round
            done.add(name)
            labels = meta.get("labels") or {}
            click.echo(
                f"==> {labels.get(LABEL_TASK)} attempt {labels.get('maestro.dev/attempt')} ({name})"
            )
            try:
                if follow and not ended:
                    async for chunk in kube.follow_pod_log(namespace, name):
                        click.echo(chunk.decode(errors="replace"), nl=False)
                else:
                    click.echo(await kube.pod_log(namespace, name), nl=False)
                fetched += 1
            except NotFound as err:
                click.echo(f"(no log: {err})")
        if not follow:
            return len(done), fetched
        phase = (await kube.get_run(namespace, run)).get("status", {}).get("phase")
        if phase in _FINISHED:
            pods = await kube.list_pods(namespace, selector)
            if {p["metadata"]["name"] for p in pods} <= done:
                return len(done), fetched
        await asyncio.sleep(1.0)


@click.command("logs")
@click.argument("run")
@click.argument("task", required=False)
@click.option("-f", "--follow", is_flag=True, help="Stream new logs until the run ends.")
@_common
def logs_cmd(
    run: str, task: str | None, follow: bool, namespace: str | None, kubeconfig: str | None
) -> None:
    """Print the container logs of a run's tasks (every attempt, oldest first)."""
    ns = _namespace(namespace, kubeconfig)
    what = f"run {run!r}" + (f" task {task!r}" if task else "")

    async def read(kube: Kube) -> None:
        await kube.get_run(ns, run)  # a typo in the run's name says so
        pods, fetched = await _print_logs(kube, ns, run, task, follow)
        if not pods:
            raise click.ClickException(f"no pods for {what} in namespace {ns!r}")
        if not fetched:
            raise click.ClickException(f"no logs could be fetched for {what} ({pods} pods)")

    _call(kubeconfig, read)


async def _patch_spec(
    kube: Kube,
    namespace: str,
    run: str,
    change: Callable[[dict[str, Any]], dict[str, Any]],
    check: Callable[[dict[str, Any]], None] = lambda obj: None,
    user: str | None = None,
) -> None:
    """:meth:`Kube.change_run_spec` made as the caller's user (``user``, else asked of the
    API server), so the operator records who did it; ``check`` refuses the edit
    (raising ClickException) after each read."""
    try:
        await kube.change_run_spec(
            namespace, run, change, check=check, field_manager=user or await kube.whoami()
        )
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


def _not_finished(run: str, verb: str) -> Callable[[dict[str, Any]], None]:
    def check(obj: dict[str, Any]) -> None:
        phase = (obj.get("status") or {}).get("phase")
        if phase in _FINISHED:
            raise click.ClickException(f"run {run!r} already {phase}: nothing to {verb}")

    return check


def _approval_gate(run: str, task: str) -> Callable[[dict[str, Any]], None]:
    def check(obj: dict[str, Any]) -> None:
        _not_finished(run, "approve")(obj)
        spec = _snapshot(obj)
        if spec is None:
            if task not in ((obj.get("status") or {}).get("tasks") or {}):
                raise click.ClickException(f"run {run!r} has no task {task!r} (yet)")
            return
        gates = sorted(t.name for t in spec.all_tasks() if t.kind == "approval")
        if task not in gates:
            known = "has no task" if task not in {t.name for t in spec.all_tasks()} else "task"
            tail = "" if known == "has no task" else " is not an approval gate"
            raise click.ClickException(
                f"run {run!r} {known} {task!r}{tail} (approval gates: {', '.join(gates) or 'none'})"
            )

    return check


@click.command("approve")
@click.argument("run")
@click.argument("task")
@click.option("-m", "--comment", help="Recorded with the approval (maestro history).")
@_local
@_database
@_common
def approve_cmd(
    run: str,
    task: str,
    comment: str | None,
    local: bool,
    database_url: str | None,
    namespace: str | None,
    kubeconfig: str | None,
) -> None:
    """Open approval gate TASK of RUN (adds it to spec.approvals, or to a local run's store).

    The approver recorded is your Kubernetes user (as the API server authenticates you).
    """
    if local:
        actor = os.environ.get("USER", "cli")
        _local_store_call(
            database_url, lambda s: s.approve(run, task, actor=actor, comment=comment)
        )
        click.echo(f"approved {task} in {run}")
        return
    ns = _namespace(namespace, kubeconfig)

    async def approve(kube: Kube) -> str:
        user = await kube.whoami()

        def add(spec: dict[str, Any]) -> dict[str, Any]:
            note = {"by": user, **({"comment": comment} if comment else {})}
            return {
                "approvals": sorted({*(spec.get("approvals") or []), task}),
                "approvalNotes": {task: note},
            }

        await _patch_spec(kube, ns, run, add, _approval_gate(run, task), user)
        return user

    user = _call(kubeconfig, approve)
    click.echo(f"approved {task} in {run} as {user}")


@click.command("cancel")
@click.argument("run")
@_local
@_database
@_common
def cancel_cmd(
    run: str, local: bool, database_url: str | None, namespace: str | None, kubeconfig: str | None
) -> None:
    """Cancel RUN: running tasks are stopped, finally tasks run, the run ends Cancelled."""
    if local:
        _local_store_call(database_url, lambda s: s.update_controls(run, cancel=True))
    else:
        ns = _namespace(namespace, kubeconfig)
        _call(
            kubeconfig,
            lambda k: _patch_spec(
                k, ns, run, lambda _: {"cancel": True}, _not_finished(run, "cancel")
            ),
        )
    click.echo(f"cancelling {run}")


@click.command("retry")
@click.argument("run")
@_common
def retry_cmd(run: str, namespace: str | None, kubeconfig: str | None) -> None:
    """Start a new run of RUN's workflow snapshot that reuses its succeeded tasks' outputs.

    Tasks that did not succeed, and every finally task, run again.
    """
    ns = _namespace(namespace, kubeconfig)

    async def retry(kube: Kube) -> str:
        old = await kube.get_run(ns, run)
        run_id = (old.get("status") or {}).get("runId")
        if not run_id:
            raise click.ClickException(f"run {run!r} has not started, there is nothing to retry")
        created = await kube.create_run(ns, retry_manifest(old, run_id))
        return str(created["metadata"]["name"])

    click.echo(_call(kubeconfig, retry))


COMMANDS = [submit_cmd, get_cmd, watch_cmd, logs_cmd, approve_cmd, cancel_cmd, retry_cmd]
