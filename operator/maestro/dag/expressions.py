"""``when`` expressions: a safe, typed subset of Python over params and tasks.

Examples: ``params.env == 'prod'``, ``tasks.test.outputs.coverage >= 80``,
``tasks['build-x'].outputs.changed and run.outcome == 'Failed'``. Parsing uses
:mod:`ast` (to find references before a run exists); evaluation uses simpleeval
(no attribute access into Python objects, no calls but a few pure functions).

Evaluation has budgets, because a ``when`` is written by whoever may create a run
and is evaluated inside the operator's event loop: integers are capped at
:data:`MAX_INT_BITS` bits and strings/collections at :data:`MAX_LENGTH` items,
checked *before* an operation could build something larger (``3**4000000``,
``'x' * 10**8``); there are no loops (comprehensions), no methods (``ljust``), no
format specs (f-strings, ``%``), and the whole evaluation has a time budget checked
at every node. So every single operation is cheap and there are at most a few
hundred of them: one evaluation takes milliseconds at worst (docs/security.md).
"""

from __future__ import annotations

import ast
import operator
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from simpleeval import DEFAULT_OPERATORS, EvalWithCompoundTypes

from maestro.dag.templates import RUN_FIELDS, Context


def _str(value: Any) -> str:
    # str() of a collection could be far larger than the collection's item count.
    if not isinstance(value, str | int | float | bool | None):
        raise ExpressionError(
            f"str() takes a number, string or boolean, not {type(value).__name__}"
        )
    return str(value)


_FUNCTIONS = {"len": len, "int": int, "float": float, "str": _str, "bool": bool}

# Budgets of one evaluation (see the module docstring).
MAX_INT_BITS = 4096
MAX_LENGTH = 64 * 1024
MAX_NODES = 500
TIME_BUDGET_SECONDS = 0.25
# Syntax the evaluator refuses outright: loops, and formatting that sizes its own output.
_FORBIDDEN = {
    ast.ListComp: "comprehensions",
    ast.SetComp: "comprehensions",
    ast.DictComp: "comprehensions",
    ast.GeneratorExp: "comprehensions",
    ast.JoinedStr: "f-strings",
    ast.Lambda: "lambdas",
    ast.NamedExpr: "assignments",
    ast.Starred: "unpacking",
}


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


def _tree(expr: str) -> ast.Expression:
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError as err:
        raise ExpressionError(f"does not parse: {err.msg} at column {err.offset}") from None
    nodes = list(ast.walk(tree))
    if len(nodes) > MAX_NODES:
        raise ExpressionError(f"too long: {len(nodes)} syntax nodes, at most {MAX_NODES}")
    for node in nodes:
        if type(node) in _FORBIDDEN:
            raise ExpressionError(f"{_FORBIDDEN[type(node)]} are not allowed in expressions")
        if isinstance(node, ast.Attribute) and node.attr.startswith("_"):
            raise ExpressionError(f".{node.attr}: names starting with _ are not allowed")
    return tree


def _checked(expr: str) -> tuple[ast.Expression, list[ExprRef]]:
    tree = _tree(expr)
    refs = list(dict.fromkeys(_refs(tree)))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and not isinstance(node.func, ast.Name):
            raise ExpressionError(
                f"only the functions {', '.join(_FUNCTIONS)} may be called (no methods)"
            )
    for ref in refs:
        if ref.root == "run" and ref.name not in RUN_FIELDS:
            raise ExpressionError(f"run.{ref.name} is unknown (known: {', '.join(RUN_FIELDS)})")
    return tree, refs


def parse(expr: str) -> list[ExprRef]:
    """Parse an expression and list what it reads; ``ExpressionError`` when it cannot."""
    return _checked(expr)[1]


class BudgetExceeded(ExpressionError):
    """An evaluation that would outgrow its integer, length or time budget."""


def _bits(value: Any) -> int:
    return value.bit_length() if isinstance(value, int) else 0


def _length(value: Any) -> int:
    return len(value) if isinstance(value, str | bytes | list | tuple | dict | set) else 0


def _check(value: Any) -> Any:
    if _bits(value) > MAX_INT_BITS:
        raise BudgetExceeded(f"an integer over {MAX_INT_BITS} bits")
    if _length(value) > MAX_LENGTH:
        raise BudgetExceeded(f"a value over {MAX_LENGTH} characters or items")
    return value


def _pow(a: Any, b: Any) -> Any:
    big = isinstance(a, int) and isinstance(b, int) and b > 0 and abs(a) > 1
    if big and (a.bit_length() - 1) * b > MAX_INT_BITS:
        raise BudgetExceeded(f"{a} ** {b} would be over {MAX_INT_BITS} bits")
    return a**b


def _mul(a: Any, b: Any) -> Any:
    ints = isinstance(a, int) and isinstance(b, int)
    if ints and a.bit_length() + b.bit_length() > MAX_INT_BITS + 1:
        raise BudgetExceeded(f"a product over {MAX_INT_BITS} bits")
    for seq, times in ((a, b), (b, a)):
        if _length(seq) and isinstance(times, int) and _length(seq) * times > MAX_LENGTH:
            raise BudgetExceeded(f"a repetition over {MAX_LENGTH} characters or items")
    return a * b


def _add(a: Any, b: Any) -> Any:
    if _length(a) + _length(b) > MAX_LENGTH:
        raise BudgetExceeded(f"a concatenation over {MAX_LENGTH} characters or items")
    return a + b


def _lshift(a: Any, b: Any) -> Any:
    if isinstance(b, int) and _bits(a) + b > MAX_INT_BITS:
        raise BudgetExceeded(f"a shift over {MAX_INT_BITS} bits")
    return a << b


def _mod(a: Any, b: Any) -> Any:
    if isinstance(a, str | bytes):
        raise ExpressionError("string formatting with % is not allowed")
    return a % b


_OPERATORS: dict[type, Callable[..., Any]] = {
    **DEFAULT_OPERATORS,
    ast.Pow: _pow,
    ast.Mult: _mul,
    ast.Add: _add,
    ast.LShift: _lshift,
    ast.RShift: operator.rshift,  # can only shrink
    ast.Mod: _mod,
}


class _Evaluator(EvalWithCompoundTypes):  # type: ignore[misc]
    """simpleeval with budgets: sizes checked on every value, time at every node."""

    def __init__(self, names: dict[str, Any], deadline: float) -> None:
        # A copy: simpleeval adds its compound-type constructors to the dict it is given.
        super().__init__(operators=_OPERATORS, functions=dict(_FUNCTIONS), names=names)
        self.deadline = deadline

    def _eval(self, node: ast.AST) -> Any:
        if time.monotonic() > self.deadline:
            raise BudgetExceeded(f"evaluation took over {TIME_BUDGET_SECONDS}s")
        return _check(super()._eval(node))

    def _eval_attribute(self, node: ast.Attribute) -> Any:
        # Dot access is a key lookup on params/tasks/outputs, never a Python attribute.
        base = self._eval(node.value)
        if not isinstance(base, Mapping):
            raise ExpressionError(f".{node.attr}: only params, tasks, outputs and run have keys")
        if node.attr not in base:
            raise ExpressionError(f"no key {node.attr!r}")
        return base[node.attr]


def evaluate(expr: str, ctx: Context, phases: Mapping[str, str]) -> bool:
    """Evaluate to a boolean; a missing key, a type error or a budget breach is an error."""
    tree, _ = _checked(expr)
    tasks = {
        name: {"outputs": dict(ctx.outputs.get(name, {})), "phase": phase}
        for name, phase in phases.items()
    }
    evaluator = _Evaluator(
        {"params": dict(ctx.params), "tasks": tasks, "run": dict(ctx.run)},
        time.monotonic() + TIME_BUDGET_SECONDS,
    )
    try:
        value: Any = evaluator.eval(expr, previously_parsed=tree.body)
    except BudgetExceeded as err:
        raise BudgetExceeded(f"{expr!r} is over budget: {err}") from None
    except Exception as err:  # simpleeval raises many kinds; all mean "cannot evaluate"
        raise ExpressionError(f"cannot evaluate {expr!r}: {err}") from None
    return bool(value)
