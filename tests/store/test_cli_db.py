"""``maestro db upgrade|current|prune|owners``, in-process and as a real process."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from maestro.api.phases import RunPhase
from maestro.cli.db import Duration, db
from maestro.store import Store, head
from maestro.store.leases import BUCKETS, Leases

UNREACHABLE = "postgresql://nobody:s3cret@127.0.0.1:1/x"
OPERATOR_SRC = str(Path(__file__).parents[2] / "operator")


def test_upgrade_then_current(database_url: str) -> None:
    runner = CliRunner()
    before = runner.invoke(db, ["current", "--database-url", database_url])
    assert before.exit_code == 0, before.output
    assert before.stdout == f"none (this Maestro needs {head()})\n"

    upgraded = runner.invoke(db, ["upgrade"], env={"MAESTRO_DATABASE_URL": database_url})
    assert upgraded.exit_code == 0, upgraded.output
    assert upgraded.stdout == f"database schema is at {head()} (head)\n"

    after = runner.invoke(db, ["current", "--database-url", database_url])
    assert after.stdout == f"{head()} (head)\n"


async def test_prune_deletes_old_finished_runs(database_url: str) -> None:
    store = await Store.open(database_url, migrate=True)
    try:
        old = await store.create_run(
            namespace="ns", name="old", workflow_name=None, spec={}, params={}
        )
        await store.set_run_phase(old.id, RunPhase.CANCELLED)
        await store.create_run(namespace="ns", name="live", workflow_name=None, spec={}, params={})
    finally:
        await store.close()

    runner = CliRunner()
    # The CLI runs its own event loop, so run it off this test's loop.
    kept = await _invoke(runner, ["prune", "--older-than", "30d", "--database-url", database_url])
    assert kept.stdout == "pruned 0 finished runs\n"
    pruned = await _invoke(runner, ["prune", "--older-than", "0s", "--database-url", database_url])
    assert pruned.exit_code == 0, pruned.output
    assert pruned.stdout == "pruned 1 finished run\n"

    store = await Store.open(database_url)
    try:
        assert [r.name for r in await store.list_runs()] == ["live"]
    finally:
        await store.close()


async def _invoke(runner: CliRunner, args: list[str]) -> Result:
    return await asyncio.to_thread(runner.invoke, db, args)


def test_prune_refuses_an_unmigrated_database(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/empty.db"
    result = CliRunner().invoke(db, ["prune", "--older-than", "1d", "--database-url", url])
    assert result.exit_code == 1
    assert result.stderr.startswith("maestro: error: database schema is at no revision")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("90m", timedelta(minutes=90)), ("12h", timedelta(hours=12)), ("30d", timedelta(days=30))],
)
def test_durations(text: str, expected: timedelta) -> None:
    assert Duration().convert(text, None, None) == expected


def test_bad_duration_is_a_usage_error(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/x.db"
    result = CliRunner().invoke(db, ["prune", "--older-than", "30 days", "--database-url", url])
    assert result.exit_code == 2
    assert "not a duration like 90m" in result.stderr


def test_unreachable_database_one_line_no_password(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    result = CliRunner().invoke(db, ["current", "--database-url", UNREACHABLE])
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("maestro: error: cannot connect to database 'x' at 127.0.0.1:1:")
    assert result.stdout == ""
    assert "s3cret" not in result.output
    assert all("s3cret" not in r.getMessage() for r in caplog.records)


def test_unreachable_database_as_a_process() -> None:
    # Through the real interpreter: no traceback, exit status 1, one line.
    script = "from maestro.cli.db import db; db(prog_name='maestro db')"
    result = subprocess.run(
        [sys.executable, "-c", script, "upgrade", "--connect-timeout", "3"],
        env={**os.environ, "MAESTRO_DATABASE_URL": UNREACHABLE, "PYTHONPATH": OPERATOR_SRC},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("maestro: error: cannot connect to database 'x' at 127.0.0.1:1")
    assert "Traceback" not in result.stderr
    assert "s3cret" not in result.stderr


async def test_owners_shows_each_replicas_buckets(database_url: str) -> None:
    store = await Store.open(database_url, migrate=True)
    try:
        a, b = Leases(store, "replica-a", 5.0), Leases(store, "replica-b", 5.0)
        for lease in (a, b, a, b):
            await lease.tick()
        await a.release()  # a graceful stop: a leaves, its buckets are unheld until b ticks
    finally:
        await store.close()
    runner = CliRunner()
    shown = await asyncio.to_thread(
        runner.invoke, db, ["owners", "--database-url", database_url, "-o", "json"]
    )
    assert shown.exit_code == 0, shown.output
    found = json.loads(shown.stdout)
    assert [r["name"] for r in found["replicas"]] == ["replica-b"]
    assert len(found["replicas"][0]["buckets"]) == BUCKETS // 2
    assert len(found["unheld"]) == BUCKETS // 2
    table = await asyncio.to_thread(runner.invoke, db, ["owners", "--database-url", database_url])
    assert table.stdout.splitlines()[1].split()[:3] == ["replica-b", "live", str(BUCKETS // 2)]
    assert "held by no live replica: 0," in table.stdout
