"""Fan-out: a task with ``forEach`` runs as instances ``task[0]``, ``task[1]``, ... Pure.

The items come from the task itself (``items``, or a ``matrix`` of lists) or from one
template (``from: "{{ tasks.list.outputs.files }}"``), read when the task becomes
ready: an upstream's outputs and the params never change once known, so the same
state always expands to the same instances (the engine relies on that after a
restart). Expanding is bounded twice: the list's JSON size (:data:`MAX_ITEMS_BYTES`)
before it is parsed, and the instance count (``MAX_INSTANCES``) before a matrix's
product is built.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from itertools import product
from typing import Any

from maestro.api.models import MAX_INSTANCES, ForEach, Task
from maestro.api.phases import TaskPhase
from maestro.dag import templates

# JSON characters one fan-out's list (or all of a matrix's lists) may take.
MAX_ITEMS_BYTES = 256 * 1024
_INSTANCE = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?)\[([0-9]+)\]$")


class FanOutError(ValueError):
    """A fan-out whose list cannot be read or is too large; the message names the task."""


def instance_name(task: str, index: int) -> str:
    """The name of instance ``index`` of ``task`` in the store, status and CLI."""
    return f"{task}[{index}]"


def split(name: str) -> tuple[str, int | None]:
    """``("build", 3)`` for ``build[3]``; ``(name, None)`` for a task that is no instance."""
    m = _INSTANCE.match(name)
    return (m.group(1), int(m.group(3))) if m else (name, None)


def base(name: str) -> str:
    """The task an instance belongs to (a task's own name for a task)."""
    return split(name)[0]


def label_value(name: str) -> str:
    """A Kubernetes label value for a task or instance name: ``build[3]`` -> ``build.3``.

    Task names are DNS labels (no dots), so the result names one instance only.
    """
    task, index = split(name)
    return task if index is None else f"{task}.{index}"


def sources(for_each: ForEach) -> list[str]:
    """The ``from`` templates of a fan-out (its own and its matrix axes')."""
    found = [for_each.from_] if for_each.from_ is not None else []
    found += [a.from_ for a in for_each.matrix or () if a.from_ is not None]
    return found


def static_count(for_each: ForEach) -> int | None:
    """How many instances a fan-out has when no list is read at run time, else None."""
    if for_each.items is not None:
        return len(for_each.items)
    if for_each.matrix is not None and all(a.items is not None for a in for_each.matrix):
        return math.prod(len(a.items or ()) for a in for_each.matrix)
    return None


def too_many(task: str, count: int) -> str:
    """The problem of a fan-out with ``count`` instances."""
    return (
        f"forEach of task {task!r} has {count} instances, more than the limit of "
        f"{MAX_INSTANCES}: split the list, or fan out over batches"
    )


def _read(task: str, text: str, ctx: templates.Context) -> list[Any]:
    """The list one ``from`` template holds (a JSON list, or a string of one)."""
    try:
        value = ctx.lookup(templates.sole_ref(text))
    except templates.TemplateError as err:
        raise FanOutError(f"forEach of task {task!r}: {err}") from None
    if isinstance(value, str):
        if len(value) > MAX_ITEMS_BYTES:
            raise FanOutError(
                f"forEach of task {task!r}: {text} is {len(value)} characters, over the "
                f"limit of {MAX_ITEMS_BYTES}"
            )
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise FanOutError(
                f"forEach of task {task!r}: {text} is not a JSON list ({err.msg}): {value[:80]!r}"
            ) from None
    if not isinstance(value, list):
        raise FanOutError(
            f"forEach of task {task!r}: {text} must hold a JSON list, got {type(value).__name__}"
        )
    return value


def items(task: Task, ctx: templates.Context) -> list[Any]:
    """The items of ``task``'s instances, in order; a matrix's are ``{axis: value}``."""
    fe = task.for_each
    assert fe is not None
    if fe.matrix is None:
        values = fe.items if fe.items is not None else _read(task.name, fe.from_ or "", ctx)
        _check_size(task.name, [values])
        return list(values)
    axes = [
        (a.name, a.items if a.items is not None else _read(task.name, a.from_ or "", ctx))
        for a in fe.matrix
    ]
    # The count first: a product of a few long lists is far larger than its inputs.
    _check_size(task.name, [v for _, v in axes], count=math.prod(len(v) for _, v in axes))
    names = [n for n, _ in axes]
    return [dict(zip(names, combo, strict=True)) for combo in product(*(v for _, v in axes))]


def _check_size(task: str, lists: Sequence[Sequence[Any]], count: int | None = None) -> None:
    count = len(lists[0]) if count is None else count
    if count > MAX_INSTANCES:
        raise FanOutError(too_many(task, count))
    size = sum(len(json.dumps(v, separators=(",", ":"))) for v in lists)
    if size > MAX_ITEMS_BYTES:
        raise FanOutError(
            f"forEach of task {task!r}: its items take {size} characters of JSON, over "
            f"the limit of {MAX_ITEMS_BYTES}"
        )


def collect(outputs: Iterable[Mapping[str, Any] | None]) -> dict[str, list[Any]]:
    """A fan-out's outputs: each key as a list in item order (null where one lacks it)."""
    rows = [dict(o or {}) for o in outputs]
    keys = dict.fromkeys(k for row in rows for k in row)
    return {k: [row.get(k) for row in rows] for k in keys}


def instances_of(names: Iterable[str]) -> dict[str, list[str]]:
    """Instance names grouped by their task, each group in item order."""
    groups: dict[str, list[tuple[int, str]]] = {}
    for name in names:
        task, index = split(name)
        if index is not None:
            groups.setdefault(task, []).append((index, name))
    return {t: [n for _, n in sorted(g)] for t, g in groups.items()}


def rows(tasks: Iterable[str], recorded: Iterable[str]) -> list[tuple[str, list[str]]]:
    """Each task with its instances in item order, for tables and status."""
    groups = instances_of(recorded)
    return [(t, groups.get(t, [])) for t in tasks]


def summary(phases: Sequence[TaskPhase]) -> TaskPhase:
    """One phase for a fan-out's row, from its instances' latest phases: Running while
    any runs or waits, then the first of Failed, Cancelled and Skipped any ended in."""
    if any(not p.finished for p in phases):
        return TaskPhase.RUNNING if TaskPhase.RUNNING in phases else TaskPhase.PENDING
    for phase in (TaskPhase.FAILED, TaskPhase.CANCELLED, TaskPhase.SKIPPED):
        if phase in phases:
            return phase
    return TaskPhase.SUCCEEDED


def progress(phases: Sequence[TaskPhase]) -> str:
    """A fan-out row's message: how many of its instances ended."""
    return f"{sum(p.finished for p in phases)}/{len(phases)} instances ended"
