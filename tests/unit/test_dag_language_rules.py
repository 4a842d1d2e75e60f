"""forEach and cache at validation: every problem named, the instance limit, names,
labels, graph; --no-cache on submit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from pydantic import ValidationError

from maestro.api.models import MAX_INSTANCES, WorkflowRunSpec, WorkflowSpec, duration_seconds
from maestro.cli.main import cli
from maestro.dag import fanout, render
from maestro.dag.validate import Problem, call_problems, plan, validate
from maestro.k8s.client import run_manifest


def _c(name: str, *args: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "container": {"image": "x", "args": list(args)}, **extra}


def _problems(tasks: list[dict[str, Any]], **spec: Any) -> list[str]:
    return [str(p) for p in validate(WorkflowSpec.model_validate({"tasks": tasks, **spec}))]


def test_every_fan_out_problem_is_named_with_its_task() -> None:
    problems = _problems(
        [
            _c("src"),
            _c("plain", "{{ item }}"),
            _c("glued", forEach={"from": "x {{ params.p }}"}),
            _c("runid", forEach={"from": "{{ run.id }}"}),
            _c("nop", forEach={"from": "{{ params.nope }}"}),
            _c("notup", forEach={"from": "{{ tasks.src.outputs.l }}"}),
            _c(
                "mx",
                "{{ item.c }}",
                forEach={
                    "matrix": [{"name": "a", "items": [1]}, {"name": "a", "items": [2]}],
                },
            ),
        ],
        params=[{"name": "p"}],
    )
    assert "plain: {{ item }} is only known in a task with forEach" in problems
    assert any(
        p.startswith("glued: forEach.from: 'x {{ params.p }}' must be one template")
        for p in problems
    )
    assert any(
        p.startswith("runid: forEach.from: {{ run.id }} cannot hold the list") for p in problems
    )
    assert "nop: template reads unknown param 'nope'" in problems
    assert any(
        p.startswith(
            "notup: template {{ tasks.src.outputs.l }} reads task 'src', which is not upstream"
        )
        for p in problems
    )
    assert "mx: forEach.matrix: 'a' is used 2 times" in problems
    assert "mx: {{ item.c }}: a matrix item is {{ item.AXIS }} (axes: a)" in problems


def test_an_upstream_list_counts_as_a_read() -> None:
    spec = WorkflowSpec.model_validate(
        {
            "tasks": [
                _c("src"),
                _c("fan", dependsOn=["src"], forEach={"from": "{{ tasks.src.outputs.l }}"}),
            ]
        }
    )
    assert validate(spec) == []
    assert plan(spec).reads["fan"] == frozenset({"src"})


def test_a_1000_item_matrix_validates_and_a_larger_one_is_refused() -> None:
    axis = list(range(40))
    ok = {"matrix": [{"name": "a", "items": axis[:25]}, {"name": "b", "items": axis}]}
    assert _problems([_c("m", "{{ item.a }}", forEach=ok)]) == []
    big = {"matrix": [{"name": "a", "items": axis[:26]}, {"name": "b", "items": axis}]}
    assert _problems([_c("m", forEach=big)]) == [
        f"m: forEach of task 'm' has 1040 instances, more than the limit of {MAX_INSTANCES}: "
        "split the list, or fan out over batches"
    ]


@pytest.mark.parametrize(
    ("task", "says"),
    [
        (_c("x" * 58, forEach={"items": [1]}), "at most 57 characters with forEach"),
        (
            {"name": "gate", "approval": {}, "forEach": {"items": [1]}},
            "an approval task cannot have forEach",
        ),
        (_c("two", forEach={"items": [1], "from": "{{ params.p }}"}), "exactly one of items"),
        (_c("many", forEach={"items": list(range(MAX_INSTANCES + 1))}), "at most 1024 items"),
    ],
    ids=["long-name", "approval", "two-sources", "too-many-items"],
)
def test_the_schema_refuses_what_it_can_say(task: dict[str, Any], says: str) -> None:
    with pytest.raises(ValidationError, match=says):
        WorkflowSpec.model_validate({"tasks": [task]})


def test_instance_names_and_their_labels() -> None:
    name = fanout.instance_name("build", 12)
    assert name == "build[12]"
    assert fanout.split(name) == ("build", 12)
    assert fanout.split("build") == ("build", None)
    assert fanout.label_value(name) == "build.12"  # a valid label value, unlike the name
    assert fanout.instances_of(["a[10]", "a[2]", "b", "a[0]"]) == {"a": ["a[0]", "a[2]", "a[10]"]}
    assert fanout.collect([{"v": 1}, {"v": 2, "w": "x"}, None]) == {
        "v": [1, 2, None],
        "w": [None, "x", None],
    }


def test_graph_groups_instances_into_one_node() -> None:
    spec = WorkflowSpec.model_validate(
        {"tasks": [_c("fan", forEach={"items": [1, 2, 3]}), _c("join", dependsOn=["fan"])]}
    )
    text = render.mermaid(spec, {"fan[0]": "Succeeded", "fan[1]": "Running", "fan[2]": "Pending"})
    assert 'fan["fan [forEach: 3] (1 ended): Running"]' in text
    assert "fan_0_" not in text  # no node per instance
    assert '"fan" [label="fan [forEach: 3]"' in render.dot(spec)


def test_maestro_validate_names_every_problem(tmp_path: Path) -> None:
    wf = {
        "apiVersion": "maestro.dev/v1alpha1",
        "kind": "Workflow",
        "metadata": {"name": "w"},
        "spec": {
            "tasks": [
                _c("a", "{{ item }}"),
                _c("b", forEach={"from": "{{ params.missing }}"}),
            ]
        },
    }
    (tmp_path / "wf.yaml").write_text(yaml.safe_dump(wf))
    result = CliRunner().invoke(cli, ["validate", str(tmp_path / "wf.yaml")])
    assert result.exit_code == 1
    assert "a: {{ item }} is only known in a task with forEach" in result.stderr
    assert "b: template reads unknown param 'missing'" in result.stderr


def test_cache_is_checked_at_validation() -> None:
    assert _problems(
        [_c("f", "{{ item }}", forEach={"items": [1, 2]}, cache={"key": "f", "maxAge": "1h"})]
    ) == [
        "f: cache.key must read {{ item }} (or item.KEY) in a task with forEach: otherwise "
        "every instance shares one cache entry"
    ]
    assert _problems([_c("t", cache={"key": "{{ params.nope }}", "maxAge": "1h"})]) == [
        "t: template reads unknown param 'nope'"
    ]
    with pytest.raises(ValidationError, match="String should match pattern"):
        WorkflowSpec.model_validate({"tasks": [_c("t", cache={"key": "k", "maxAge": "1 hour"})]})
    with pytest.raises(ValidationError, match="an approval task cannot be cached"):
        WorkflowSpec.model_validate(
            {"tasks": [{"name": "g", "approval": {}, "cache": {"key": "k", "maxAge": "1h"}}]}
        )
    assert duration_seconds("1h30m") == 5400
    assert duration_seconds("7d") == 7 * 86400


def test_submit_no_cache_sets_the_run_spec_field() -> None:
    assert run_manifest("wf", {}, no_cache=True)["spec"]["noCache"] is True
    assert "noCache" not in run_manifest("wf", {})["spec"]
    assert WorkflowRunSpec.model_validate(run_manifest("wf", {}, no_cache=True)["spec"]).no_cache


def test_workflow_outputs_are_checked_at_validation() -> None:
    problems = _problems(
        [_c("a")],
        params=[{"name": "p"}],
        outputs=[
            {"name": "x", "value": "{{ tasks.nope.outputs.k }}"},
            {"name": "x", "value": "{{ params.q }}"},
            {"name": "y", "value": "{{ item }}"},
            {"name": "z", "value": "{{ tasks.a.outputs.k }} and {{ params.p }}"},
        ],
    )
    assert problems == [
        "outputs: 'x' is declared 2 times",
        "outputs.x: reads unknown task 'nope'",
        "outputs.x: reads unknown param 'q'",
        "outputs.y: {{ item }} is only known in a task",
    ]


def test_workflow_calls_are_checked_for_cycles_and_depth() -> None:
    def calls(*names: str) -> WorkflowSpec:
        return WorkflowSpec.model_validate(
            {"tasks": [{"name": f"to-{n}", "workflow": {"name": n}} for n in names]}
        )

    chain = {f"w{i}": calls(f"w{i + 1}") for i in range(6)}
    assert call_problems("w0", chain, all_known=False) == [
        Problem("to-w5", "workflow calls nest deeper than 4: w0 -> w1 -> w2 -> w3 -> w4 -> w5")
    ]
    loop = {"a": calls("b"), "b": calls("a", "c")}
    assert [str(p) for p in call_problems("a", loop, all_known=False)] == [
        "to-a: workflow calls form a cycle: a -> b -> a"
    ]
    assert [str(p) for p in call_problems("a", loop, all_known=True)] == [
        "to-a: workflow calls form a cycle: a -> b -> a",
        "to-c: calls workflow 'c', which is not among the files given",
    ]
