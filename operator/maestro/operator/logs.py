"""Log lines that name their run: namespace, run name, run id and task on every line.

Each WorkflowRun is driven by its own asyncio task (a Kopf daemon), so the run is bound
once with :func:`bind_run` in a context variable and every line logged from that task,
or from tasks it spawns (they copy the context), carries it; no call site passes it.
:class:`RunContextFilter` copies the fields onto each record, the JSON formatter prints
them, so ``kubectl logs … | jq 'select(.run_id == "…")'`` is one run's story.
"""

from __future__ import annotations

import json
import logging
from contextvars import ContextVar
from typing import Any

from maestro.k8s.client import APIError
from maestro.store import EventRecord

#: The fields a run's log lines carry, in the order the JSON shows them.
RUN_FIELDS = ("namespace", "run", "run_id", "task")

_run: ContextVar[dict[str, str] | None] = ContextVar("maestro_run", default=None)

_operator_log = logging.getLogger("maestro.operator")


def bind_run(namespace: str, name: str, run_id: str | None = None) -> None:
    """Name the run the current task (and tasks it starts from now on) works for."""
    fields = {"namespace": namespace, "run": name}
    if run_id:
        fields["run_id"] = run_id
    _run.set(fields)


def event_line(e: EventRecord) -> tuple[str, dict[str, Any]]:
    """A log message and ``extra`` fields for one entry of a run's event log."""
    what = e.kind if e.task is None else f"task {e.task} attempt {e.attempt}"
    change = f"{e.from_phase or 'new'} -> {e.to_phase}" if e.to_phase else e.kind
    text = f"{what}: {change}"
    if e.reason:
        text += f" ({e.reason})"
    if e.message:
        text += f": {e.message}"
    extra: dict[str, Any] = {"event": e.kind}
    if e.task is not None:
        extra["task"] = e.task
        extra["attempt"] = e.attempt
    if e.reason:
        extra["reason"] = e.reason
    return text, extra


def log_trouble(namespace: str, name: str, err: Exception) -> None:
    """Log a run's pass that went wrong and is retried: one line for the API's trouble
    (expected, it comes back), a traceback for anything else (a bug).

    Call it from the ``except`` block, where the traceback is still at hand.
    """
    if isinstance(err, APIError):
        _operator_log.warning("run %s/%s: Kubernetes API: %s; retrying", namespace, name, err)
    else:
        _operator_log.exception("run %s/%s: unexpected error; retrying", namespace, name)


class RunContextFilter(logging.Filter):
    """Adds the bound run's fields to records that do not set them through ``extra``."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Never drops a record."""
        for key, value in (_run.get() or {}).items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for cluster log collectors."""

    _EXTRA = (*RUN_FIELDS, "attempt", "event", "reason", "trace_id")

    def format(self, record: logging.LogRecord) -> str:
        """time, level, logger, message, the run's fields when known, and any error."""
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in self._EXTRA:
            value = getattr(record, key, None)
            if value is not None:
                entry[key] = value
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class TextFormatter(logging.Formatter):
    """Plain lines, with the run (and task) in brackets when the line is about one."""

    def __init__(self) -> None:
        """Time, level and logger first, as people read them."""
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        """The plain line plus ``[namespace/run task]``."""
        line = super().format(record)
        run = getattr(record, "run", None)
        if run is None:
            return line
        where = f"{getattr(record, 'namespace', '')}/{run}"
        task = getattr(record, "task", None)
        return f"{line} [{where}{' ' + task if task else ''}]"
