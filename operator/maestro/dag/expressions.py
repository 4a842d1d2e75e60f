"""``when`` expressions: a safe, typed subset of Python over params and tasks.

Examples: ``params.env == 'prod'``, ``tasks.test.outputs.coverage >= 80``,
``tasks['build-x'].outputs.changed and run.outcome == 'Failed'``. Parsing uses
:mod:`ast` (to find references before a run exists); evaluation uses simpleeval
(no attribute access into Python objects, no calls but a few pure functions).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from simpleeval import EvalWithCompoundTypes

from maestro.dag.templates import RUN_FIELDS, Context

_FUNCTIONS = {"len": len, "int": int, "float": float, "str": str, "bool": bool}


class ExpressionError(ValueError):
    """An expression that does not parse, names something unknown or fails to evaluate."""


@dataclass(frozen=True)
class ExprRef:
    """A name an expression reads: ``params.x``, ``tasks.t`` (outputs or phase) or ``run.f``."""

    root: str
    name: str


def _key(node: ast.expr) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    return None


def _refs(tree: ast.AST) -> Iterator[ExprRef]:
    roots = ("params", "tasks", "run")
    bases = {
        id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Attribute | ast.Subscript)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            if node.id in roots and id(node) not in bases:
                raise ExpressionError(f"{node.id!r} must be followed by a name, e.g. {node.id}.x")
            if node.id not in roots and node.id not in _FUNCTIONS:
                raise ExpressionError(
                    f"unknown name {node.id!r} (use params.X, tasks.T.outputs.K or run.F)"
                )
        elif isinstance(node, ast.Attribute | ast.Subscript) and isinstance(node.value, ast.Name):
            if node.value.id not in roots:
                continue
            name = node.attr if isinstance(node, ast.Attribute) else _key(node.slice)
            if name is None:
                raise ExpressionError(f"{node.value.id}[...] needs a string literal key")
            yield ExprRef(node.value.id, name)


def parse(expr: str) -> list[ExprRef]:
    """Parse an expression and list what it reads; ``ExpressionError`` when it cannot."""
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError as err:
        raise ExpressionError(f"does not parse: {err.msg} at column {err.offset}") from None
    refs = list(dict.fromkeys(_refs(tree)))
    for ref in refs:
        if ref.root == "run" and ref.name not in RUN_FIELDS:
            raise ExpressionError(f"run.{ref.name} is unknown (known: {', '.join(RUN_FIELDS)})")
    return refs


def evaluate(expr: str, ctx: Context, phases: Mapping[str, str]) -> bool:
    """Evaluate to a boolean; a missing key or a type error is an ``ExpressionError``."""
    tasks = {
        name: {"outputs": dict(ctx.outputs.get(name, {})), "phase": phase}
        for name, phase in phases.items()
    }
    evaluator = EvalWithCompoundTypes(
        names={"params": dict(ctx.params), "tasks": tasks, "run": dict(ctx.run)},
        functions=_FUNCTIONS,
    )
    try:
        value: Any = evaluator.eval(expr)
    except Exception as err:  # simpleeval raises many kinds; all mean "cannot evaluate"
        raise ExpressionError(f"cannot evaluate {expr!r}: {err}") from None
    return bool(value)
