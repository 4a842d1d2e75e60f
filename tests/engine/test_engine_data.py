"""Outputs and inputs between tasks, HTTP tasks, and bad input that fails one task cleanly."""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from kit import HANG_GUARD, Harness, harness, outputs, sh, spec_of

from maestro.api.phases import RunPhase, TaskPhase
from maestro.store import Store


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        body = json.loads(self.rfile.read(length) or b"{}")
        self._reply(200, json.dumps({"echo": body, "token": self.headers.get("X-Token")}))

    def do_GET(self) -> None:
        if self.path == "/teapot":
            self._reply(418, "short and stout")
        elif self.path == "/text":
            self._reply(200, "plain words")
        else:
            self._reply(200, json.dumps({"version": "2.0"}))

    def _reply(self, status: int, text: str) -> None:
        data = text.encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet."""


@pytest.fixture
def server() -> Iterator[str]:
    """A real HTTP server on 127.0.0.1, in a thread; yields its base URL."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port  # closed again: nothing listens there


async def _assert_record_complete(store: Store, run_id: str) -> None:
    """Every attempt finished, and each one's events are Created -> ... -> its final phase,
    in order, with the run's own events Pending -> Running -> final."""
    run = await store.get_run(run_id)
    assert run.phase.finished
    attempts = await store.attempts(run_id)
    events = await store.events(run_id)
    assert [e.id for e in events] == sorted(e.id for e in events)
    for att in attempts:
        assert att.phase.finished, att
        assert att.finished_at is not None
        trail = [e for e in events if (e.task, e.attempt) == (att.task, att.attempt)]
        assert trail[0].to_phase == "Pending"
        assert trail[-1].to_phase == att.phase.value
        for prev, nxt in itertools.pairwise(trail):
            assert nxt.from_phase == prev.to_phase
    run_trail = [e.to_phase for e in events if e.kind == "RunPhase"]
    assert run_trail == ["Pending", "Running", run.phase.value]
    assert events[-1].kind == "RunPhase"


async def test_outputs_reach_downstream_by_template_and_env(h: Harness) -> None:
    seen = h.root / "seen"
    inputs = h.root / "inputs.json"
    spec = spec_of(
        [
            sh("build", outputs({"version": "1.2.3", "meta": {"sha": "abc"}, "n": 3})),
            sh(
                "use",
                'echo "{{ tasks.build.outputs.version }} {{ tasks.build.outputs.meta.sha }}'
                ' {{ tasks.build.outputs.n }} {{ params.env }} $MAESTRO_PARAM_env"'
                f' > {seen}; printf %s "$MAESTRO_INPUTS" > {inputs}',
                dependsOn=["build"],
            ),
        ],
        params=[{"name": "env", "default": "dev"}],
    )
    run = await h.run(spec, {"env": "prod"})
    assert run.phase is RunPhase.SUCCEEDED
    assert seen.read_text().split() == ["1.2.3", "abc", "3", "prod", "prod"]
    assert json.loads(inputs.read_text()) == {
        "params": {"env": "prod"},
        "tasks": {"build": {"version": "1.2.3", "meta": {"sha": "abc"}, "n": 3}},
    }
    assert (await h.latest(run.id))["build"].outputs == {
        "version": "1.2.3",
        "meta": {"sha": "abc"},
        "n": 3,
    }


async def test_missing_output_key_fails_that_task_with_the_keys_that_exist(h: Harness) -> None:
    spec = spec_of(
        [
            sh("build", outputs({"version": "1", "digest": "x"})),
            sh("deploy", "echo {{ tasks.build.outputs.image }}", dependsOn=["build"]),
            sh("docs", "true", dependsOn=["build"]),
        ],
        failFast=False,
    )
    run = await h.run(spec)
    assert run.phase is RunPhase.FAILED
    latest = await h.latest(run.id)
    deploy = latest["deploy"]
    assert deploy.phase is TaskPhase.FAILED
    assert deploy.reason == "InputError"
    assert "'image'" in (deploy.message or "")
    assert "digest, version" in (deploy.message or "")
    assert latest["docs"].phase is TaskPhase.SUCCEEDED
    assert "'deploy'" in (run.message or "")
    await _assert_record_complete(h.store, run.id)


async def test_command_not_found(h: Harness) -> None:
    run = await h.run(spec_of([sh("x", "no-such-command-maestro --flag")]))
    x = (await h.latest(run.id))["x"]
    assert x.phase is TaskPhase.FAILED
    assert "exit code 127 (command not found)" in (x.message or "")
    assert "no-such-command-maestro" in (x.message or "")
    await _assert_record_complete(h.store, run.id)


async def test_container_task_without_a_command(h: Harness) -> None:
    spec = spec_of([{"name": "x", "container": {"image": "busybox"}}])
    run = await h.run(spec)
    x = (await h.latest(run.id))["x"]
    assert x.phase is TaskPhase.FAILED
    assert "no command" in (x.message or "")
    assert "'busybox'" in (x.message or "")
    await _assert_record_complete(h.store, run.id)


async def test_outputs_that_are_not_json(h: Harness) -> None:
    run = await h.run(spec_of([sh("x", "echo 'version=1' > \"$MAESTRO_OUTPUTS\"")]))
    x = (await h.latest(run.id))["x"]
    assert x.phase is TaskPhase.FAILED
    assert x.reason == "InvalidOutputs"
    assert "not valid JSON" in (x.message or "")
    assert "version=1" in (x.message or "")
    await _assert_record_complete(h.store, run.id)


async def test_outputs_that_are_not_an_object(h: Harness) -> None:
    run = await h.run(spec_of([sh("x", "echo '[1, 2]' > \"$MAESTRO_OUTPUTS\"")]))
    x = (await h.latest(run.id))["x"]
    assert x.phase is TaskPhase.FAILED
    assert "must be a JSON object, got list" in (x.message or "")


async def test_outputs_over_the_cap(database_url: str, tmp_path: Path) -> None:
    async with harness(database_url, tmp_path, max_output_bytes=100) as h:
        big = outputs({"blob": "x" * 500})
        spec = spec_of(
            [sh("x", big), sh("y", "true", dependsOn=["x"])],
            **{"finally": [sh("f", "true")]},
        )
        run = await h.run(spec)
        x = (await h.latest(run.id))["x"]
        assert x.phase is TaskPhase.FAILED
        assert "over the cap of 100 bytes" in (x.message or "")
        assert "'x'" in (x.message or "")
        assert x.outputs is None
        await _assert_record_complete(h.store, run.id)


async def test_http_task_outputs_and_body_template(h: Harness, server: str) -> None:
    spec = spec_of(
        [
            {"name": "get", "http": {"url": f"{server}/version"}},
            {
                "name": "post",
                "dependsOn": ["get"],
                "http": {
                    "url": f"{server}/deploy",
                    "method": "POST",
                    "headers": [{"name": "X-Token", "value": "t-{{ params.who }}"}],
                    "body": '{"v": "{{ tasks.get.outputs.version }}"}',
                },
            },
            {"name": "text", "http": {"url": f"{server}/text"}},
        ],
        params=[{"name": "who", "default": "me"}],
    )
    run = await h.run(spec)
    assert run.phase is RunPhase.SUCCEEDED
    latest = await h.latest(run.id)
    assert latest["get"].outputs == {"version": "2.0"}
    assert latest["post"].outputs == {"echo": {"v": "2.0"}, "token": "t-me"}
    assert latest["text"].outputs == {"status": 200, "body": "plain words"}


async def test_http_unexpected_status(h: Harness, server: str) -> None:
    run = await h.run(spec_of([{"name": "tea", "http": {"url": f"{server}/teapot"}}]))
    tea = (await h.latest(run.id))["tea"]
    assert tea.phase is TaskPhase.FAILED
    assert tea.reason == "UnexpectedStatus"
    assert "status 418, expected 2xx: short and stout" in (tea.message or "")


async def test_http_task_to_a_closed_port(h: Harness) -> None:
    url = f"http://127.0.0.1:{_closed_port()}/hook"
    run = await h.run(spec_of([{"name": "hook", "http": {"url": url}}]))
    hook = (await h.latest(run.id))["hook"]
    assert hook.phase is TaskPhase.FAILED
    assert (hook.message or "").startswith(f"GET {url}: ConnectError")
    await _assert_record_complete(h.store, run.id)


async def test_secret_header_missing_in_local_mode(h: Harness, server: str) -> None:
    header = {"name": "Authorization", "valueFrom": {"secretKeyRef": {"name": "api", "key": "t"}}}
    spec = spec_of([{"name": "call", "http": {"url": server, "headers": [header]}}])
    run = await asyncio.wait_for(h.run(spec), HANG_GUARD)
    call = (await h.latest(run.id))["call"]
    assert call.phase is TaskPhase.FAILED
    assert "MAESTRO_SECRET_API_T" in (call.message or "")


async def test_workflow_outputs_are_computed_when_the_run_succeeds(h: Harness) -> None:
    spec = spec_of(
        [
            sh("build", outputs({"image": "img:1", "size": 3})),
            sh("fan", outputs({"n": "{{ item }}"}), forEach={"items": ["a", "b"]}),
        ],
        params=[{"name": "env", "default": "prod"}],
        outputs=[
            {"name": "image", "value": "{{ tasks.build.outputs.image }}"},
            {"name": "size", "value": "{{ tasks.build.outputs.size }}"},
            {"name": "all", "value": "{{ tasks.fan.outputs.n }}"},
            {"name": "summary", "value": "{{ params.env }}: {{ tasks.build.outputs.image }}"},
        ],
    )
    run = await h.run(spec)
    assert run.phase is RunPhase.SUCCEEDED, run.message
    # One template keeps its JSON type; text around it makes a string.
    assert run.outputs == {"image": "img:1", "size": 3, "all": ["a", "b"], "summary": "prod: img:1"}


async def test_an_output_that_cannot_be_computed_fails_the_run(h: Harness) -> None:
    spec = spec_of(
        [sh("build", outputs({"image": "img:1"}))],
        outputs=[{"name": "digest", "value": "{{ tasks.build.outputs.digest }}"}],
    )
    run = await h.run(spec)
    assert run.phase is RunPhase.FAILED
    assert run.reason == "OutputError"
    assert run.message == "outputs: task 'build' has no output 'digest' (its outputs: image)"
    assert run.outputs is None


async def test_a_failed_run_has_no_outputs(h: Harness) -> None:
    spec = spec_of(
        [sh("build", "exit 1")], outputs=[{"name": "x", "value": "{{ tasks.build.outputs.x }}"}]
    )
    run = await h.run(spec)
    assert run.phase is RunPhase.FAILED
    assert run.reason == "TaskFailed"
    assert run.outputs is None
