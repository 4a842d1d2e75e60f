"""A separate writer process for the store tests (run as a script, not collected).

Usage: ``writer.py race URL RUN_ID`` opens the store, prints ``ready``, waits for a
line on stdin, tries Pending -> Running on (RUN_ID, build, 1) and prints the
result (``True``/``False``).

``writer.py hang URL RUN_ID`` does the same transition but stops inside the
transaction, after the UPDATE and before the event is written, prints ``in-transaction``
and sleeps there until it is killed.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

from maestro.api.phases import TaskPhase
from maestro.store import Store, repository


async def race(url: str, run_id: str) -> None:
    store = await Store.open(url)
    try:
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        won = await store.transition_attempt(run_id, "build", 1, TaskPhase.RUNNING)
        print(won, flush=True)
    finally:
        await store.close()


def _stop_before_event(*_args: Any, **_kwargs: Any) -> None:
    print("in-transaction", flush=True)
    # Block the whole process (event loop included) with the transaction open.
    time.sleep(3600)


async def hang(url: str, run_id: str) -> None:
    store = await Store.open(url)
    repository._event_values = _stop_before_event
    await store.transition_attempt(run_id, "build", 1, TaskPhase.RUNNING, job_name="doomed")


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    asyncio.run(race(*args) if mode == "race" else hang(*args))
