"""The ``maestro`` command line: one entry point for every verb."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import click

from maestro import __version__
from maestro.api.crd import crds, render
from maestro.api.models import Workflow, WorkflowRun, WorkflowSpec
from maestro.cli.cluster import COMMANDS
from maestro.cli.db import db
from maestro.cli.files import load_file
from maestro.cli.history import history_cmd
from maestro.cli.operator import operator_cmd
from maestro.cli.run import run_cmd
from maestro.cli.schedules import schedule
from maestro.cli.server import server_cmd
from maestro.dag import render as graph_render
from maestro.dag.validate import (
    call_problems,
    resolve_params,
    shell_warnings,
    validate,
    workspace_warnings,
)


def fail(message: str) -> None:
    """Print one ``maestro: error:`` line and exit 1 (no traceback for user errors)."""
    click.echo(f"maestro: error: {message}", err=True)
    sys.exit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="maestro")
def cli() -> None:
    """Maestro runs DAG workflows on Kubernetes, with run history in PostgreSQL."""


@cli.command("validate")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
def validate_cmd(files: tuple[Path, ...]) -> None:
    """Check Workflow and WorkflowRun manifests; one line per problem, exit 1 if any.

    A WorkflowRun whose workflowRef names a Workflow in the files given is checked
    against it (its params must be declared there), as the operator will.
    """
    bad = 0
    checked = 0
    docs = [doc for path in files for doc in load_file(path)]
    workflows = {
        d.manifest.metadata.name: d.manifest.spec
        for d in docs
        if isinstance(d.manifest, Workflow) and d.manifest.metadata.name
    }
    for doc in docs:
        checked += 1
        lines = list(doc.problems)
        risky: list[str] = []
        if isinstance(doc.manifest, Workflow):
            lines += [str(p) for p in validate(doc.manifest.spec)]
            name = doc.manifest.metadata.name or ""
            lines += [str(p) for p in call_problems(name, workflows, all_known=False)]
            risky += [str(p) for p in shell_warnings(doc.manifest.spec)]
            risky += [str(p) for p in workspace_warnings(doc.manifest.spec)]
        elif isinstance(doc.manifest, WorkflowRun):
            run_spec = doc.manifest.spec
            if run_spec.workflow_spec:
                lines += [f"spec.workflowSpec: {p}" for p in validate(run_spec.workflow_spec)]
                lines += resolve_params(run_spec.workflow_spec, run_spec.params)[1]
                risky += [f"spec.workflowSpec: {p}" for p in shell_warnings(run_spec.workflow_spec)]
                risky += [
                    f"spec.workflowSpec: {p}" for p in workspace_warnings(run_spec.workflow_spec)
                ]
            elif run_spec.workflow_ref and run_spec.workflow_ref.name in workflows:
                known = workflows[run_spec.workflow_ref.name]
                lines += resolve_params(known, run_spec.params)[1]
        for line in risky:
            click.echo(f"{doc.where}: warning: {line}", err=True)
        for line in lines:
            click.echo(f"{doc.where}: {line}", err=True)
        bad += bool(lines)
    if bad:
        click.echo(f"{bad} of {checked} documents invalid", err=True)
        sys.exit(1)
    click.echo(f"{checked} documents valid")


def _spec_of(path: Path) -> WorkflowSpec:
    docs = load_file(path)
    for doc in docs:
        if doc.problems:
            fail(f"{doc.where}: {doc.problems[0]}")
        if isinstance(doc.manifest, Workflow):
            return doc.manifest.spec
        if isinstance(doc.manifest, WorkflowRun) and doc.manifest.spec.workflow_spec:
            return doc.manifest.spec.workflow_spec
    fail(f"{path}: no Workflow (or WorkflowRun with an inline workflowSpec) in it")
    raise AssertionError("unreachable")


@cli.command("graph")
@click.argument("file", type=click.Path(path_type=Path))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["mermaid", "dot", "png"]),
    default="mermaid",
    show_default=True,
)
@click.option("-o", "--output", type=click.Path(path_type=Path), help="File to write.")
def graph_cmd(file: Path, fmt: str, output: Path | None) -> None:
    """Draw a workflow's DAG as Mermaid, Graphviz DOT or PNG (PNG needs graphviz)."""
    spec = _spec_of(file)
    text = graph_render.mermaid(spec) if fmt == "mermaid" else graph_render.dot(spec)
    if fmt != "png":
        if output:
            output.write_text(text)
        else:
            click.echo(text, nl=False)
        return
    dot = shutil.which("dot")
    if dot is None:
        fail("PNG needs Graphviz's `dot` (apt-get install graphviz); use --format dot meanwhile")
    target = output or file.with_suffix(".png")
    subprocess.run([str(dot), "-Tpng", "-o", str(target)], input=text.encode(), check=True)
    click.echo(f"wrote {target}")


@cli.command("crds")
@click.option(
    "--write",
    "directory",
    type=click.Path(path_type=Path, file_okay=False),
    help="Write one file per CRD into this directory instead of printing.",
)
def crds_cmd(directory: Path | None) -> None:
    """Print (or write) the CustomResourceDefinitions generated from the models."""
    generated = crds()
    if directory is None:
        click.echo("---\n".join(render(c) for c in generated.values()), nl=False)
        return
    directory.mkdir(parents=True, exist_ok=True)
    for name, crd in generated.items():
        (directory / name).write_text(render(crd))
        click.echo(f"wrote {directory / name}")


cli.add_command(run_cmd)
cli.add_command(db)
cli.add_command(operator_cmd)
cli.add_command(history_cmd)
cli.add_command(server_cmd)
cli.add_command(schedule)
for command in COMMANDS:
    cli.add_command(command)


def main() -> None:
    """Console-script entry point."""
    cli()
