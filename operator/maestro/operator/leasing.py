"""Renew this replica's bucket leases on a thread and event loop of their own.

Under load the operator's event loop serves hundreds of run drivers; a renewal queued
behind them came seconds late, the leases lapsed, and every driver of those buckets
stopped and started again (measured with three replicas and 200 runs on two cores:
takeover times doubled and buckets flapped). Here renewals run on their own loop and
connection, so they are on time whatever the drivers do.

A watchdog keeps that honest: the thread pings the operator's loop each round and renews
only while the loop has answered within half a lease. A replica whose loop is frozen
stops renewing, and its buckets go to the others once the lease runs out.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable

from maestro.store import Store, StoreError
from maestro.store.leases import Leases, Tick

log = logging.getLogger("maestro.supervisor")

OnTick = Callable[[Tick, float], None]  # (what the renewal found, its seconds)


class LeaseKeeper:
    """The renewal thread of one replica; results reach the operator's loop by callback."""

    def __init__(
        self,
        open_store: Callable[[], Awaitable[Store]],
        replica: str,
        *,
        lease_seconds: float,
        renew_seconds: float,
    ) -> None:
        """``open_store`` makes the thread's own store (on the thread's loop)."""
        self.open_store, self.replica = open_store, replica
        self.lease_seconds, self.renew_seconds = lease_seconds, renew_seconds
        self._answered = time.monotonic()  # when the operator's loop last ran our ping
        self._stop = threading.Event()
        self._released: concurrent.futures.Future[list[int]] | None = None
        # The thread's loop while it runs; the lock keeps a poke from landing on it after it
        # closed (a graceful stop releases, the thread ends, then the operator stops it).
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_lock = threading.Lock()
        self._wake: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    def start(self, on_tick: OnTick) -> asyncio.Future[None]:
        """Start renewing; the future ends when the thread does (with its error, if any)."""
        main = asyncio.get_running_loop()
        ended: asyncio.Future[None] = main.create_future()

        def end(error: BaseException | None) -> None:
            if ended.done():
                return
            if error is None:
                ended.set_result(None)
            else:
                ended.set_exception(error)

        def body() -> None:
            try:
                asyncio.run(self._renewals(main, on_tick))
            except BaseException as err:  # reported to the operator's loop, which fails
                main.call_soon_threadsafe(end, err)
            else:
                main.call_soon_threadsafe(end, None)

        self._answered = time.monotonic()
        self._thread = threading.Thread(target=body, name="maestro-leases", daemon=True)
        self._thread.start()
        return ended

    async def release(self) -> list[int]:
        """Give every bucket back (and stop renewing): a graceful stop."""
        released: concurrent.futures.Future[list[int]] = concurrent.futures.Future()
        self._released = released
        if not self._wake_thread():
            return []
        return await asyncio.wrap_future(released)

    def stop(self) -> None:
        """Stop renewing without giving anything back (the leases run out)."""
        self._stop.set()
        self._wake_thread()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _wake_thread(self) -> bool:
        """Poke the thread's loop; False when it is not running (never started, or ended)."""
        with self._loop_lock:
            if self._loop is None:
                return False
            self._loop.call_soon_threadsafe(self._poke)
            return True

    def _answer(self) -> None:
        self._answered = time.monotonic()

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def _renewals(self, main: asyncio.AbstractEventLoop, deliver: OnTick) -> None:
        wake = self._wake = asyncio.Event()
        with self._loop_lock:
            self._loop = asyncio.get_running_loop()
        try:
            async with contextlib.AsyncExitStack() as stack:
                store = await self.open_store()
                stack.push_async_callback(store.close)
                leases = Leases(store, self.replica, self.lease_seconds)
                await leases.check()
                due = time.monotonic()
                while not self._stop.is_set():
                    wake.clear()  # before looking: a poke from now on is not lost
                    main.call_soon_threadsafe(self._answer)
                    if self._released is not None:
                        await self._release(leases, self._released)
                        return
                    await self._renew(leases, main, deliver)
                    due = max(due + self.renew_seconds, time.monotonic())
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(wake.wait(), due - time.monotonic())
        finally:
            with self._loop_lock:
                self._loop = None
            # A release asked for as the thread ended (stopped, or failed) gives back nothing.
            if self._released is not None and not self._released.done():
                self._released.set_result([])

    async def _renew(
        self, leases: Leases, main: asyncio.AbstractEventLoop, deliver: OnTick
    ) -> None:
        quiet = time.monotonic() - self._answered
        if quiet > self.lease_seconds / 2:
            log.warning(
                "the operator's loop has not answered for %.1f s: leases not renewed", quiet
            )
            return
        started = time.perf_counter()
        try:
            tick = await leases.tick()
        except StoreError as err:
            log.warning("bucket leases not renewed: %s", err)
            return
        main.call_soon_threadsafe(deliver, tick, time.perf_counter() - started)

    @staticmethod
    async def _release(leases: Leases, done: concurrent.futures.Future[list[int]]) -> None:
        try:
            done.set_result(await leases.release())
        except BaseException as err:
            done.set_exception(err)
