"""Cached tasks: a Succeeded attempt with the same rendered key within maxAge is reused
(reason Cached, with its source), per namespace; noCache runs again. Both backends."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from kit import Harness, lines, mark, outputs, sh, spec_of

from maestro.api.models import WorkflowSpec
from maestro.api.phases import RunPhase, TaskPhase
from maestro.engine.driver import drive
from maestro.engine.engine import Engine, utcnow
from maestro.store import RunRecord


def _cached_spec(h: Harness, **cache: Any) -> WorkflowSpec:
    return spec_of(
        [
            sh(
                "build",
                mark(h.counter, "build-{{ params.commit }}")
                + "; "
                + outputs({"image": "img:{{ params.commit }}"}),
                cache={"key": "build-{{ params.commit }}", "maxAge": "1h", **cache},
            ),
            sh(
                "use",
                "echo {{ tasks.build.outputs.image | shquote }} >> " + str(h.root / "used"),
                dependsOn=["build"],
            ),
        ],
        params=[{"name": "commit"}],
    )


async def _run(
    h: Harness, spec: WorkflowSpec, engine: Engine | None = None, **kw: Any
) -> RunRecord:
    params = kw.pop("params", {"commit": "abc"})
    run = await (engine or h.engine).create_run(
        namespace=kw.pop("namespace", "test"), name="run", spec=spec, params=params, **kw
    )
    done = await h.drive(run.id) if engine is None else await _drive_with(h, engine, run.id)
    assert done.phase is RunPhase.SUCCEEDED, done.message
    return done


async def _drive_with(h: Harness, engine: Engine, run_id: str) -> RunRecord:
    return await drive(engine, run_id, h.waker, poll_seconds=0.1)


async def test_a_second_run_with_the_same_key_reuses_the_outputs(h: Harness) -> None:
    spec = _cached_spec(h)
    first = await _run(h, spec)
    second = await _run(h, spec)
    assert lines(h.counter) == ["build-abc"]  # the work ran once
    att = (await h.latest(second.id))["build"]
    assert (att.phase, att.reason) == (TaskPhase.SUCCEEDED, "Cached")
    assert att.outputs == {"image": "img:abc"}
    assert att.cached_from == {"runId": first.id, "task": "build", "attempt": 1}
    assert f"cached: outputs of run run ({first.id}), task build attempt 1" == att.message
    # Dependents read the reused outputs like any others.
    assert lines(h.root / "used") == ["img:abc", "img:abc"]
    # Another key (another commit) is another entry: it runs.
    await _run(h, spec, params={"commit": "def"})
    assert lines(h.counter) == ["build-abc", "build-def"]


async def test_an_entry_older_than_max_age_is_not_reused(h: Harness) -> None:
    spec = _cached_spec(h)
    await _run(h, spec)
    later = Engine(h.store, h.engine.executors, clock=lambda: utcnow() + timedelta(hours=2))
    await _run(h, spec, engine=later)
    assert lines(h.counter) == ["build-abc", "build-abc"]


async def test_no_cache_runs_again_and_its_result_is_the_newest_entry(h: Harness) -> None:
    spec = _cached_spec(h)
    await _run(h, spec)
    fresh = await _run(h, spec, controls={"noCache": True})
    assert lines(h.counter) == ["build-abc", "build-abc"]
    third = await _run(h, spec)
    att = (await h.latest(third.id))["build"]
    assert att.reason == "Cached"
    assert att.cached_from == {"runId": fresh.id, "task": "build", "attempt": 1}


async def test_entries_belong_to_their_namespace(h: Harness) -> None:
    spec = _cached_spec(h)
    await _run(h, spec, namespace="team-a")
    await _run(h, spec, namespace="team-b")
    assert lines(h.counter) == ["build-abc", "build-abc"]


async def test_a_failed_attempt_is_no_entry(h: Harness) -> None:
    flag = h.root / "fail-once"
    spec = spec_of(
        [
            sh(
                "t",
                f"{mark(h.counter, 't')}; if [ ! -e {flag} ]; then touch {flag}; exit 1; fi",
                cache={"key": "k", "maxAge": "1h"},
            )
        ]
    )
    run = await h.create(spec)
    failed = await h.drive(run.id)
    assert failed.phase is RunPhase.FAILED
    await _run(h, spec, params={})
    assert lines(h.counter) == ["t", "t"]


async def test_fan_out_instances_are_cached_per_item(h: Harness) -> None:
    spec = spec_of(
        [
            sh(
                "f",
                mark(h.counter, "{{ item }}") + "; " + outputs({"v": "{{ item }}"}),
                forEach={"from": "{{ params.items }}"},
                cache={"key": "f-{{ item }}", "maxAge": "10m"},
            ),
        ],
        params=[{"name": "items"}],
    )
    await _run(h, spec, params={"items": '["a", "b"]'})
    second = await _run(h, spec, params={"items": '["a", "b", "c"]'})
    assert sorted(lines(h.counter)) == ["a", "b", "c"]  # only the new item ran
    latest = await h.latest(second.id)
    assert [latest[f"f[{i}]"].reason for i in range(3)] == ["Cached", "Cached", "Succeeded"]
