"""The web UI in Debian's headless Chromium, driven by Playwright, on a real server.

Screenshots go to ``build/screenshots/`` (or ``$MAESTRO_SCREENSHOTS``) for a person to look
at; the assertions are on the page's content.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Locator, Page, expect, sync_playwright

from fixtures.control_plane import ControlPlane
from fixtures.operator import REPO, apply
from fixtures.server import ServerProcess

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"  # Debian's package (hack/install-deps.sh); never a download
SHOTS = Path(os.environ.get("MAESTRO_SCREENSHOTS", REPO / "build" / "screenshots"))

PIPELINE = {
    "apiVersion": "maestro.dev/v1alpha1",
    "kind": "Workflow",
    "metadata": {"name": "pipeline"},
    "spec": {
        "params": [{"name": "version", "default": "1.0"}],
        "tasks": [
            {"name": "checkout", "container": {"image": "busybox", "command": ["true"]}},
            *(
                {
                    "name": f"test-{i}",
                    "dependsOn": ["checkout"],
                    "container": {"image": "busybox", "command": ["true"]},
                }
                for i in range(3)
            ),
            {
                "name": "release-gate",
                "dependsOn": ["test-0", "test-1", "test-2"],
                "approval": {"message": "Release version {{ params.version }} to production?"},
            },
            {
                "name": "deploy",
                "dependsOn": ["release-gate"],
                "container": {"image": "busybox", "command": ["true"]},
            },
        ],
        "finally": [{"name": "notify", "container": {"image": "busybox", "command": ["true"]}}],
    },
}


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Headless Chromium from Debian's package."""
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


def signed_in_page(browser: Browser, server: ServerProcess, token: str, hash: str) -> Page:
    """A page at ``/ui/HASH`` that signs in through the UI's token form."""
    page = browser.new_page(viewport={"width": 1500, "height": 900})
    page.goto(f"{server.base}/ui/{hash}")
    page.fill("#token", token)
    page.click("#login-form button[type=submit]")
    return page


def node(page: Page, task: str) -> Locator:
    """The DAG node of one task."""
    return page.locator(f'#dag g.node[data-task="{task}"]')


def expect_phase(page: Page, task: str, phase: str, timeout: float = 60_000) -> None:
    """Wait until a task's node is drawn in ``phase`` (its colour comes from that class)."""
    pattern = re.compile(rf"(^|\s){phase}(\s|$)")
    expect(node(page, task)).to_have_class(pattern, timeout=timeout)


def test_ui_runs_a_workflow_approves_its_gate_and_shows_deleted_history(
    control_plane: ControlPlane,
    namespace: str,
    server: ServerProcess,
    user_token: str,
    browser: Browser,
) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    apply(control_plane, namespace, PIPELINE)
    status, started = server.call(
        "POST",
        f"/api/workflows/pipeline/execute?namespace={namespace}",
        token=user_token,
        body={"version": "2.1"},
    )
    assert status == 201, started
    run_id = started["runId"]

    # This user may list runs only in their namespace: the list is filtered by it.
    page = signed_in_page(browser, server, user_token, f"#/?namespace={namespace}")
    # The runs list, live: the new run is there.
    expect(page.locator(f'tr.run[data-id="{run_id}"]')).to_be_visible(timeout=20_000)
    page.click(f'tr.run[data-id="{run_id}"]')
    expect(page.locator("#dag svg")).to_be_visible()
    # Upstream tasks turn green while the page is open (live events), the gate waits.
    for task in ("checkout", "test-0", "test-1", "test-2"):
        expect_phase(page, task, "Succeeded")
    expect_phase(page, "release-gate", "Running")
    expect_phase(page, "deploy", "Pending", timeout=5_000)
    page.screenshot(path=str(SHOTS / "run-waiting-at-gate.png"), full_page=True)

    node(page, "release-gate").click()
    expect(page.locator("#gate-message")).to_have_text("Release version 2.1 to production?")
    page.click("#approve")
    expect(page.locator("#approve")).to_have_text("Approved")
    for task in ("release-gate", "deploy", "notify"):
        expect_phase(page, task, "Succeeded")
    expect(page.locator("#run-phase")).to_have_text("Succeeded", timeout=60_000)
    node(page, "deploy").click()
    expect(page.locator("#attempts")).to_contain_text("Succeeded")
    page.get_by_role("button", name="Logs").click()
    expect(page.locator("#logs")).to_contain_text("==> deploy attempt 1")
    page.screenshot(path=str(SHOTS / "run-succeeded.png"), full_page=True)

    # Delete the resource: the store keeps the history, and the UI says it is history only.
    control_plane.kubectl("delete", "workflowrun", "-n", namespace, started["name"])
    page.goto(f"{server.base}/ui/#/?namespace={namespace}")
    page.click(f'tr.run[data-id="{run_id}"]')
    expect(page.locator("#deleted")).to_be_visible()
    expect(page.locator("#run-phase")).to_have_text("Succeeded")
    expect(page.locator("#dag g.node.Succeeded")).to_have_count(7)
    expect(page.locator("#cancel")).to_have_count(0)
    expect(page.locator("#retry")).to_have_count(0)
    page.screenshot(path=str(SHOTS / "deleted-run-history.png"), full_page=True)
    page.close()


def test_ui_asks_for_a_token_and_refuses_a_bad_one(server: ServerProcess, browser: Browser) -> None:
    page = browser.new_page()
    page.goto(f"{server.base}/ui/")
    expect(page.locator("#login-form")).to_be_visible()
    page.fill("#token", "not-a-token")
    page.click("#login-form button[type=submit]")
    expect(page.locator("#login-error")).to_contain_text("not accepted")
    page.close()


def test_ui_fan_out_node_follows_its_instances_live(
    control_plane: ControlPlane,
    namespace: str,
    server: ServerProcess,
    user_token: str,
    browser: Browser,
) -> None:
    slow = {"image": "busybox", "podMetadata": {"annotations": {"maestro.dev/kwok-delay": "3s"}}}
    apply(
        control_plane,
        namespace,
        {
            "apiVersion": "maestro.dev/v1alpha1",
            "kind": "Workflow",
            "metadata": {"name": "fan"},
            "spec": {
                "tasks": [
                    {"name": "each", "forEach": {"items": [1, 2, 3]}, "container": slow},
                    {"name": "gate", "dependsOn": ["each"], "approval": {}},
                ]
            },
        },
    )
    status, started = server.call(
        "POST", f"/api/workflows/fan/execute?namespace={namespace}", token=user_token, body={}
    )
    assert status == 201, started
    page = signed_in_page(browser, server, user_token, f"#/runs/{started['runId']}")
    expect(page.locator("#dag svg")).to_be_visible()
    # The run does not end (the gate waits): only the instances' own events can turn
    # the fan-out's node green.
    expect_phase(page, "each", "Succeeded")
    expect_phase(page, "gate", "Running")
    node(page, "each").click()
    expect(page.locator("#task")).to_contain_text("3/3 instances ended")
    expect(page.locator("#instances tr")).to_have_count(4)  # a header and three instances
    expect(page.locator("#instances")).to_contain_text("each[2]")
    page.screenshot(path=str(SHOTS / "fan-out-instances.png"), full_page=True)
    page.close()
