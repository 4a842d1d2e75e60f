"""One plain list-and-watch of Maestro's task pods, decoded with orjson.

Kopf runs every event of a watched resource through its handler machinery (diffs,
progress, per-object workers); for pods, which only feed a cache and wake a run, that
was most of the operator's CPU under load. This is a bare watch on the pods labelled
``maestro.dev/run-id``: list, then watch from the list's resourceVersion (bookmarks
keep it fresh), list again after an expired version (410) or any error. A relist also
reports the pods that went while nobody watched as deleted, so no deletion is missed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import orjson

from maestro.k8s.client import APIError, Kube

log = logging.getLogger(__name__)

OnPod = Callable[[dict[str, Any], bool], None]  # (pod, deleted)
# The API server ends a watch after this long; it is then resumed from the last version.
WATCH_SECONDS = 300
BACKOFFS = (0.5, 1.0, 2.0)


class Expired(Exception):
    """The watch's resourceVersion is too old (410 Gone): list again."""


class PodWatch:
    """Feeds ``on_pod`` every change of a task pod, in one namespace or in all (None)."""

    def __init__(self, kube: Kube, selector: str, on_pod: OnPod, namespace: str | None) -> None:
        """Watch pods matching ``selector``; nothing happens before :meth:`run`."""
        self.kube, self.selector, self.on_pod, self.namespace = kube, selector, on_pod, namespace
        self.ready = False  # listed once, and watching (readiness)
        # (namespace, name) -> labels of every pod seen, so one that went while the watch
        # was down is reported with the labels that say whose it was.
        self._known: dict[tuple[str, str], dict[str, str]] = {}
        self.events = 0  # watch events decoded (a metric of how busy it is)

    async def run(self) -> None:
        """List and watch until cancelled; every error leads to a new list after a pause."""
        failures = 0
        while True:
            try:
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
                log.warning("pod watch: %s; listing again in %.1f s", err, pause)
                await asyncio.sleep(pause)

    async def _list(self) -> str:
        body = orjson.loads(await self.kube.pods_raw(self.namespace, self.selector))
        seen: dict[tuple[str, str], dict[str, str]] = {}
        for pod in body.get("items") or []:
            meta = pod["metadata"]
            seen[(meta["namespace"], meta["name"])] = meta.get("labels") or {}
            self.on_pod(pod, False)
        for (namespace, name), labels in self._known.items():
            if (namespace, name) not in seen:
                # Gone while not watched: the same news as a DELETED event.
                meta = {"namespace": namespace, "name": name, "labels": labels}
                self.on_pod({"metadata": meta}, True)
        self._known = seen
        return str((body.get("metadata") or {}).get("resourceVersion") or "")

    async def _watch(self, version: str) -> str:
        """One watch request; the resourceVersion to resume from when it ends."""
        async for line in self.kube.watch_pods_raw(
            self.namespace, self.selector, version, WATCH_SECONDS
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
            self.on_pod(obj, deleted)
        return version
