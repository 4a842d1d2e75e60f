"""A local run approved from another terminal, and its history read back from the store."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def maestro(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """One CLI call from another terminal, with a wide console so tables do not wrap."""
    return subprocess.run(
        [sys.executable, "-m", "maestro", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**env, "COLUMNS": "250"},
        timeout=60,
        check=False,
    )


def test_approve_local_run_from_another_process_then_history(tmp_path: Path) -> None:
    env = {**os.environ, "MAESTRO_HOME": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "run.log"
    with log.open("w") as out:
        running = subprocess.Popen(
            [sys.executable, "-m", "maestro", "run", "--local", "examples/approval-gate.yaml"],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=env,
        )
    try:
        deadline = time.monotonic() + 60
        while "approve-release #1 Running" not in log.read_text():
            assert running.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        # The gate shows what its approver is asked, templates rendered.
        asked = re.search(
            r"approve-release #1 Running: waiting for approval: (.*)", log.read_text()
        )
        assert asked is not None, log.read_text()
        assert "{{" not in asked.group(1)
        assert asked.group(1) == "Release app-1.0.0.tar to production?"
        run_id = re.search(r"id ([0-9a-f-]{36})", log.read_text())
        assert run_id is not None
        approve = maestro(env, "approve", "--local", run_id.group(1), "approve-release")
        assert approve.returncode == 0, approve.stderr
        assert running.wait(timeout=60) == 0, log.read_text()
    finally:
        if running.poll() is None:
            running.kill()
    text = log.read_text()
    assert "release #1 Succeeded" in text
    assert "report #1 Succeeded" in text
    history = maestro(env, "history", run_id.group(1))
    assert history.returncode == 0, history.stderr
    assert "Approved" in history.stdout
    assert "Succeeded" in history.stdout
    listing = maestro(env, "history", "-n", "local")
    # Lists show short ids (whole UUIDs wrapped over many lines); they name the run too.
    short = run_id.group(1)[:8]
    assert short in listing.stdout
    assert run_id.group(1) not in listing.stdout
    by_prefix = maestro(env, "history", short)
    assert by_prefix.returncode == 0, by_prefix.stderr
    assert run_id.group(1) in by_prefix.stdout
    missing = maestro(env, "history", "no-such-run")
    assert missing.returncode == 1
    assert "no-such-run" in missing.stderr
