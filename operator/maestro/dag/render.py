"""Mermaid and Graphviz DOT text of a workflow's DAG, optionally colored by task phase."""

from __future__ import annotations

import re
from collections.abc import Mapping

from maestro.api.models import WorkflowSpec
from maestro.api.phases import TaskPhase
from maestro.dag import fanout

# Fill colors per task phase, shared by both formats so a run looks the same in each.
PHASE_COLORS = {
    "Pending": "#e0e0e0",
    "Running": "#90caf9",
    "Succeeded": "#a5d6a7",
    "Failed": "#ef9a9a",
    "Skipped": "#fff59d",
    "Cancelled": "#bcaaa4",
}
_KIND_SHAPES = {
    "container": ("[", "]"),
    "http": ("([", "])"),
    "approval": ("{{", "}}"),
    "workflow": ("[[", "]]"),
}


def _mermaid_id(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", name)


def _grouped(
    spec: WorkflowSpec, phases: Mapping[str, str]
) -> tuple[dict[str, str], dict[str, str]]:
    """A fan-out is one node: its name with the instance count, and for a run the phase
    its instances sum up to with how many ended. Returns (label suffixes, phases)."""
    groups = fanout.instances_of(phases)
    suffix: dict[str, str] = {}
    merged = {n: p for n, p in phases.items() if fanout.split(n)[1] is None}
    for task in spec.all_tasks():
        if task.for_each is None:
            continue
        members = groups.get(task.name)
        count = len(members) if members else fanout.static_count(task.for_each)
        suffix[task.name] = f" [forEach: {count}]" if count is not None else " [forEach]"
        if members and task.name not in merged:
            states = [TaskPhase(phases[m]) for m in members]
            merged[task.name] = fanout.summary(states).value
            ended = sum(s.finished for s in states)
            suffix[task.name] += f" ({ended} ended)"
    return suffix, merged


def mermaid(spec: WorkflowSpec, phases: Mapping[str, str] | None = None) -> str:
    """A Mermaid ``flowchart`` of the DAG; finally tasks sit in their own subgraph."""
    suffix, phases = _grouped(spec, phases or {})
    lines = ["flowchart TD"]

    def node(task_name: str, kind: str) -> str:
        left, right = _KIND_SHAPES[kind]
        name = task_name + suffix.get(task_name, "")
        label = f"{name}: {phases[task_name]}" if task_name in phases else name
        return f'    {_mermaid_id(task_name)}{left}"{label}"{right}'

    for task in spec.tasks:
        lines.append(node(task.name, task.kind))
    if spec.finally_:
        lines.append("    subgraph finally")
        lines.extend("  " + node(t.name, t.kind) for t in spec.finally_)
        lines.append("    end")
    for task in spec.all_tasks():
        for dep in task.depends_on:
            lines.append(f"    {_mermaid_id(dep)} --> {_mermaid_id(task.name)}")
    for phase, color in PHASE_COLORS.items():
        members = [_mermaid_id(n) for n, p in phases.items() if p == phase]
        if members:
            lines.append(f"    classDef {phase.lower()} fill:{color}")
            lines.append(f"    class {','.join(members)} {phase.lower()}")
    return "\n".join(lines) + "\n"


def dot(spec: WorkflowSpec, phases: Mapping[str, str] | None = None) -> str:
    """A Graphviz digraph of the DAG (``dot -Tpng`` turns it into a picture)."""
    suffix, phases = _grouped(spec, phases or {})
    shapes = {"container": "box", "http": "oval", "approval": "hexagon", "workflow": "box3d"}
    lines = ["digraph workflow {", "  rankdir=TB;", '  node [style="rounded,filled"];']

    def node(task_name: str, kind: str) -> str:
        phase = phases.get(task_name)
        color = PHASE_COLORS.get(phase or "", "#ffffff")
        name = task_name + suffix.get(task_name, "")
        label = f"{name}\\n{phase}" if phase else name
        return f'  "{task_name}" [label="{label}", shape={shapes[kind]}, fillcolor="{color}"];'

    lines.extend(node(t.name, t.kind) for t in spec.tasks)
    if spec.finally_:
        lines.append('  subgraph cluster_finally { label="finally"; style=dashed;')
        lines.extend("  " + node(t.name, t.kind) for t in spec.finally_)
        lines.append("  }")
    for task in spec.all_tasks():
        lines.extend(f'  "{dep}" -> "{task.name}";' for dep in task.depends_on)
    lines.append("}")
    return "\n".join(lines) + "\n"
