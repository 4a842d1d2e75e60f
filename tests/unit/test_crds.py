"""The committed CRDs are exactly what the models generate, and are structural."""

from pathlib import Path
from typing import Any

import yaml

from maestro.api.crd import crds, render

ROOT = Path(__file__).resolve().parents[2]


def test_committed_crds_match_models() -> None:
    generated = crds()
    committed = {p.name for p in (ROOT / "crds").glob("*.yaml")}
    assert committed == set(generated), (
        "crds/ has extra or missing files: run `maestro crds --write crds`"
    )
    for name, crd in generated.items():
        on_disk = (ROOT / "crds" / name).read_text()
        assert on_disk == render(crd), f"crds/{name} is stale: run `maestro crds --write crds`"


def _walk(node: Any, path: str = "") -> list[str]:
    """Structural-schema rule violations under ``node``."""
    bad: list[str] = []
    if not isinstance(node, dict):
        return bad
    for forbidden in ("$ref", "anyOf", "oneOf", "allOf", "const", "title", "default"):
        if forbidden in node:
            bad.append(f"{path}: has {forbidden}")
    if "type" not in node and not (
        node.get("x-kubernetes-preserve-unknown-fields") or node.get("x-kubernetes-int-or-string")
    ):
        bad.append(f"{path}: has no type")
    if node.get("additionalProperties") is False:
        bad.append(f"{path}: additionalProperties false")
    for key, sub in node.get("properties", {}).items():
        bad += _walk(sub, f"{path}.{key}")
    if "items" in node:
        bad += _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        bad += _walk(node["additionalProperties"], f"{path}{{}}")
    return bad


def test_schemas_are_structural() -> None:
    for crd in crds().values():
        schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        assert _walk(schema) == []


def test_crd_shape_for_kubectl() -> None:
    run = crds()["maestro.dev_workflowruns.yaml"]
    version = run["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "Phase",
        "Progress",
        "Age",
        "Started",
        "Duration",
        "Message",
    ]
    assert run["spec"]["names"]["categories"] == ["maestro"]
    assert run["spec"]["names"]["shortNames"] == ["mwr"]
    props = version["schema"]["openAPIV3Schema"]["properties"]
    task = props["spec"]["properties"]["workflowSpec"]["properties"]["tasks"]["items"]
    assert task["properties"]["name"]["pattern"] == "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
    assert "has(self.container)" in task["x-kubernetes-validations"][0]["rule"]
    phase = props["status"]["properties"]["phase"]
    assert phase["enum"] == ["Pending", "Running", "Suspended", "Succeeded", "Failed", "Cancelled"]
    outputs = props["status"]["properties"]["tasks"]["additionalProperties"]["properties"][
        "outputs"
    ]
    assert outputs["x-kubernetes-preserve-unknown-fields"] is True


def test_rendered_yaml_has_no_anchors() -> None:
    for crd in crds().values():
        text = render(crd)
        assert "&id" not in text
        assert "*id" not in text
        assert yaml.safe_load(text) == crd
