"""Reading manifest files for the CLI, with one-line errors that name file and field."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from maestro.api.parse import Manifest, ManifestError, parse_manifest


@dataclass(frozen=True)
class Loaded:
    """One document of a file, parsed, or the problems that stopped it."""

    path: Path
    index: int
    manifest: Manifest | None
    problems: tuple[str, ...] = ()

    @property
    def where(self) -> str:
        """``file`` or ``file#2`` for the third document of a multi-document file."""
        return str(self.path) if self.index == 0 else f"{self.path}#{self.index}"


def load_file(path: Path) -> list[Loaded]:
    """Every document in a YAML file; never raises for bad content."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        return [Loaded(path, 0, None, (f"cannot read: {err.strerror}",))]
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1} column {mark.column + 1}: " if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        return [Loaded(path, 0, None, (f"invalid YAML: {where}{problem}",))]
    if not docs:
        return [Loaded(path, 0, None, ("empty file: no Workflow or WorkflowRun in it",))]
    out = []
    for i, doc in enumerate(docs):
        try:
            out.append(Loaded(path, i, parse_manifest(doc)))
        except ManifestError as err:
            out.append(Loaded(path, i, None, tuple(err.problems)))
    return out
