"""Local mode: a container task's command runs as a subprocess on this machine.

The image is not used (the CLI says so). Each attempt gets a directory; a small
shell wrapper claims it atomically (``mkdir``), records its pid and, at the end,
the exit code. The engine may die at any point: a new process finds the
directory, waits for a live pid or reads the exit code, so no command runs twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path

from maestro.engine.executor import AttemptContext, Result, Wake
from maestro.executors.environment import parse_outputs, task_env
from maestro.executors.secrets import SecretReader, SecretUnavailable, run_service_account

# $0 is the attempt directory; the command follows as "$@".
_WRAPPER = (
    'mkdir "$0/claimed" 2>/dev/null || exit 0; '
    'echo $$ > "$0/pid.tmp" && mv "$0/pid.tmp" "$0/pid"; '
    '"$@"; rc=$?; echo $rc > "$0/rc.tmp" && mv "$0/rc.tmp" "$0/rc"'
)
_LOG_TAIL = 5
# The only variables of the user's environment a local task sees: enough to find
# programs and write files, not the user's tokens and credentials (docs/security.md).
PASSED_ENV = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR")
_POLL_SECONDS = 0.2
_GRACE_SECONDS = 5.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class LocalExecutor:
    """Runs ``command`` + ``args`` of container tasks with ``/bin/sh`` on this machine."""

    def __init__(self, root: Path, secrets: SecretReader, wake: Wake) -> None:
        """``root`` holds one directory per attempt; ``wake`` is told when one ends."""
        self.root = root
        self.secrets = secrets
        self.wake = wake
        self._watchers: dict[Path, asyncio.Task[None]] = {}

    def directory(self, ctx: AttemptContext) -> Path:
        """Where an attempt's pid, exit code, outputs and log live."""
        return self.root / ctx.run.id / f"{ctx.task.name}.{ctx.attempt}"

    def handle(self, ctx: AttemptContext) -> str | None:
        """None: the attempt directory is derived from run, task and attempt, and its path
        does not fit the store's ``job_name`` (a Kubernetes name, at most 63 characters)."""
        return None

    async def start(self, ctx: AttemptContext) -> None:
        """Spawn the wrapper in its own session, so Ctrl-C reaches the engine only."""
        d = self.directory(ctx)
        if (d / "claimed").exists():
            return
        d.mkdir(parents=True, exist_ok=True)
        spec = ctx.task.container
        assert spec is not None
        argv = [*(spec.command or []), *(spec.args or [])]
        if not argv:
            (d / "error").write_text(
                "container task has no command: local mode runs the command without the "
                f"image {spec.image!r}, so the image's entrypoint is unknown"
            )
            self.wake(ctx.run.id)
            return
        env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
        env.update(task_env(ctx, str(d / "outputs.json")))
        for var in spec.env:
            if var.value is not None:
                env[var.name] = var.value
            elif var.value_from is not None:
                ref = var.value_from.secret_key_ref
                try:
                    env[var.name] = await self.secrets.read(
                        ctx.run.namespace,
                        ref.name,
                        ref.key,
                        service_account=run_service_account(ctx.run.spec),
                    )
                except SecretUnavailable as err:
                    (d / "error").write_text(f"env {var.name}: {err}")
                    self.wake(ctx.run.id)
                    return
        cwd = spec.working_dir if spec.working_dir and Path(spec.working_dir).is_dir() else None
        with (d / "log").open("ab") as log:
            proc = await asyncio.create_subprocess_exec(
                "/bin/sh",
                "-c",
                _WRAPPER,
                str(d),
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )
        self._watch(d, ctx.run.id, proc)

    def _watch(self, d: Path, run_id: str, proc: asyncio.subprocess.Process | None) -> None:
        async def wait() -> None:
            if proc is not None:
                await proc.wait()
            else:
                while not (d / "rc").exists() and self._pid_alive(d):
                    await asyncio.sleep(_POLL_SECONDS)
            self._watchers.pop(d, None)
            self.wake(run_id)

        if d not in self._watchers:
            self._watchers[d] = asyncio.create_task(wait())

    def _pid_alive(self, d: Path) -> bool:
        """Whether the attempt's process lives. Claimed with no pid written yet is starting
        (alive); a pid that appears between the two looks is read again, since a fast
        command may be running by then and its exit code not yet written."""
        for _ in range(2):
            try:
                return _alive(int((d / "pid").read_text()))
            except (FileNotFoundError, ValueError):
                if not (d / "claimed").exists():
                    return False
                if not (d / "pid").exists():
                    return True
        return False

    async def poll(self, ctx: AttemptContext) -> Result | None:
        """Read the exit code and outputs; re-attach to a live process after a restart."""
        d = self.directory(ctx)
        error = d / "error"
        if error.exists():
            return Result.failed(error.read_text(), "InputError")
        rc_file = d / "rc"
        if rc_file.exists():
            return self._result(d, int(rc_file.read_text().strip() or "1"))
        if not (d / "claimed").exists():
            if d not in self._watchers:
                await self.start(ctx)  # the engine died between recording Running and starting
            return None
        if self._pid_alive(d):
            self._watch(d, ctx.run.id, None)
            return None
        if rc_file.exists():  # it ended between the two checks
            return self._result(d, int(rc_file.read_text().strip() or "1"))
        return Result.failed(
            "the process disappeared without an exit code (machine restart?)", "Interrupted"
        )

    def _result(self, d: Path, rc: int) -> Result:
        if rc != 0:
            tail = self.log_tail(d)
            hint = " (command not found)" if rc == 127 else ""
            return Result.failed(
                f"exit code {rc}{hint}: {tail}" if tail else f"exit code {rc}{hint}"
            )
        outputs_file = d / "outputs.json"
        text = outputs_file.read_text() if outputs_file.exists() else ""
        outputs, problem = parse_outputs(text, source="$MAESTRO_OUTPUTS")
        if problem is not None:
            return Result.failed(problem, "InvalidOutputs")
        return Result.succeeded(outputs or {})

    @staticmethod
    def log_tail(d: Path) -> str:
        """The last lines of an attempt's log, joined on one line."""
        try:
            lines = (d / "log").read_text(errors="replace").strip().splitlines()
        except FileNotFoundError:
            return ""
        return " | ".join(lines[-_LOG_TAIL:])

    async def stop(self, ctx: AttemptContext) -> None:
        """TERM the attempt's process group, KILL it after a grace period."""
        d = self.directory(ctx)
        try:
            pid = int((d / "pid").read_text())
        except (FileNotFoundError, ValueError):
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        # The whole group, not just the wrapper: the wrapper dies on TERM at once, while
        # the command it started may ignore TERM and would then outlive the stop.
        for _ in range(int(_GRACE_SECONDS / _POLL_SECONDS)):
            if not _group_alive(pid):
                return
            await asyncio.sleep(_POLL_SECONDS)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
