"""``maestro run --local`` as a real subprocess: SIGKILL and --resume, Ctrl-C."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from kit import REPO, cli, cli_env, lines, mark, outputs, pid_alive, sh

from maestro.api.phases import RunPhase, TaskPhase
from maestro.store import Store

GUARD = 60.0


def _write_workflow(path: Path, tasks: list[dict[str, object]], **spec: object) -> Path:
    doc = {
        "apiVersion": "maestro.dev/v1alpha1",
        "kind": "Workflow",
        "metadata": {"name": "wf"},
        "spec": {"tasks": tasks, **spec},
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _wait(predicate: object, what: str) -> None:
    deadline = time.monotonic() + GUARD
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _run_id(out: Path) -> str:
    found: list[str] = []

    def seen() -> bool:
        found[:] = re.findall(r"\bid ([0-9a-f-]{36})", out.read_text() if out.exists() else "")
        return bool(found)

    _wait(seen, "the run id on the CLI's output")
    return found[0]


class Cli:
    """Starts CLI subprocesses and makes sure none outlives the test."""

    def __init__(self, home: Path, url: str) -> None:
        self.home = home
        self.url = url
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str, out: Path) -> subprocess.Popen[bytes]:
        with out.open("ab") as f:
            proc = subprocess.Popen(
                cli("run", "--local", "--database-url", self.url, *args),
                stdout=f,
                stderr=subprocess.STDOUT,
                env=cli_env(self.home),
                cwd=REPO,
            )
        self.procs.append(proc)
        return proc


@pytest.fixture
def run_cli(tmp_path: Path, database_url: str) -> Iterator[Cli]:
    """A CLI launcher on a fresh database of each backend."""
    launcher = Cli(tmp_path / "home", database_url)
    yield launcher
    for proc in launcher.procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def _final(url: str, run_id: str) -> tuple[RunPhase, dict[str, TaskPhase]]:
    store = await Store.open(url)
    try:
        run = await store.get_run(run_id)
        latest = await store.latest_attempts(run_id)
        return run.phase, {n: a.phase for n, a in latest.items()}
    finally:
        await store.close()


def _crash_workflow(tmp_path: Path, go: Path) -> tuple[Path, Path]:
    c = tmp_path / "counter"
    tasks = [
        sh("a", f"{mark(c, 'a')}; " + outputs({"v": 7})),
        sh("b", f"{mark(c, 'b')}; while [ ! -e {go} ]; do sleep 0.05; done", dependsOn=["a"]),
        sh("c", f"{mark(c, 'c')}; echo {{{{ tasks.a.outputs.v }}}}", dependsOn=["b"]),
        sh("d", mark(c, "d"), dependsOn=["b"]),
        sh("e", mark(c, "e"), dependsOn=["c", "d"]),
    ]
    wf = _write_workflow(tmp_path / "wf.yaml", tasks, **{"finally": [sh("f", mark(c, "f"))]})
    return wf, c


@pytest.mark.parametrize("finish_while_dead", [False, True], ids=["live", "while-dead"])
def test_sigkill_then_resume_runs_every_task_exactly_once(
    run_cli: Cli, tmp_path: Path, finish_while_dead: bool
) -> None:
    go = tmp_path / "go"
    wf, counter = _crash_workflow(tmp_path, go)
    first = run_cli.start(str(wf), out=tmp_path / "out1")
    run_id = _run_id(tmp_path / "out1")
    _wait(lambda: "b" in lines(counter), "task b to be running")
    first.send_signal(signal.SIGKILL)
    first.wait(GUARD)
    assert lines(counter) == ["a", "b"]
    if finish_while_dead:
        # b's process outlives the engine; it ends while no engine watches it.
        go.touch()
        _wait(lambda: any(tmp_path.glob("home/attempts/*/b.1/rc")), "b to exit")

    second = run_cli.start("--resume", run_id, out=tmp_path / "out2")
    if not finish_while_dead:
        time.sleep(0.3)  # let the new engine re-attach to the live process first
        go.touch()
    assert second.wait(GUARD) == 0, (tmp_path / "out2").read_text()
    assert sorted(lines(counter)) == ["a", "b", "c", "d", "e", "f"]
    phase, tasks = asyncio.run(_final(run_cli.url, run_id))
    assert phase is RunPhase.SUCCEEDED
    assert set(tasks.values()) == {TaskPhase.SUCCEEDED}


def test_repeated_sigkills_never_run_a_task_twice(run_cli: Cli, tmp_path: Path) -> None:
    """Kill the engine each time a task starts, many times over: still exactly once."""
    c = tmp_path / "counter"
    names = [f"t{i}" for i in range(6)]
    tasks = [
        sh(n, f"{mark(c, n)}; sleep 0.2", **({"dependsOn": [names[i - 1]]} if i else {}))
        for i, n in enumerate(names)
    ]
    wf = _write_workflow(tmp_path / "wf.yaml", tasks)
    proc = run_cli.start(str(wf), out=tmp_path / "out")
    run_id = _run_id(tmp_path / "out")
    kills = 0
    while True:
        seen = len(lines(c))
        _wait(
            lambda p=proc, n=seen: p.poll() is not None or len(lines(c)) > n,  # type: ignore[misc]
            "a new task or the end",
        )
        if proc.poll() is not None:
            break
        proc.kill()
        proc.wait(GUARD)
        kills += 1
        proc = run_cli.start("--resume", run_id, out=tmp_path / "out")
    assert proc.returncode == 0
    assert kills >= 3
    assert lines(c) == names
    phase, _ = asyncio.run(_final(run_cli.url, run_id))
    assert phase is RunPhase.SUCCEEDED


def test_ctrl_c_cancels_cleanly(run_cli: Cli, tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    outcome = tmp_path / "outcome"
    tasks = [
        sh("long", f"echo $$ > {pid_file}; exec sleep 30"),
        sh("next", "true", dependsOn=["long"]),
    ]
    report = sh("report", f'echo "{{{{ run.outcome }}}}" > {outcome}')
    wf = _write_workflow(tmp_path / "wf.yaml", tasks, **{"finally": [report]})
    proc = run_cli.start(str(wf), out=tmp_path / "out")
    run_id = _run_id(tmp_path / "out")
    _wait(lambda: pid_file.exists() and pid_file.read_text().strip(), "the task's pid")
    proc.send_signal(signal.SIGINT)
    code = proc.wait(GUARD)
    out = (tmp_path / "out").read_text()
    assert code != 0
    assert "Traceback" not in out
    assert "cancelling" in out
    assert not pid_alive(int(pid_file.read_text()))
    assert outcome.read_text().strip() == "Cancelled"
    phase, tasks_ = asyncio.run(_final(run_cli.url, run_id))
    assert phase is RunPhase.CANCELLED
    assert tasks_ == {
        "long": TaskPhase.CANCELLED,
        "next": TaskPhase.CANCELLED,
        "report": TaskPhase.SUCCEEDED,
    }


def test_sigkill_mid_fan_out_then_resume_runs_each_instance_once(
    run_cli: Cli, tmp_path: Path
) -> None:
    go = tmp_path / "go"
    c = tmp_path / "counter"
    wait = f"; while [ ! -e {go} ]; do sleep 0.05; done"
    tasks = [
        sh(
            "fan",
            mark(c, "{{ item }}") + wait + "; " + outputs({"n": "{{ item }}"}),
            forEach={"items": [f"i{n}" for n in range(6)], "concurrency": 2},
        ),
        sh(
            "join",
            mark(c, "join") + "; echo {{ tasks.fan.outputs.n | shquote }}",
            dependsOn=["fan"],
        ),
    ]
    wf = _write_workflow(tmp_path / "wf.yaml", tasks)
    first = run_cli.start(str(wf), out=tmp_path / "out1")
    run_id = _run_id(tmp_path / "out1")
    _wait(lambda: len(lines(c)) == 2, "two instances to be running")
    first.send_signal(signal.SIGKILL)
    first.wait(GUARD)
    assert sorted(lines(c)) == ["i0", "i1"]  # the first two, started together

    second = run_cli.start("--resume", run_id, out=tmp_path / "out2")
    time.sleep(0.3)  # the new engine re-attaches to the two live instances first
    go.touch()
    assert second.wait(GUARD) == 0, (tmp_path / "out2").read_text()
    # Every instance ran exactly once, across both engines, and the fan-in once after.
    assert sorted(lines(c)) == sorted([f"i{n}" for n in range(6)] + ["join"])
    assert lines(c)[-1] == "join"
    phase, latest = asyncio.run(_final(run_cli.url, run_id))
    assert phase is RunPhase.SUCCEEDED
    assert set(latest) == {f"fan[{n}]" for n in range(6)} | {"join"}
    assert set(latest.values()) == {TaskPhase.SUCCEEDED}


def test_local_run_calls_a_workflow_from_the_files_given(run_cli: Cli, tmp_path: Path) -> None:
    c = tmp_path / "counter"
    child = tmp_path / "child.yaml"
    child.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "maestro.dev/v1alpha1",
                "kind": "Workflow",
                "metadata": {"name": "child"},
                "spec": {
                    "params": [{"name": "n"}],
                    "tasks": [
                        sh("work", mark(c, "child") + "; " + outputs({"v": "{{ params.n }}"}))
                    ],
                    "outputs": [{"name": "v", "value": "{{ tasks.work.outputs.v }}"}],
                },
            }
        )
    )
    call = {"name": "call", "workflow": {"name": "child", "params": {"n": "7"}}}
    parent = _write_workflow(
        tmp_path / "wf.yaml",
        [call, sh("after", mark(c, "after-{{ tasks.call.outputs.v }}"), dependsOn=["call"])],
        outputs=[{"name": "got", "value": "{{ tasks.call.outputs.v }}"}],
    )
    proc = run_cli.start(str(parent), str(child), "--no-cache", out=tmp_path / "out")
    assert proc.wait(GUARD) == 0, (tmp_path / "out").read_text()
    assert lines(c) == ["child", "after-7"]
    assert 'outputs: {"got": "7"}' in (tmp_path / "out").read_text()
    run_id = _run_id(tmp_path / "out")
    shown = subprocess.run(
        cli("history", run_id, "--database-url", run_cli.url),
        capture_output=True,
        text=True,
        env=cli_env(run_cli.home),
        cwd=REPO,
        check=True,
    ).stdout
    assert "child run local/wf-" in shown
    assert ": Succeeded" in shown
    # Without the child's file the run is refused before it starts, naming the call.
    refused = run_cli.start(str(parent), out=tmp_path / "out2")
    assert refused.wait(GUARD) == 1
    assert (
        "calls workflow 'child', which is not among the files given"
        in (tmp_path / "out2").read_text()
    )
