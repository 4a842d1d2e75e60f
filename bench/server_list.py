"""Benchmark: the server's run history and run page at scale.

History: 10,000 runs are bulk-inserted into a fresh PostgreSQL store, then a real
``maestro server`` (on the local control plane, so every request is authenticated with
TokenReview and authorised with SubjectAccessReview, cached as in production) lists all
of them newest first, a page at a time (``GET /api/runs?limit=100``, following
``nextCursor``); the latency of each page request is recorded. Target: p95 < 100 ms.

Run page: one run of 1,000 tasks (10 layers of 100, each task depending on two of the
previous layer; every task Succeeded) is opened in Debian's headless Chromium; the time
from navigation to the drawn DAG (the page marks ``body[data-rendered]``) is recorded.
Target: < 2 s.

``python -m bench server`` (or ``python -m bench.server_list [--quick]``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import urllib.request
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

from bench.common import Figure, Outcome, percentile, postgres, use_test_fixtures

use_test_fixtures()

from fixtures.control_plane import local_control_plane  # noqa: E402
from fixtures.server import ServerProcess, service_account_token  # noqa: E402
from maestro.store import Store  # noqa: E402
from maestro.store.database import make_engine  # noqa: E402
from maestro.store.models import AttemptRow, RunRow  # noqa: E402
from maestro.store.urls import parse_url  # noqa: E402

RUNS = 10_000
PAGE = 100
LAYERS, WIDTH = 10, 100
CHROMIUM = "/usr/bin/chromium"
READER_RULES = [
    {"apiGroups": ["maestro.dev"], "resources": ["workflowruns"], "verbs": ["get", "list"]}
]


def reader_rbac() -> list[dict[str, Any]]:
    """A ClusterRole to get and list WorkflowRuns everywhere, bound to bench-server:reader."""
    rbac = "rbac.authorization.k8s.io"
    return [
        {
            "apiVersion": f"{rbac}/v1",
            "kind": "ClusterRole",
            "metadata": {"name": "bench-reader"},
            "rules": READER_RULES,
        },
        {
            "apiVersion": f"{rbac}/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "bench-reader"},
            "roleRef": {"apiGroup": rbac, "kind": "ClusterRole", "name": "bench-reader"},
            "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": "bench-server"}],
        },
    ]


def big_spec() -> dict[str, Any]:
    """1,000 tasks: LAYERS layers of WIDTH, each task after two of the layer before."""
    tasks = []
    for layer in range(LAYERS):
        for i in range(WIDTH):
            deps = [] if layer == 0 else [f"t{layer - 1}-{i}", f"t{layer - 1}-{(i + 1) % WIDTH}"]
            tasks.append(
                {
                    "name": f"t{layer}-{i}",
                    "dependsOn": deps,
                    "container": {"image": "busybox", "command": ["true"]},
                }
            )
    return {"tasks": tasks}


async def seed(url: str, runs: int) -> str:
    """Insert ``runs`` finished runs plus one 1,000-task run; returns the big run's id."""
    store = await Store.open(url, migrate=True)
    # Bulk inserts through the store's own tables (the store has no bulk-write API).
    engine = make_engine(parse_url(url), connect_timeout=5)
    now = datetime.now(UTC)
    try:
        async with engine.begin() as conn:
            rows = []
            for i in range(runs):
                created = now - timedelta(seconds=runs - i)
                rows.append(
                    {
                        "id": str(uuid.uuid4()),
                        "namespace": f"team-{i % 10}",
                        "name": f"run-{i}",
                        "uid": str(uuid.uuid4()),
                        "workflow_name": f"wf-{i % 7}",
                        "spec": {},
                        "params": {},
                        "phase": "Succeeded",
                        "controls": {},
                        "generation": 1,
                        "created_at": created,
                        "started_at": created,
                        "finished_at": created,
                        "updated_at": created,
                    }
                )
            await conn.execute(RunRow.__table__.insert(), rows)
        big = await store.create_run(
            namespace="bench", name="big", workflow_name="big", spec=big_spec(), params={}
        )
        async with engine.begin() as conn:
            await conn.execute(
                AttemptRow.__table__.insert(),
                [
                    {
                        "run_id": big.id,
                        "task": t["name"],
                        "attempt": 1,
                        "phase": "Succeeded",
                        "created_at": now,
                        "started_at": now,
                        "finished_at": now,
                    }
                    for t in big_spec()["tasks"]
                ],
            )
        return big.id
    finally:
        await engine.dispose()
        await store.close()


def detail_times(server: ServerProcess, token: str, run_id: str, repeats: int) -> list[float]:
    """Seconds for GET /api/runs/{id} of the 1,000-task run (what the page waits for)."""
    times = []
    for _ in range(repeats):
        req = urllib.request.Request(f"{server.base}/api/runs/{run_id}")
        req.add_header("Authorization", f"Bearer {token}")
        t0 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=30) as rsp:
            assert len(json.loads(rsp.read())["tasks"]) == LAYERS * WIDTH
        times.append(time.perf_counter() - t0)
    return times


def list_all(server: ServerProcess, token: str) -> tuple[list[float], int]:
    """Walk the whole history; (seconds per page request, runs seen)."""
    times: list[float] = []
    seen = 0
    cursor = None
    while True:
        path = f"/api/runs?limit={PAGE}" + (f"&cursor={cursor}" if cursor else "")
        req = urllib.request.Request(server.base + path)
        req.add_header("Authorization", f"Bearer {token}")
        t0 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=30) as rsp:
            page = json.loads(rsp.read())
        times.append(time.perf_counter() - t0)
        seen += len(page["items"])
        cursor = page["nextCursor"]
        if cursor is None:
            return times, seen


def render_times(
    server: ServerProcess, token: str, run_id: str, repeats: int
) -> list[tuple[float, float]]:
    """(page clock, wall clock) seconds from navigation to the drawn 1,000-task DAG, in a
    fresh page each time."""
    from playwright.sync_api import sync_playwright

    found = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            for _ in range(repeats + 1):  # the first load warms caches; not counted
                page = browser.new_page(viewport={"width": 1500, "height": 900})
                page.add_init_script(f"localStorage.setItem('maestro-token', {json.dumps(token)})")
                t0 = time.perf_counter()
                page.goto(f"{server.base}/ui/#/runs/{run_id}")
                page.wait_for_selector(f'body[data-rendered="{run_id}"]', timeout=60_000)
                wall = time.perf_counter() - t0
                # The page's own clock (navigation start to drawn DAG); wall time as well
                # includes Playwright's round trips.
                found.append((page.evaluate("window.maestroRenderedMs") / 1000, wall))
                assert page.locator("#dag g.node").count() == LAYERS * WIDTH
                page.close()
        finally:
            browser.close()
    return found[1:]


def run(quick: bool = False) -> Outcome:
    """Seed, serve, measure."""
    runs = 1_000 if quick else RUNS
    out = Outcome()
    with postgres() as pg, local_control_plane() as cp:
        _, url = pg.new_database()
        big_id = asyncio.run(seed(url, runs))
        # A reader of every namespace: history listing needs `list workflowruns` everywhere.
        cp.kubectl("create", "namespace", "bench-server")
        token = service_account_token(cp, "bench-server", "reader", None)
        cp.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(reader_rbac()))
        with tempfile.TemporaryDirectory() as tmp:
            server = ServerProcess(cp.kubeconfig, url, Path(tmp) / "server.log")
            server.start()
            try:
                pages: list[float] = []
                for _ in range(1 if quick else 3):
                    times, seen = list_all(server, token)
                    assert seen == runs + 1, seen
                    pages += times
                details = detail_times(server, token, big_id, 3 if quick else 10)
                renders = render_times(server, token, big_id, 2 if quick else 5)
            finally:
                server.stop()
    p95 = percentile(pages, 95) * 1000
    out.figures.append(
        Figure(
            "server",
            f"list {runs} runs, page of {PAGE}: p95",
            "ms",
            [p95],
            "< 100 ms",
            p95 < 100,
            note=f"{len(pages)} page requests",
        )
    )
    out.figures.append(Figure("server", "list: page p50", "ms", [percentile(pages, 50) * 1000]))
    page_clock = [r[0] for r in renders]
    out.figures.append(
        Figure(
            "server",
            "1,000-task run page: navigation to drawn DAG",
            "s",
            page_clock,
            "< 2 s",
            max(page_clock) < 2,
            note="the page's performance.now() when drawn",
        )
    )
    out.figures.append(
        Figure("server", "1,000-task run page, wall clock", "s", [r[1] for r in renders])
    )
    out.figures.append(
        Figure("server", "GET /api/runs/{id}, 1,000 tasks", "ms", [t * 1000 for t in details])
    )
    out.details = {"pages": len(pages), "runs": runs, "render_s": renders}
    return out


def main() -> int:
    """Standalone: print the figures as JSON."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    outcome = run(args.quick)
    print(json.dumps([f.as_json() for f in outcome.figures], indent=2))
    return 0 if all(f.met is not False for f in outcome.figures) else 1


if __name__ == "__main__":
    sys.exit(main())
