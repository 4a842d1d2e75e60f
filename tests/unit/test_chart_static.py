"""Packaging files that must agree without a cluster: CRD copies, lock, Dockerfile, values."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "maestro"
TOP_CRDS = sorted(p.name for p in (REPO / "crds").glob("*.yaml"))


def test_top_level_crds_exist() -> None:
    assert TOP_CRDS == [
        "maestro.dev_workflowruns.yaml",
        "maestro.dev_workflows.yaml",
        "maestro.dev_workflowschedules.yaml",
    ]


@pytest.mark.parametrize("copy_dir", ["charts/maestro/crds", "manifests/base/crds"])
@pytest.mark.parametrize("name", TOP_CRDS)
def test_crd_copies_are_identical(copy_dir: str, name: str) -> None:
    # Helm and kustomize both refuse files outside their root, so these are copies.
    assert (REPO / copy_dir / name).read_bytes() == (REPO / "crds" / name).read_bytes(), (
        f"{copy_dir}/{name} differs from crds/{name}: "
        "cp crds/*.yaml charts/maestro/crds/ && cp crds/*.yaml manifests/base/crds/"
    )


def test_chart_ships_only_known_crds() -> None:
    # A stale CRD left in the chart would be installed with every release (Kopf's peering
    # CRDs went with peering: the replicas share the runs through the store).
    names = sorted(p.name for p in (CHART / "crds").iterdir())
    assert names == TOP_CRDS


def _packaging_files() -> list[Path]:
    return sorted(p for root in (CHART, REPO / "manifests") for p in root.rglob("*") if p.is_file())


def test_no_kopf_peering_left_in_chart_or_manifests() -> None:
    found = [
        f"{p.relative_to(REPO)}:{n}"
        for p in _packaging_files()
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if re.search(r"peering|kopf\.dev", line, re.I)
    ]
    assert found == []
    assert not (CHART / "templates" / "peering.yaml").exists()


def test_values_have_lease_settings_and_no_peering() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert values["lease"] == {"seconds": 5, "renewSeconds": 1}
    assert "peering" not in values
    assert "peering" not in schema["properties"]
    lease = schema["properties"]["lease"]
    assert lease["additionalProperties"] is False
    assert set(lease["properties"]) == set(values["lease"])


def test_deployment_template_passes_replica_and_lease_flags() -> None:
    text = (CHART / "templates" / "deployment.yaml").read_text()
    assert "- --replica=$(POD_NAME)\n" in text
    assert "- --lease-seconds={{ .Values.lease.seconds }}\n" in text
    assert "- --renew-seconds={{ .Values.lease.renewSeconds }}\n" in text
    assert re.search(
        r"- name: POD_NAME\n\s+valueFrom:\n\s+fieldRef:\n\s+fieldPath: metadata\.name\n", text
    )


def test_manifests_base_deployment_passes_replica_and_lease_flags() -> None:
    deployment = yaml.safe_load((REPO / "manifests" / "base" / "deployment.yaml").read_text())
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    lease = values["lease"]
    assert {
        "--replica=$(POD_NAME)",
        f"--lease-seconds={lease['seconds']}",
        f"--renew-seconds={lease['renewSeconds']}",
    } <= set(container["args"])
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}


def test_lock_pins_every_runtime_dependency() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = {re.split(r"[\[<>=!~ ;]", d, maxsplit=1)[0].lower() for d in project["dependencies"]}
    lock = (REPO / "requirements.lock").read_text()
    pinned = {m.group(1).lower() for m in re.finditer(r"^([A-Za-z0-9_.-]+)==", lock, re.M)}
    assert wanted - pinned == set()


def test_lock_has_hashes_for_every_pin() -> None:
    # The Dockerfile installs with --require-hashes, which fails on any unhashed line.
    lock = (REPO / "requirements.lock").read_text()
    entries = re.split(r"\n(?=[A-Za-z0-9_.-]+==)", lock.split("\n\n", 1)[1])
    unhashed = [e.split()[0] for e in entries if "--hash=sha256:" not in e]
    assert unhashed == []


def test_dockerfile_runs_non_root_maestro_operator() -> None:
    text = (REPO / "Dockerfile").read_text()
    final_stage = text.rsplit("\nFROM ", 1)[1]
    assert re.search(r"^USER 10001:10001$", final_stage, re.M)
    assert 'ENTRYPOINT ["maestro"]' in final_stage
    assert 'CMD ["operator"]' in final_stage
    assert "--require-hashes -r requirements.lock" in text


def test_values_file_matches_schema_keys() -> None:
    # additionalProperties is false at the top: a key in values.yaml the schema does not
    # declare would make every install fail.
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert set(values) - set(schema["properties"]) == set()


def test_chart_default_image_tag_is_the_package_version() -> None:
    # An install with default values must pull the image of the code it was released with.
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert chart["appVersion"] == version
    assert values["image"]["tag"] in ("", version)
    assert values["image"]["repository"] == "ghcr.io/maestro-dev/maestro"
    # An empty tag means appVersion only through this default in the template.
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    assert "(default .Chart.AppVersion .Values.image.tag)" in helpers
    package = (REPO / "operator" / "maestro" / "__init__.py").read_text()
    assert f'__version__ = "{version}"' in package
    assert f"ARG VERSION={version}\n" in (REPO / "Dockerfile").read_text()
