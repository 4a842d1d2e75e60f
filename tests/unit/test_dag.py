"""Graph algorithms and semantic validation of workflows."""

from typing import Any

import pytest

from maestro.api.models import WorkflowSpec
from maestro.dag import expressions, templates
from maestro.dag.graph import Graph
from maestro.dag.validate import plan, resolve_params, validate


def spec(*tasks: dict[str, Any], **extra: Any) -> WorkflowSpec:
    full = [{"container": {"image": "busybox"}, **t} for t in tasks]
    return WorkflowSpec.model_validate({"tasks": full, **extra})


def messages(s: WorkflowSpec) -> list[str]:
    return [str(p) for p in validate(s)]


def test_valid_diamond_orders_topologically() -> None:
    s = spec(
        {"name": "d", "dependsOn": ["b", "c"]},
        {"name": "b", "dependsOn": ["a"]},
        {"name": "c", "dependsOn": ["a"]},
        {"name": "a"},
    )
    assert validate(s) == []
    order = list(plan(s).order)
    assert order.index("a") < order.index("b") < order.index("d")
    assert order.index("c") < order.index("d")


def test_every_problem_reported_at_once() -> None:
    s = spec(
        {"name": "a", "dependsOn": ["c"]},
        {"name": "b", "dependsOn": ["a", "ghost"]},
        {"name": "c", "dependsOn": ["b"]},
        {"name": "d", "dependsOn": ["d"]},
        {"name": "d"},
    )
    got = messages(s)
    assert "d: task name is used 2 times" in got
    assert "b: depends on unknown task 'ghost'" in got
    assert "d: depends on itself" in got
    assert "a: dependency cycle: a -> b -> c -> a" in got


def test_two_separate_cycles_named() -> None:
    s = spec(
        {"name": "a", "dependsOn": ["b"]},
        {"name": "b", "dependsOn": ["a"]},
        {"name": "x", "dependsOn": ["y"]},
        {"name": "y", "dependsOn": ["z"]},
        {"name": "z", "dependsOn": ["x"]},
    )
    cycles = [m for m in messages(s) if "cycle" in m]
    assert len(cycles) == 2
    assert any(set(c.split(": ")[-1].split(" -> ")) == {"a", "b"} for c in cycles)
    assert any(set(c.split(": ")[-1].split(" -> ")) == {"x", "y", "z"} for c in cycles)


def test_templates_must_read_upstream_tasks_and_declared_params() -> None:
    s = spec(
        {"name": "a"},
        {"name": "b"},
        {
            "name": "c",
            "dependsOn": ["a"],
            "container": {
                "image": "busybox",
                "args": [
                    "{{ tasks.a.outputs.v }}",
                    "{{ tasks.b.outputs.v }}",
                    "{{ params.missing }}",
                    "{{ nonsense }}",
                ],
            },
        },
    )
    got = messages(s)
    assert not any("'a'" in m for m in got)
    assert any(
        m.startswith("c: template {{ tasks.b.outputs.v }} reads task 'b', which is not upstream")
        for m in got
    )
    assert "c: template reads unknown param 'missing'" in got
    assert any("unknown template reference {{ nonsense }}" in m for m in got)


def test_transitive_upstream_is_allowed() -> None:
    s = spec(
        {"name": "a"},
        {"name": "b", "dependsOn": ["a"]},
        {"name": "c", "dependsOn": ["b"], "when": "tasks.a.outputs.ok == True"},
    )
    assert validate(s) == []


def test_when_expressions_checked() -> None:
    s = spec(
        {"name": "a", "when": "params.env =="},
        {"name": "b", "when": "params.nope == 'x'"},
        {"name": "c", "when": "os.system('x')"},
        {"name": "d", "when": "run.outcome == 'Failed'"},
        params=[{"name": "env"}],
    )
    got = messages(s)
    assert any(m.startswith("a: when: does not parse") for m in got)
    assert "b: when: unknown param 'nope'" in got
    assert any(m.startswith("c: when: unknown name 'os'") for m in got)
    assert "d: when: run.outcome is only known in finally tasks" in got


def test_finally_tasks_read_main_outputs_but_depend_only_on_finally() -> None:
    s = spec(
        {"name": "a"},
        **{
            "finally": [
                {
                    "name": "f1",
                    "container": {
                        "image": "x",
                        "args": ["{{ tasks.a.outputs.k }} {{ run.outcome }}"],
                    },
                },
                {"name": "f2", "dependsOn": ["a"], "container": {"image": "x"}},
            ]
        },
    )
    got = messages(s)
    assert len(got) == 1
    assert got[0].startswith("f2: finally task cannot depend on 'a'")


def test_resolve_params() -> None:
    s = spec({"name": "a"}, params=[{"name": "x", "default": "1"}, {"name": "y"}])
    values, problems = resolve_params(s, {"y": "2", "z": "3"})
    assert values == {"x": "1", "y": "2"}
    assert problems == ["params.z: not declared by the workflow (declared: x, y)"]
    _, problems = resolve_params(s, {})
    assert problems == ["params.y: required (no default) but not given"]


def test_graph_ready_and_deep_chain_without_recursion() -> None:
    n = 20_000
    g = Graph.build((f"t{i}", [f"t{i - 1}"] if i else []) for i in range(n))
    assert g.cycles() == []
    assert g.topological_order()[:3] == ["t0", "t1", "t2"]
    assert g.ready(done={"t0"}, started={"t0"}) == ["t1"]
    assert g.is_upstream("t0", f"t{n - 1}")
    looped = Graph.build([*((f"t{i}", [f"t{i - 1}"] if i else [f"t{n - 1}"]) for i in range(n))])
    assert len(looped.cycles()[0]) == n + 1
    with pytest.raises(ValueError, match="cycle"):
        looped.topological_order()


def test_template_rendering_and_missing_key() -> None:
    ctx = templates.Context({"p": "v"}, {"a": {"n": 3, "obj": {"x": "y"}}}, {"id": "r1"})
    assert templates.render("{{ params.p }}-{{ tasks.a.outputs.n }}-{{run.id}}", ctx) == "v-3-r1"
    assert templates.render("{{ tasks.a.outputs.obj.x }}", ctx) == "y"
    assert templates.render("{{ tasks.a.outputs.obj }}", ctx) == '{"x": "y"}'
    with pytest.raises(
        templates.TemplateError, match="has no output 'missing' \\(its outputs: n, obj\\)"
    ):
        templates.render("{{ tasks.a.outputs.missing }}", ctx)


def test_expression_evaluation() -> None:
    ctx = templates.Context({"env": "prod"}, {"build-x": {"n": 3}}, {"outcome": "Failed"})
    phases = {"build-x": "Succeeded"}
    assert expressions.evaluate(
        "params.env == 'prod' and tasks['build-x'].outputs.n > 2", ctx, phases
    )
    assert not expressions.evaluate("run.outcome == 'Succeeded'", ctx, phases)
    assert expressions.evaluate("tasks['build-x'].phase == 'Succeeded'", ctx, phases)
    with pytest.raises(expressions.ExpressionError, match="cannot evaluate"):
        expressions.evaluate("tasks['build-x'].outputs.missing > 1", ctx, phases)
