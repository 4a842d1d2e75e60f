"""What the run controller is tuned by: its settings, its retry policy and its clock.

A module of its own, below every part of the controller (:mod:`.starting`,
:mod:`.controls`, :mod:`.publishing`, :mod:`.driving`, :mod:`.ttl`), so each part reads
the same tunables and the same time without importing the façade in :mod:`.runs`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

# A store outage is retried this often; readiness reports it meanwhile.
STORE_RETRY_SECONDS = 2.0
# Any other trouble in a pass (the API server down, a bug) is retried after a delay that
# doubles from the first to the last, so a run resumes seconds after the API is back
# (a driver that gave up would wait for its bucket to move before running again).
RETRY_FIRST_SECONDS = 0.5
RETRY_MAX_SECONDS = 5.0


def retry_delay(failures: int) -> float:
    """Seconds to wait after ``failures`` passes in a row went wrong (1-based)."""
    return float(min(RETRY_MAX_SECONDS, RETRY_FIRST_SECONDS * 2 ** max(0, failures - 1)))


class Clock:
    """The time the controller decides by: wall time for statuses and TTLs, monotonic
    time for coalescing status patches. Injected, so tests move time instead of
    sleeping; this one is the system's."""

    def now(self) -> datetime:
        """The wall time, timezone-aware (UTC)."""
        return datetime.now(UTC)

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (intervals only)."""
        return time.monotonic()


@dataclass
class Settings:
    """Operator tunables."""

    status_interval: float = 1.0
    # Runs being started at once (created in the store, their first pass); the others
    # wait their turn, so a burst of new runs does not hold back the runs already going.
    admissions: int = 8
    # What a run acts as when neither it nor its Workflow names a ServiceAccount.
    default_service_account: str = "default"
    # Namespaces runs may not use (the operator's own, with its database Secret).
    protected_namespaces: frozenset[str] = frozenset()
    clock: Clock = field(default_factory=Clock)
