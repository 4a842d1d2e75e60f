"""A layered left-to-right layout of a workflow's DAG, computed here so the browser only draws.

Layer = longest path from a root (so every edge points right); within a layer, nodes are
ordered by the mean position of their parents (one barycenter sweep), which keeps most
edges short. O(V + E): a 1,000-task run lays out in milliseconds.
"""

from __future__ import annotations

from typing import Any

from maestro.api.models import WorkflowSpec
from maestro.dag.validate import plan

NODE_WIDTH = 170
NODE_HEIGHT = 34
GAP_X = 60
GAP_Y = 14
MARGIN = 20


def layout(spec: WorkflowSpec) -> dict[str, Any]:
    """Node positions (top-left corner), edges and the drawing's size, in pixels."""
    steps = plan(spec)
    layer: dict[str, int] = {}
    # Finally tasks come after the whole main DAG, in their own layers.
    for graph in (steps.main, steps.final):
        base = max(layer.values(), default=-1) + 1
        for name in graph.topological_order():
            layer[name] = max((layer[d] + 1 for d in graph.deps[name]), default=base)
    columns: dict[int, list[str]] = {}
    for graph in (steps.main, steps.final):
        for name in graph.topological_order():
            columns.setdefault(layer[name], []).append(name)
    row: dict[str, float] = {}
    parents = {**steps.main.deps, **steps.final.deps}
    for index in sorted(columns):
        names = columns[index]

        def weight(name: str) -> float:
            ups = [row[d] for d in parents[name] if d in row]
            return sum(ups) / len(ups) if ups else float("inf")

        # Roots keep their declared order after the placed ones (stable sort).
        names.sort(key=weight)
        for i, name in enumerate(names):
            row[name] = i
    finally_names = {t.name for t in spec.finally_}
    nodes = [
        {
            "name": name,
            "x": MARGIN + layer[name] * (NODE_WIDTH + GAP_X),
            "y": MARGIN + int(row[name]) * (NODE_HEIGHT + GAP_Y),
            "finally": name in finally_names,
        }
        for name in layer
    ]
    edges = [[d, name] for name in layer for d in parents[name]]
    depth = max(layer.values(), default=0) + 1
    height = max((len(c) for c in columns.values()), default=1)
    return {
        "nodes": nodes,
        "edges": edges,
        "nodeWidth": NODE_WIDTH,
        "nodeHeight": NODE_HEIGHT,
        "width": 2 * MARGIN + depth * (NODE_WIDTH + GAP_X) - GAP_X,
        "height": 2 * MARGIN + height * (NODE_HEIGHT + GAP_Y) - GAP_Y,
    }
