"""One plain list-and-watch of pods or WorkflowRuns, decoded with orjson.

Kopf runs every event of a watched resource through its handler machinery (diffs,
progress, per-object workers); for pods, which only feed a cache and wake a run, that
was most of the operator's CPU under load, and for WorkflowRuns it cannot say which
replica drives which run. This is a bare watch: list, then watch from the list's
resourceVersion (bookmarks keep it fresh), list again after an expired version (410)
or any error. A relist also reports the objects that went while nobody watched as
deleted, so no deletion is missed. The label selector can change while it runs
(:meth:`Watch.retarget`): a replica watches the pods of the buckets it holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import orjson

from maestro.k8s.client import APIError, Kube

log = logging.getLogger(__name__)

OnObject = Callable[[dict[str, Any], bool], None]  # (object, deleted)
Labels = dict[str, str]
# The API server ends a watch after this long; it is then resumed from the last version.
WATCH_SECONDS = 300
BACKOFFS = (0.5, 1.0, 2.0)


class Expired(Exception):
    """The watch's resourceVersion is too old (410 Gone): list again."""


class Watch:
    """Feeds ``on_object`` every change of the matching objects, in one namespace or all.

    ``selector`` None watches nothing (and is ready at once): a replica that holds no
    bucket has no pods to watch.
    """

    def __init__(
        self,
        kube: Kube,
        resource: str,
        selector: str | None,
        on_object: OnObject,
        namespace: str | None,
    ) -> None:
        """Watch ``resource`` (``pods`` or ``workflowruns``); nothing happens before :meth:`run`."""
        self.kube, self.resource, self.on_object = kube, resource, on_object
        self.selector, self.namespace = selector, namespace
        self.ready = False  # listed once, and watching (readiness)
        # (namespace, name) -> labels of every object seen, so one that went while the
        # watch was down is reported with the labels that say whose it was.
        self._known: dict[tuple[str, str], Labels] = {}
        self.events = 0  # watch events decoded (a metric of how busy it is)
        self._retarget = asyncio.Event()

    def retarget(self, selector: str | None, keep: Callable[[Labels], bool]) -> None:
        """Watch what ``selector`` matches from now on; objects already seen that ``keep``
        refuses are dropped silently (they are someone else's now, not deleted)."""
        if selector == self.selector:
            return
        self.selector = selector
        self._known = {k: v for k, v in self._known.items() if keep(v)}
        self.ready = False
        self._retarget.set()

    async def run(self) -> None:
        """List and watch until cancelled, starting over whenever the selector changes."""
        while True:
            self._retarget.clear()
            body = asyncio.ensure_future(self._run())
            change = asyncio.ensure_future(self._retarget.wait())
            try:
                await asyncio.wait({body, change}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for fut in (body, change):
                    fut.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await fut

    async def _run(self) -> None:
        """Every error leads to a new list after a pause."""
        failures = 0
        while True:
            try:
                if self.selector is None:
                    self.ready = True
                    await asyncio.Event().wait()  # until retargeted
                version = await self._list()
                self.ready = True
                failures = 0
                while True:
                    version = await self._watch(version)
            except Expired:
                continue  # list again at once: the version moved past what etcd keeps
            except (APIError, OSError, ValueError) as err:
                self.ready = False
                pause = BACKOFFS[min(failures, len(BACKOFFS) - 1)]
                failures += 1
                log.warning("%s watch: %s; listing again in %.1f s", self.resource, err, pause)
                await asyncio.sleep(pause)

    async def _list(self) -> str:
        selector = self.selector or ""
        body = orjson.loads(await self.kube.list_raw(self.resource, self.namespace, selector))
        seen: dict[tuple[str, str], Labels] = {}
        for obj in body.get("items") or []:
            meta = obj["metadata"]
            seen[(meta["namespace"], meta["name"])] = meta.get("labels") or {}
            self.on_object(obj, False)
        for (namespace, name), labels in self._known.items():
            if (namespace, name) not in seen:
                # Gone while not watched: the same news as a DELETED event.
                meta = {"namespace": namespace, "name": name, "labels": labels}
                self.on_object({"metadata": meta}, True)
        self._known = seen
        return str((body.get("metadata") or {}).get("resourceVersion") or "")

    async def _watch(self, version: str) -> str:
        """One watch request; the resourceVersion to resume from when it ends."""
        async for line in self.kube.watch_raw(
            self.resource, self.namespace, self.selector or "", version, WATCH_SECONDS
        ):
            event = orjson.loads(line)
            kind, obj = event.get("type"), event.get("object") or {}
            self.events += 1
            if kind == "ERROR":
                if obj.get("code") == 410:
                    raise Expired
                raise ValueError(f"watch error: {obj.get('message') or obj}")
            meta = obj.get("metadata") or {}
            version = str(meta.get("resourceVersion") or version)
            if kind == "BOOKMARK":
                continue
            key = (meta["namespace"], meta["name"])
            deleted = kind == "DELETED"
            if deleted:
                self._known.pop(key, None)
            else:
                self._known[key] = meta.get("labels") or {}
            self.on_object(obj, deleted)
        return version
