"""What this process knows of the runs it drives, shared by the run controller's parts.

Starting a run records its store id and controls; the controls part compares spec
edits against them; the driver records a run finished and the generation its status
showed. One object holds it all, so forgetting a run (its bucket moved, it was
deleted) drops every piece at once and no part keeps a stale copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from maestro.store import RunRecord


@dataclass
class Known:
    """Per-process memory of runs, keyed by WorkflowRun uid or store run id."""

    ids: dict[str, str] = field(default_factory=dict)  # WorkflowRun uid -> store run id
    # run id -> controls last written
    controls: dict[str, dict[str, Any]] = field(default_factory=dict)
    # run id -> latest metadata.generation seen
    generations: dict[str, int] = field(default_factory=dict)
    finished: set[str] = field(default_factory=set)  # run ids whose daemon wrote the final status
    observed: dict[str, int] = field(default_factory=dict)  # run id -> generation status showed

    def started(self, uid: str, run: RunRecord) -> None:
        """The WorkflowRun ``uid`` is the store's ``run``, with the controls it holds."""
        self.ids[uid] = run.id
        self.controls[run.id] = dict(run.controls)

    def drop(self, run_id: str) -> None:
        """Everything known of ``run_id`` but the uid that leads to it."""
        for known in (self.controls, self.generations, self.observed):
            known.pop(run_id, None)
        self.finished.discard(run_id)
