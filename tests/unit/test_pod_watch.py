"""The plain watch (of pods here): list, watch from the list's version, list again when it expires.

The API side is scripted (the e2e tests run the watch against a real API server): each
list answers the next scripted pod list, each watch the next scripted event lines.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from maestro.k8s.watch import Watch


def pod(name: str, version: str, phase: str = "Running") -> dict[str, Any]:
    meta = {
        "namespace": "ns",
        "name": name,
        "resourceVersion": version,
        "labels": {"maestro.dev/run-id": f"run-of-{name}"},
    }
    return {"metadata": meta, "status": {"phase": phase}}


class ScriptedAPI:
    def __init__(self, lists: list[list[dict[str, Any]]], watches: list[list[Any]]) -> None:
        self.lists, self.watches = lists, watches
        self.watched_from: list[str] = []
        self.selectors: list[str] = []

    async def list_raw(self, resource: str, namespace: str | None, selector: str) -> bytes:
        assert resource == "pods"
        self.selectors.append(selector)
        items = self.lists.pop(0)
        version = str(len(self.lists) + 100)
        return json.dumps({"metadata": {"resourceVersion": version}, "items": items}).encode()

    async def watch_raw(
        self, resource: str, namespace: str | None, selector: str, version: str, seconds: int
    ) -> AsyncIterator[bytes]:
        self.watched_from.append(version)
        if not self.watches:
            await asyncio.Event().wait()  # a quiet watch, until the test ends
        for event in self.watches.pop(0):
            yield json.dumps(event).encode()


def run_until(api: ScriptedAPI, seen: list[tuple[str, str, bool]]) -> None:
    def on_pod(obj: dict[str, Any], deleted: bool) -> None:
        phase = (obj.get("status") or {}).get("phase", "")
        seen.append((obj["metadata"]["name"], phase, deleted))
        # Whose pod it was, also for one reported gone by a relist (the run to wake).
        name = obj["metadata"]["name"]
        assert obj["metadata"]["labels"] == {"maestro.dev/run-id": f"run-of-{name}"}

    async def main() -> None:
        watch = Watch(api, "pods", "maestro.dev/run-id", on_pod, None)  # type: ignore[arg-type]
        task = asyncio.create_task(watch.run())
        while api.lists or api.watches:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert watch.ready
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())


def test_events_after_the_list_and_a_relist_after_410_reports_pods_gone_meanwhile() -> None:
    api = ScriptedAPI(
        lists=[[pod("a", "1"), pod("b", "2")], [pod("b", "9", "Succeeded")]],
        watches=[
            [
                {"type": "MODIFIED", "object": pod("a", "5", "Succeeded")},
                {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "7"}}},
                {"type": "ERROR", "object": {"code": 410, "message": "too old"}},
            ]
        ],
    )
    seen: list[tuple[str, str, bool]] = []
    run_until(api, seen)
    assert seen == [
        ("a", "Running", False),
        ("b", "Running", False),
        ("a", "Succeeded", False),
        # The relist: b changed, and a went while the watch was down.
        ("b", "Succeeded", False),
        ("a", "", True),
    ]
    assert api.watched_from == ["101", "100"]


def test_a_watch_that_ends_resumes_from_its_last_version_without_listing() -> None:
    api = ScriptedAPI(
        lists=[[pod("a", "1")]],
        watches=[
            [{"type": "DELETED", "object": pod("a", "3")}],
            [{"type": "ADDED", "object": pod("c", "4")}],
        ],
    )
    seen: list[tuple[str, str, bool]] = []
    run_until(api, seen)
    assert seen == [("a", "Running", False), ("a", "Running", True), ("c", "Running", False)]
    assert api.watched_from == ["100", "3", "4"]


def test_retarget_lists_the_new_selector_and_drops_pods_no_longer_watched_silently() -> None:
    """A bucket handed over: its pods are someone else's now, not deleted."""

    def labelled(name: str, bucket: str) -> dict[str, Any]:
        obj = pod(name, "1")
        obj["metadata"]["labels"]["maestro.dev/bucket"] = bucket
        return obj

    api = ScriptedAPI(
        lists=[[labelled("a", "1"), labelled("b", "2")], [labelled("b", "2")]], watches=[]
    )
    seen: list[tuple[str, bool]] = []

    async def main() -> None:
        watch = Watch(  # type: ignore[arg-type]
            api, "pods", "maestro.dev/bucket in (1,2)",
            lambda obj, deleted: seen.append((obj["metadata"]["name"], deleted)), None,
        )  # fmt: skip
        task = asyncio.create_task(watch.run())
        while not watch.ready:
            await asyncio.sleep(0.01)
        watch.retarget(
            "maestro.dev/bucket in (2)", lambda labels: labels["maestro.dev/bucket"] == "2"
        )
        assert not watch.ready
        while api.lists or not watch.ready:
            await asyncio.sleep(0.01)
        watch.retarget(None, lambda labels: False)  # no bucket held: nothing to watch
        await asyncio.sleep(0.05)
        assert watch.ready
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert seen == [("a", False), ("b", False), ("b", False)]
    assert api.selectors == ["maestro.dev/bucket in (1,2)", "maestro.dev/bucket in (2)"]
