"""Helpers for the engine tests: build specs, drive runs in-process, read side effects.

Everything is real: the engine, the store (SQLite or PostgreSQL), the local
executor's subprocesses and an HTTP client. Only the no-op executor is in-process,
for DAGs too large to spend a subprocess per task on.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from maestro.api.models import WorkflowSpec
from maestro.engine.driver import Waker, drive
from maestro.engine.engine import Engine
from maestro.engine.executor import Executor
from maestro.executors.approval import ApprovalExecutor
from maestro.executors.http import HttpExecutor
from maestro.executors.local import LocalExecutor
from maestro.executors.secrets import EnvSecrets
from maestro.executors.workflow import LocalWorkflows
from maestro.store import AttemptRecord, RunRecord, Store

REPO = Path(__file__).resolve().parents[2]
# Hang guard only: every run in these tests ends in a few seconds when it works.
HANG_GUARD = 60.0


def sh(name: str, script: str, **extra: Any) -> dict[str, Any]:
    """A container task that runs ``script`` with ``sh -c`` (local mode ignores the image)."""
    return {"name": name, "container": {"image": "none", "command": ["sh", "-c", script]}, **extra}


def mark(counter: Path, name: str) -> str:
    """Shell that appends ``name`` to ``counter``: one line per execution of the task."""
    return f"echo {shlex.quote(name)} >> {shlex.quote(str(counter))}"


def outputs(value: Mapping[str, Any]) -> str:
    """Shell that writes ``value`` as the task's JSON outputs."""
    return f'echo {shlex.quote(json.dumps(value))} > "$MAESTRO_OUTPUTS"'


def spec_of(tasks: list[dict[str, Any]], **fields: Any) -> WorkflowSpec:
    """A validated WorkflowSpec from wire-format task dicts (camelCase keys)."""
    return WorkflowSpec.model_validate({"tasks": tasks, **fields})


def lines(path: Path) -> list[str]:
    """The lines of a side-effect file (empty when nothing ever wrote to it)."""
    return path.read_text().split() if path.exists() else []


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a live process; zombies (killed, not yet reaped) count as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X")


@dataclass
class Harness:
    """An engine with the local, HTTP and approval executors over one store."""

    store: Store
    root: Path
    waker: Waker
    engine: Engine
    local: LocalExecutor
    counter: Path
    children: LocalWorkflows  # set .workflows to what workflow tasks may call
    drives: list[asyncio.Task[RunRecord]] = field(default_factory=list)

    async def create(
        self, spec: WorkflowSpec, params: Mapping[str, str] | None = None, **kw: Any
    ) -> RunRecord:
        """Record a new run of ``spec``."""
        return await self.engine.create_run(
            namespace="test", name="run", spec=spec, params=dict(params or {}), **kw
        )

    def drive(self, run_id: str) -> asyncio.Task[RunRecord]:
        """Drive ``run_id`` to its end in the background."""
        task = asyncio.create_task(drive(self.engine, run_id, self.waker, poll_seconds=0.1))
        self.drives.append(task)
        return task

    async def run(self, spec: WorkflowSpec, params: Mapping[str, str] | None = None) -> RunRecord:
        """Create a run of ``spec`` and drive it to its end."""
        run = await self.create(spec, params)
        return await asyncio.wait_for(self.drive(run.id), HANG_GUARD)

    async def latest(self, run_id: str) -> dict[str, AttemptRecord]:
        """The newest attempt of every task."""
        return await self.store.latest_attempts(run_id)

    async def wait_for(self, run_id: str, task: str, phase: str) -> AttemptRecord:
        """Poll the store until ``task``'s latest attempt is in ``phase``."""
        async with asyncio.timeout(HANG_GUARD):
            while True:
                att = (await self.latest(run_id)).get(task)
                if att is not None and att.phase.value == phase:
                    return att
                await asyncio.sleep(0.05)

    async def wait_file(self, path: Path) -> str:
        """Poll until ``path`` exists with content; return it."""
        async with asyncio.timeout(HANG_GUARD):
            while not path.exists() or not path.read_text().strip():
                await asyncio.sleep(0.05)
        return path.read_text()

    async def wait_lines(self, path: Path, count: int) -> list[str]:
        """Poll until ``path`` has ``count`` lines: that many executions wrote their mark."""
        async with asyncio.timeout(HANG_GUARD):
            while len(lines(path)) < count:
                await asyncio.sleep(0.05)
        return lines(path)

    async def control(self, run_id: str, **changes: Any) -> None:
        """Change the run's controls, as the operator or CLI would, and wake the driver."""
        await self.engine.update_controls(run_id, **changes)
        self.waker(run_id)


@asynccontextmanager
async def harness(
    url: str, root: Path, *, max_output_bytes: int = 64 * 1024
) -> AsyncIterator[Harness]:
    """A :class:`Harness` on the store at ``url``; stops whatever it left running."""
    store = await Store.open(url, migrate=True, max_output_bytes=max_output_bytes)
    waker = Waker()
    secrets = EnvSecrets()
    async with httpx.AsyncClient() as client:
        local = LocalExecutor(root / "attempts", secrets, waker)
        children = LocalWorkflows({}, waker)
        executors: dict[str, Executor] = {
            "container": local,
            "http": HttpExecutor(secrets, waker, client),
            "approval": ApprovalExecutor(),
            "workflow": children,
        }
        engine = Engine(store, executors)
        children.bind(engine)
        h = Harness(store, root, waker, engine, local, root / "counter", children)
        try:
            yield h
        finally:
            for task in h.drives:
                task.cancel()
            await asyncio.gather(*h.drives, return_exceptions=True)
            await _kill_leftovers(root / "attempts")
            await store.close()


async def _kill_leftovers(attempts: Path) -> None:
    """Kill attempt processes a failing test left behind, so nothing outlives the test."""
    for pid_file in attempts.glob("*/*/pid"):
        try:
            pid = int(pid_file.read_text())
            os.killpg(pid, 9)
        except (ValueError, ProcessLookupError, PermissionError):
            continue


def cli(*args: str) -> list[str]:
    """argv of ``python -m maestro`` with ``args``."""
    return [sys.executable, "-m", "maestro", *args]


def cli_env(home: Path, **extra: str) -> dict[str, str]:
    """Environment for a CLI subprocess: its own MAESTRO_HOME, no inherited database URL."""
    env = {k: v for k, v in os.environ.items() if k != "MAESTRO_DATABASE_URL"}
    env.update({"MAESTRO_HOME": str(home), "PYTHONPATH": str(REPO / "operator"), **extra})
    return env
