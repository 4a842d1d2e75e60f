"""``ttlSecondsAfterFinished``: a finished run's resource is deleted once its TTL passes.

Only the Kubernetes object goes: the store keeps the run's history, which the CLI and
the server still show. The wait is on the driver's ``stopped`` flag, so a driver told
to stop (its bucket moved) leaves the deletion to the run's next holder.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from maestro.k8s.client import Kube
from maestro.operator.settings import Clock
from maestro.store import RunRecord

log = logging.getLogger("maestro.operator")


async def expire(
    kube: Kube, clock: Clock, run: RunRecord, body: Mapping[str, Any], stopped: Any
) -> None:
    """Delete the finished run's resource when its TTL has passed (waiting until then)."""
    ttl = (body.get("spec") or {}).get("ttlSecondsAfterFinished")
    if ttl is None or run.finished_at is None:
        return
    due = run.finished_at + timedelta(seconds=int(ttl))
    wait = (due - clock.now()).total_seconds()
    if wait > 0:
        await stopped.wait(wait)
        if stopped:
            return
    meta = body["metadata"]
    await kube.delete_run(meta["namespace"], meta["name"])
    log.info("run %s/%s deleted after its TTL", meta["namespace"], meta["name"])
