"""The image users deploy, built from the working tree and run as the chart runs it.

``hack/image.sh`` builds the Dockerfile with buildah (no Docker daemon; a debootstrap
stand-in for the Python base when no registry is reachable). The container runs
``maestro operator`` as the chart's pod does: the image's non-root USER, a read-only root
with only /tmp writable, every capability dropped. ``--network host`` lets it reach the
local control plane and PostgreSQL on 127.0.0.1; the kubeconfig (certificates embedded)
is the only file mounted.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import time
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from fixtures.control_plane import ControlPlane
from fixtures.image import IMAGE_SH, BuiltImage, build_image, podman
from fixtures.operator import REPO, OperatorProcess, apply, wait_phase

pytestmark = pytest.mark.e2e

VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
USER_ID = 10001  # the Dockerfile's USER, and the chart's runAsUser


def _report(request: pytest.FixtureRequest, line: str) -> None:
    """A line in the test output even under capture (-q): the CI time and size matter."""
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print(f"\n{line}", file=sys.stderr, flush=True)


@pytest.fixture(scope="module")
def image(request: pytest.FixtureRequest) -> Iterator[BuiltImage]:
    """The image built from this working tree; reports its size and what the module cost."""
    t0 = time.monotonic()
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        built = build_image(sys.stderr)
    _report(
        request,
        f"image: {built.tag}, {built.size_bytes / 1e6:.0f} MB, built in {built.seconds:.0f}s "
        f"on {'a stand-in base' if 'STAND-IN' in built.base else 'the real base'}",
    )
    yield built
    _report(request, f"image tests: {time.monotonic() - t0:.0f}s in all, build included")


@pytest.fixture
def container_operator(
    control_plane: ControlPlane,
    crds: None,
    namespace: str,
    postgres_url: str,
    tmp_path: Path,
    image: BuiltImage,
) -> Iterator[tuple[OperatorProcess, str]]:
    """The operator as a container of the image, watching this test's namespace."""
    name = f"maestro-e2e-{uuid.uuid4().hex[:8]}"
    # The plane's kubeconfig is root's, mode 0600. The copy is the operator user's, as a
    # mounted Secret is with the pod's fsGroup; still readable by nobody else.
    kubeconfig = tmp_path / "kubeconfig"
    shutil.copyfile(control_plane.kubeconfig, kubeconfig)
    os.chown(kubeconfig, USER_ID, USER_ID)
    kubeconfig.chmod(0o400)
    launcher = [
        "bash",
        str(IMAGE_SH),
        "podman",
        "run",
        "--rm",
        "--name",
        name,
        "--network",
        "host",
        # As the chart's pod: read-only root, /tmp the one writable path (an emptyDir
        # there), no capabilities, no privilege escalation.
        "--read-only",
        "--read-only-tmpfs=false",
        "--tmpfs",
        "/tmp:rw,size=64m,mode=1777",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
        # The same path inside, so the operator's --kubeconfig argument holds as is.
        "--volume",
        f"{kubeconfig}:{kubeconfig}:ro",
        image.tag,
    ]
    op = OperatorProcess(kubeconfig, postgres_url, namespace, tmp_path, launcher=launcher)
    op.start()
    try:
        yield op, name
    finally:
        op.kill(signal.SIGTERM)
        podman("rm", "--force", "--ignore", name, check=False)


def two_task_workflow(name: str) -> dict[str, Any]:
    """a -> b, both container tasks (kwok completes their pods)."""
    container = {"image": "busybox", "command": ["true"]}
    return {
        "apiVersion": "maestro.dev/v1alpha1",
        "kind": "Workflow",
        "metadata": {"name": name},
        "spec": {
            "tasks": [
                {"name": "a", "container": container},
                {"name": "b", "dependsOn": ["a"], "container": container},
            ]
        },
    }


def test_image_config_is_what_the_chart_expects(image: BuiltImage) -> None:
    chart = yaml.safe_load((REPO / "charts" / "maestro" / "Chart.yaml").read_text())
    values = yaml.safe_load((REPO / "charts" / "maestro" / "values.yaml").read_text())
    # The chart's default image (tag empty: appVersion) is exactly what was built.
    assert image.tag == f"{values['image']['repository']}:{chart['appVersion']}"
    config = yaml.safe_load(
        podman("image", "inspect", "--format", "{{json .Config}}", image.tag).stdout
    )
    assert config["User"] == f"{USER_ID}:{USER_ID}"
    assert config["Entrypoint"] == ["maestro"]
    assert config["Cmd"] == ["operator"]
    assert config["Labels"]["org.opencontainers.image.version"] == VERSION


def test_image_runs_the_operator_to_succeeded(
    control_plane: ControlPlane,
    namespace: str,
    container_operator: tuple[OperatorProcess, str],
) -> None:
    op, name = container_operator
    # The operator process itself, seen from the host: the image's non-root user.
    pid = int(podman("inspect", "--format", "{{.State.Pid}}", name).stdout)
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert b"operator" in cmdline, cmdline
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    assert status["Uid"].split() == [str(USER_ID)] * 4
    assert status["Gid"].split() == [str(USER_ID)] * 4
    # Even root in the container cannot write the image; the operator's user can write /tmp.
    denied = podman("exec", "--user", "0", name, "touch", "/opt/maestro/x", check=False)
    assert denied.returncode != 0
    assert "Read-only file system" in denied.stderr, denied
    podman("exec", name, "touch", "/tmp/probe")

    apply(control_plane, namespace, two_task_workflow("pipeline"))
    apply(
        control_plane,
        namespace,
        {
            "apiVersion": "maestro.dev/v1alpha1",
            "kind": "WorkflowRun",
            "metadata": {"name": "r1"},
            "spec": {"workflowRef": {"name": "pipeline"}},
        },
    )
    run = wait_phase(control_plane, namespace, "r1")
    assert run["status"]["phase"] == "Succeeded", run["status"]
    assert {t: s["phase"] for t, s in run["status"]["tasks"].items()} == {
        "a": "Succeeded",
        "b": "Succeeded",
    }

    assert op.get("/healthz") == (200, '{"status": "ok"}')
    assert op.get("/readyz")[0] == 200
    metrics = op.get("/metrics")[1]
    assert 'maestro_task_attempts_total{result="Succeeded"} 2.0' in metrics
    assert 'maestro_runs{phase="Succeeded"} 1.0' in metrics
