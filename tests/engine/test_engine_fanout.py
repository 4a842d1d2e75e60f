"""Fan-out (``forEach``): instances, their outputs as lists, concurrency, failFast,
retries, limits; on SQLite and PostgreSQL."""

from __future__ import annotations

import json

import pytest
from kit import Harness, lines, mark, outputs, sh, spec_of

from maestro.api.models import MAX_INSTANCES
from maestro.api.phases import RunPhase, TaskPhase
from maestro.dag.fanout import MAX_ITEMS_BYTES
from maestro.engine.engine import InvalidRun
from maestro.operator.status import run_status

ECHO_ITEM = 'printf \'{"got": "%s"}\' "$MAESTRO_ITEM" > "$MAESTRO_OUTPUTS"'


async def test_items_param_and_upstream_lists_fan_out_and_fan_in_in_item_order(
    h: Harness,
) -> None:
    spec = spec_of(
        [
            sh("list", outputs({"files": ["x.txt", "y.txt", "z.txt"]})),
            sh("lit", ECHO_ITEM, forEach={"items": ["a", "b"]}),
            sh("par", ECHO_ITEM, forEach={"from": "{{ params.targets }}"}),
            sh(
                "up",
                'printf \'{"got": "%s"}\' {{ item | shquote }} > "$MAESTRO_OUTPUTS"',
                dependsOn=["list"],
                forEach={"from": "{{ tasks.list.outputs.files }}", "concurrency": 2},
            ),
            sh(
                "join",
                "printf '%s\\n' {{ tasks.up.outputs.got | shquote }} "
                "{{ tasks.lit.outputs.got | shquote }} > " + str(h.root / "joined"),
                dependsOn=["up", "lit", "par"],
            ),
        ],
        params=[{"name": "targets"}],
    )
    run = await h.run(spec, {"targets": json.dumps(["p0", "p1", "p2", "p3"])})
    assert run.phase is RunPhase.SUCCEEDED, run.message
    latest = await h.latest(run.id)
    assert [latest[f"par[{i}]"].outputs for i in range(4)] == [{"got": f"p{i}"} for i in range(4)]
    assert latest["up[2]"].outputs == {"got": "z.txt"}
    assert "par" not in latest
    assert "up" not in latest
    # The fan-in read each output key as a JSON list in item order.
    joined = (h.root / "joined").read_text().splitlines()
    assert json.loads(joined[0]) == ["x.txt", "y.txt", "z.txt"]
    assert json.loads(joined[1]) == ["a", "b"]
    # Status: one entry per instance, and the fan-out's own entry summing them up.
    status = run_status(
        run,
        spec,
        latest,
        live_message="",
        generation=1,
        previous_conditions=[],
        now=run.finished_at or run.created_at,
        include_spec=False,
    )
    assert status["tasks"]["up"]["phase"] == "Succeeded"
    assert status["tasks"]["up"]["message"] == "3/3 instances ended"
    assert status["tasks"]["up[1]"]["outputs"] == {"got": "y.txt"}
    assert status["progress"] == "11/11"


async def test_matrix_is_the_cartesian_product_with_item_keys(h: Harness) -> None:
    spec = spec_of(
        [
            sh(
                "m",
                outputs({"k": "{{ item.os }}-{{ item.py }}"}),
                forEach={
                    "matrix": [
                        {"name": "os", "items": ["linux", "mac"]},
                        {"name": "py", "from": "{{ params.versions }}"},
                    ]
                },
            ),
        ],
        params=[{"name": "versions", "default": '["3.11", "3.12", "3.13"]'}],
    )
    run = await h.run(spec)
    assert run.phase is RunPhase.SUCCEEDED, run.message
    latest = await h.latest(run.id)
    got = [latest[f"m[{i}]"].outputs["k"] for i in range(6)]  # type: ignore[index]
    assert got == [f"{o}-{p}" for o in ("linux", "mac") for p in ("3.11", "3.12", "3.13")]


async def test_a_fan_outs_concurrency_holds_its_instances(h: Harness) -> None:
    # Each instance takes a lock directory: two at once would make one fail.
    lock = h.root / "lock"
    script = f"mkdir {lock} || exit 9; sleep 0.2; rmdir {lock}; " + mark(h.counter, "{{ item }}")
    spec = spec_of([sh("one", script, forEach={"items": [1, 2, 3, 4], "concurrency": 1})])
    run = await h.run(spec)
    assert run.phase is RunPhase.SUCCEEDED, run.message
    assert lines(h.counter) == ["1", "2", "3", "4"]  # one at a time, in item order


async def test_fail_fast_stops_new_instances_and_skips_dependents(h: Harness) -> None:
    script = 'if [ "$MAESTRO_ITEM" = bad ]; then exit 3; fi; ' + mark(h.counter, "{{ item }}")
    spec = spec_of(
        [
            sh("f", script, forEach={"items": ["ok", "bad", "never"], "concurrency": 1}),
            sh("after", mark(h.counter, "after"), dependsOn=["f"]),
        ]
    )
    run = await h.run(spec)
    assert run.phase is RunPhase.FAILED
    assert "instance f[1] failed" in (run.message or "")
    latest = await h.latest(run.id)
    assert latest["f[0]"].phase is TaskPhase.SUCCEEDED
    assert latest["f[1]"].phase is TaskPhase.FAILED
    assert (latest["f[2]"].phase, latest["f[2]"].reason) == (TaskPhase.SKIPPED, "FailFast")
    assert (latest["after"].phase, latest["after"].reason) == (TaskPhase.SKIPPED, "UpstreamFailed")
    assert lines(h.counter) == ["ok"]


async def test_without_fail_fast_the_other_instances_run(h: Harness) -> None:
    script = 'if [ "$MAESTRO_ITEM" = bad ]; then exit 3; fi; ' + mark(h.counter, "{{ item }}")
    spec = spec_of(
        [
            sh("f", script, forEach={"items": ["ok", "bad", "late"], "concurrency": 1}),
            sh("after", mark(h.counter, "after"), dependsOn=["f"]),
            sh("free", mark(h.counter, "free")),
        ],
        failFast=False,
    )
    run = await h.run(spec)
    assert run.phase is RunPhase.FAILED
    latest = await h.latest(run.id)
    assert latest["f[2]"].phase is TaskPhase.SUCCEEDED
    assert (latest["after"].phase, latest["after"].reason) == (TaskPhase.SKIPPED, "UpstreamFailed")
    assert sorted(lines(h.counter)) == ["free", "late", "ok"]


async def test_each_instance_retries_on_its_own(h: Harness) -> None:
    # Item 1 fails its first attempt only; the others succeed at once.
    flag = h.root / "flaky-once"
    script = (
        f'if [ "$MAESTRO_ITEM" = 1 ] && [ ! -e {flag} ]; then touch {flag}; exit 1; fi; '
        + mark(h.counter, "{{ item }}")
    )
    retries = {"limit": 2, "backoffSeconds": 0}
    spec = spec_of([sh("r", script, forEach={"items": [0, 1, 2]}, retries=retries)])
    run = await h.run(spec)
    assert run.phase is RunPhase.SUCCEEDED, run.message
    latest = await h.latest(run.id)
    assert [latest[f"r[{i}]"].attempt for i in range(3)] == [1, 2, 1]
    assert sorted(lines(h.counter)) == ["0", "1", "2"]


async def test_an_empty_list_skips_the_fan_out_not_its_dependents(h: Harness) -> None:
    spec = spec_of(
        [
            sh("e", "exit 1", forEach={"from": "{{ params.none }}"}),
            sh("after", mark(h.counter, "after"), dependsOn=["e"]),
        ],
        params=[{"name": "none", "default": "[]"}],
    )
    run = await h.run(spec)
    assert run.phase is RunPhase.SUCCEEDED, run.message
    latest = await h.latest(run.id)
    assert (latest["e"].phase, latest["e"].reason) == (TaskPhase.SKIPPED, "NoItems")
    assert lines(h.counter) == ["after"]


@pytest.mark.parametrize(
    ("value", "says"),
    [
        (json.dumps(list(range(MAX_INSTANCES + 1))), f"more than the limit of {MAX_INSTANCES}"),
        (json.dumps(["x" * 1000] * 300), f"over the limit of {MAX_ITEMS_BYTES}"),
        ('{"a": 1}', "must hold a JSON list, got dict"),
        ("not json", "is not a JSON list"),
    ],
    ids=["count", "bytes", "not-a-list", "not-json"],
)
async def test_a_list_past_the_limits_fails_the_task_naming_it(
    h: Harness, value: str, says: str
) -> None:
    spec = spec_of([sh("big", "true", forEach={"from": "{{ params.v }}"})], params=[{"name": "v"}])
    run = await h.run(spec, {"v": value})
    assert run.phase is RunPhase.FAILED
    att = (await h.latest(run.id))["big"]
    assert (att.phase, att.reason) == (TaskPhase.FAILED, "InputError")
    assert "forEach of task 'big'" in (att.message or "")
    assert says in (att.message or "")
    assert len(await h.latest(run.id)) == 1  # no instance was recorded


async def test_a_matrix_past_the_limit_is_refused_before_the_run(h: Harness) -> None:
    axis = list(range(40))
    spec = spec_of(
        [
            sh(
                "mx",
                "true",
                forEach={"matrix": [{"name": "a", "items": axis}, {"name": "b", "items": axis}]},
            )
        ]
    )
    with pytest.raises(InvalidRun, match=r"mx: forEach of task 'mx' has 1600 instances"):
        await h.create(spec)


async def test_a_cancel_stops_running_instances_and_settles_the_rest(h: Harness) -> None:
    go = h.root / "go"
    script = mark(h.counter, "{{ item }}") + f"; while [ ! -e {go} ]; do sleep 0.05; done"
    spec = spec_of([sh("w", script, forEach={"items": [0, 1, 2, 3], "concurrency": 2})])
    run = await h.create(spec)
    drive = h.drive(run.id)
    await h.wait_for(run.id, "w[1]", "Running")
    # "Running" is recorded at launch, before the script's first line: cancel only
    # once both admitted instances have written their mark, or the kill may beat it.
    await h.wait_lines(h.counter, 2)
    await h.control(run.id, cancel=True)
    done = await drive
    assert done.phase is RunPhase.CANCELLED
    latest = await h.latest(run.id)
    assert {latest[f"w[{i}]"].phase for i in range(4)} == {TaskPhase.CANCELLED}
    assert sorted(lines(h.counter)) == ["0", "1"]
