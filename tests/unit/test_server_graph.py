"""The server's DAG layout and request parsing (pure functions)."""

from __future__ import annotations

import pytest

from maestro.api.models import WorkflowSpec
from maestro.server.app import _execute_request
from maestro.server.auth import ApiError
from maestro.server.graph import layout


def spec(edges: dict[str, list[str]], final: tuple[str, ...] = ()) -> WorkflowSpec:
    container = {"image": "busybox"}
    return WorkflowSpec.model_validate(
        {
            "tasks": [
                {"name": n, "dependsOn": d, "container": container} for n, d in edges.items()
            ],
            "finally": [{"name": n, "container": container} for n in final],
        }
    )


def test_every_edge_points_right_and_nodes_never_overlap() -> None:
    g = layout(spec({"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"], "e": []}, ("z",)))
    pos = {n["name"]: (n["x"], n["y"]) for n in g["nodes"]}
    for up, down in g["edges"]:
        assert pos[up][0] < pos[down][0], (up, down)
    assert len(set(pos.values())) == len(pos)
    assert pos["z"][0] > max(x for name, (x, _) in pos.items() if name != "z"), "finally last"
    assert all(0 <= x < g["width"] and 0 <= y < g["height"] for x, y in pos.values())


def test_a_thousand_tasks_lay_out() -> None:
    edges = {f"t{i}": ([f"t{i - 1}", f"t{i // 2}"] if i else []) for i in range(1000)}
    g = layout(spec(edges))
    assert len(g["nodes"]) == 1000
    assert len(g["edges"]) == sum(len(set(d)) for d in edges.values())


def test_both_request_shapes() -> None:
    assert _execute_request({"params": {"a": "1"}, "name": "r"}) == ({"a": "1"}, "r", {})
    # The original shape: the object is the inputs; numbers and booleans become JSON text.
    assert _execute_request({"a": 1, "b": True, "name": "x"}) == (
        {"a": "1", "b": "true", "name": "x"},
        None,
        {},
    )


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ([], "body"),
        ({"a": None}, "params.a"),
        ({"a": [1]}, "params.a"),
        ({"params": {}, "name": "UPPER"}, "name"),
        ({"params": {}, "name": "trailing-newline\n"}, "name"),
        ({"params": {}, "labels": {"k": "has space"}}, "labels.k"),
        ({"params": {}, "labels": {"-bad": "v"}}, "labels.-bad"),
    ],
)
def test_bad_requests_name_the_field(body: object, field: str) -> None:
    with pytest.raises(ApiError) as err:
        _execute_request(body)
    assert (err.value.status, err.value.field) == (422, field)
