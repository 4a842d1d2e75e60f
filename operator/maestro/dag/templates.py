"""Templates in task fields: ``{{ params.x }}``, ``{{ tasks.t.outputs.k }}``, ``{{ run.id }}``,
and in a fan-out's instances ``{{ item }}`` / ``{{ item.key }}``.

Plain substitution, no logic: conditions belong in ``when`` expressions, where they
are typed. A reference that cannot be resolved is an error, never an empty string.

One filter exists: ``{{ params.msg | shquote }}`` renders the value as a single
POSIX shell word, for values pasted into ``sh -c`` scripts. Rendering is capped
(:data:`MAX_RENDERED`): a template cannot grow a task past what etcd or the store
would hold.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

_TEMPLATE = re.compile(r"\{\{\s*(.*?)\s*\}\}")
# A whole string that is one template: no braces inside, or "{{ a }} {{ b }}" would match.
_SOLE = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")
_PARAM = re.compile(r"^params\.([A-Za-z_][A-Za-z0-9_]*)$")
_OUTPUT = re.compile(r"^tasks\.([a-z0-9]([-a-z0-9]*[a-z0-9])?)\.outputs\.([-\w.]+)$")
_RUN = re.compile(r"^run\.(id|name|namespace|outcome)$")
_ITEM = re.compile(r"^item(\.([-\w.]+))?$")

RUN_FIELDS = ("id", "name", "namespace", "outcome")
FILTERS = {"shquote": shlex.quote}
# Characters one task's templates may expand to, all strings together.
MAX_RENDERED = 256 * 1024


@dataclass(frozen=True)
class Ref:
    """One reference found in a template."""

    kind: str  # "param", "output", "run" or "item"
    name: str  # param name, task name or run field ("item" for an item)
    key: str | None = None  # output key, for "output"; key path into the item, for "item"

    def __str__(self) -> str:
        if self.kind == "param":
            return f"params.{self.name}"
        if self.kind == "output":
            return f"tasks.{self.name}.outputs.{self.key}"
        if self.kind == "item":
            return "item" if self.key is None else f"item.{self.key}"
        return f"run.{self.name}"


class TemplateError(ValueError):
    """A template that does not parse or cannot be resolved."""


def parse_template(text: str) -> tuple[Ref, tuple[str, ...]]:
    """The inside of ``{{ ... }}``: the reference and its filters (``| shquote``)."""
    ref, *filters = (part.strip() for part in text.split("|"))
    for name in filters:
        if name not in FILTERS:
            raise TemplateError(
                f"unknown filter {name!r} in {{{{ {text} }}}} (known: {', '.join(FILTERS)})"
            )
    return parse_ref(ref), tuple(filters)


def parse_ref(text: str) -> Ref:
    """Parse a reference (the inside of ``{{ ... }}`` without filters)."""
    if m := _PARAM.match(text):
        return Ref("param", m.group(1))
    if m := _OUTPUT.match(text):
        return Ref("output", m.group(1), m.group(3))
    if m := _RUN.match(text):
        return Ref("run", m.group(1))
    if m := _ITEM.match(text):
        return Ref("item", "item", m.group(2))
    raise TemplateError(
        f"unknown template reference {{{{ {text} }}}}: expected params.NAME, "
        f"tasks.TASK.outputs.KEY, run.{'|'.join(RUN_FIELDS)}, item or item.KEY"
    )


def sole_ref(text: str) -> Ref:
    """The reference of a string that is one ``{{ ... }}`` and nothing else (no filters)."""
    m = _SOLE.fullmatch(text.strip())
    if m is None:
        raise TemplateError(
            f"{text!r} must be one template and nothing else, e.g. {{{{ params.P }}}}"
        )
    ref, filters = parse_template(m.group(1))
    if filters:
        raise TemplateError(f"{text!r}: filters make no sense here (the value is a list)")
    return ref


def refs_in(text: str) -> Iterator[Ref]:
    """Every reference in one string; raises ``TemplateError`` on the first bad one."""
    for m in _TEMPLATE.finditer(text):
        yield parse_template(m.group(1))[0]


def unquoted_in(text: str) -> Iterator[Ref]:
    """References in ``text`` that are not shell-quoted (no ``| shquote``)."""
    for m in _TEMPLATE.finditer(text):
        ref, filters = parse_template(m.group(1))
        if "shquote" not in filters:
            yield ref


def strings_in(value: Any) -> Iterator[str]:
    """Every string inside a JSON-like value (where templates may appear)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from strings_in(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from strings_in(v)


class _NoItem:
    """The item of a task that does not fan out (None is a valid item)."""


NO_ITEM: Any = _NoItem()


@dataclass(frozen=True)
class Context:
    """Values templates and expressions read."""

    params: Mapping[str, str]
    outputs: Mapping[str, Mapping[str, Any]]
    run: Mapping[str, str]
    item: Any = NO_ITEM  # the instance's item, in a fan-out

    def lookup(self, ref: Ref) -> Any:
        """The value of one reference; ``TemplateError`` says exactly what is missing."""
        if ref.kind == "item":
            return self._item(ref)
        if ref.kind == "param":
            if ref.name not in self.params:
                raise TemplateError(f"param {ref.name!r} has no value")
            return self.params[ref.name]
        if ref.kind == "run":
            if ref.name not in self.run:
                raise TemplateError(f"run.{ref.name} is not known yet")
            return self.run[ref.name]
        outputs = self.outputs.get(ref.name)
        if outputs is None:
            raise TemplateError(f"task {ref.name!r} has no outputs (it did not succeed)")
        value: Any = outputs
        assert ref.key is not None
        for part in ref.key.split("."):
            if not isinstance(value, Mapping) or part not in value:
                keys = ", ".join(sorted(outputs)) or "none"
                raise TemplateError(
                    f"task {ref.name!r} has no output {ref.key!r} (its outputs: {keys})"
                )
            value = value[part]
        return value

    def _item(self, ref: Ref) -> Any:
        if self.item is NO_ITEM:
            raise TemplateError(f"{{{{ {ref} }}}} is only known in a task with forEach")
        value = self.item
        for part in ref.key.split(".") if ref.key else ():
            if not isinstance(value, Mapping) or part not in value:
                raise TemplateError(f"item {json.dumps(self.item)[:120]} has no key {ref.key!r}")
            value = value[part]
        return value


class _Budget:
    """Characters left to render; a template that would pass it fails, naming the cap."""

    def __init__(self, limit: int) -> None:
        self.limit = self.left = limit

    def spend(self, n: int) -> None:
        self.left -= n
        if self.left < 0:
            raise TemplateError(
                f"templates expand to over {self.limit} characters; pass large values "
                "through outputs files or $MAESTRO_INPUTS instead"
            )


def render(text: str, ctx: Context, budget: _Budget | None = None) -> str:
    """Expand every template in ``text``; JSON values that are not strings are dumped."""
    budget = budget or _Budget(MAX_RENDERED)
    budget.spend(len(text))

    def sub(m: re.Match[str]) -> str:
        ref, filters = parse_template(m.group(1))
        value = ctx.lookup(ref)
        text = value if isinstance(value, str) else json.dumps(value)
        for name in filters:
            text = FILTERS[name](text)
        budget.spend(len(text))
        return text

    return _TEMPLATE.sub(sub, text)


def render_value(text: str, ctx: Context) -> Any:
    """A value that is one template keeps the JSON type it refers to (a list stays a
    list); any other text is rendered as a string."""
    m = _SOLE.fullmatch(text.strip())
    if m is not None:
        ref, filters = parse_template(m.group(1))
        if not filters:
            return ctx.lookup(ref)
    return render(text, ctx)


def render_all(value: Any, ctx: Context, budget: _Budget | None = None) -> Any:
    """Expand templates in every string of a JSON-like value (one budget for all)."""
    budget = budget or _Budget(MAX_RENDERED)
    if isinstance(value, str):
        return render(value, ctx, budget)
    if isinstance(value, Mapping):
        return {k: render_all(v, ctx, budget) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [render_all(v, ctx, budget) for v in value]
    return value
