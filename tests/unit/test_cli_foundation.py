"""``maestro validate``, ``graph`` and ``crds`` as a user runs them."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def maestro(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "maestro", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )


def test_examples_are_valid() -> None:
    examples = sorted(str(p) for p in (ROOT / "examples").glob("*.yaml"))
    assert len(examples) >= 4
    result = maestro("validate", *examples)
    assert result.returncode == 0, result.stderr
    assert "documents valid" in result.stdout


WF = "apiVersion: maestro.dev/v1alpha1\nkind: Workflow\nmetadata: {name: x}\nspec:\n"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            WF + "  tasks:\n  - {name: a, dependsOn: [b], container: {image: x}}\n"
            "  - {name: b, dependsOn: [a], container: {image: x}}\n",
            ": a: dependency cycle: a -> b -> a",
        ),
        (
            WF + "  tasks:\n  - {name: a, dependsOn: [nope], container: {image: x}}\n",
            ": a: depends on unknown task 'nope'",
        ),
        ("a: [\n", ": invalid YAML: line 2 column 1"),
        (
            "apiVersion: v9\nkind: Workflow\n",
            ": apiVersion: expected 'maestro.dev/v1alpha1', got 'v9'",
        ),
        (
            "apiVersion: maestro.dev/v1alpha1\nkind: Job\n",
            ": kind: expected Workflow, WorkflowRun or WorkflowSchedule, got 'Job'",
        ),
        (
            WF + "  tasks:\n  - {name: a, colour: red, container: {image: x}}\n",
            ": spec.tasks[0].colour: unknown field",
        ),
        (
            WF + "  concurrency: lots\n  tasks:\n  - {name: a, container: {image: x}}\n",
            ": spec.concurrency: Input should be a valid integer",
        ),
        (
            WF + "  tasks:\n  - {name: a, container: {image: x}, http: {url: x}}\n",
            ": spec.tasks[0]: exactly one of container, http, approval and workflow must be set",
        ),
    ],
)
def test_invalid_manifests_give_one_line_per_problem(
    tmp_path: Path, body: str, expected: str
) -> None:
    f = tmp_path / "wf.yaml"
    f.write_text(body)
    result = maestro("validate", str(f))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    first = result.stderr.splitlines()[0]
    assert first.startswith(str(f)), result.stderr
    assert expected in first, result.stderr


def test_graph_formats() -> None:
    mermaid = maestro("graph", "examples/sdlc-parallel.yaml")
    assert mermaid.returncode == 0
    assert "design --> backend" in mermaid.stdout
    assert "design --> frontend" in mermaid.stdout
    assert "subgraph finally" in mermaid.stdout
    dot = maestro("graph", "--format", "dot", "examples/sdlc-parallel.yaml")
    assert '"backend" -> "testing";' in dot.stdout


def test_crds_command_prints_every_definition() -> None:
    result = maestro("crds")
    docs = list(yaml.safe_load_all(result.stdout))
    assert {d["metadata"]["name"] for d in docs} == {
        "workflows.maestro.dev",
        "workflowruns.maestro.dev",
        "workflowschedules.maestro.dev",
    }
