"""Shared pieces of the benchmarks: figures, statistics and the private servers.

The test fixtures in ``tests/fixtures`` (private PostgreSQL server, local control
plane, operator process) are reused as plain Python: :func:`use_test_fixtures` puts
``tests/`` on ``sys.path`` so ``import fixtures.postgres`` works outside pytest.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import statistics
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def use_test_fixtures() -> None:
    """Make ``tests/fixtures`` and the ``maestro`` package importable."""
    for path in (REPO / "tests", REPO / "operator"):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))


@dataclass
class Figure:
    """One measured quantity: its value in each repeat, and the target it is held to.

    ``target`` is a human-readable bound such as ``"< 0.5 s"``; ``met`` is decided
    by the benchmark that knows how to compare (None when there is no target).
    """

    bench: str
    metric: str
    unit: str
    values: list[float]
    target: str | None = None
    met: bool | None = None
    note: str | None = None

    @property
    def median(self) -> float:
        """Median over repeats (NaN when nothing was measured)."""
        return statistics.median(self.values) if self.values else float("nan")

    @property
    def spread(self) -> tuple[float, float]:
        """(min, max) over repeats."""
        if not self.values:
            return (float("nan"), float("nan"))
        return (min(self.values), max(self.values))

    def as_json(self) -> dict[str, Any]:
        """Serialisable form, with median and spread included."""
        data = asdict(self)
        data["median"] = self.median
        data["min"], data["max"] = self.spread
        return data


@dataclass
class Outcome:
    """What one benchmark hands back: its figures and free-form details for the JSON."""

    figures: list[Figure] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100), linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def fmt(value: float) -> str:
    """A number with about three significant digits, readable in a table."""
    if value != value:  # NaN
        return "n/a"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


class Postgres:
    """A private PostgreSQL server on 127.0.0.1 (the tests' own server code)."""

    def __init__(self) -> None:
        """Prepare (not start) a server in a fresh temporary directory."""
        use_test_fixtures()
        from fixtures.postgres import PostgresServer, _find_bindir, _free_port

        self.root = Path(tempfile.mkdtemp(prefix="maestro-bench-pg-"))
        self.server = PostgresServer(bindir=_find_bindir(), root=self.root, port=_free_port())

    def new_database(self) -> tuple[str, str]:
        """A fresh empty database: (name, URL for the application role)."""
        name = "bench_" + secrets.token_hex(5)
        return name, self.server.create_database(name)

    def admin_query(self, dbname: str, query: str) -> list[tuple[Any, ...]]:
        """Run one statement as the superuser on ``dbname``; rows it returns."""
        import psycopg

        with psycopg.connect(
            host=self.server.host,
            port=self.server.port,
            user="postgres",
            dbname=dbname,
            autocommit=True,
        ) as conn:
            cur = conn.execute(query.encode())
            return list(cur.fetchall()) if cur.description else []


@contextlib.contextmanager
def postgres() -> Iterator[Postgres]:
    """A running private server, always stopped and removed on exit."""
    pg = Postgres()
    try:
        pg.server.init()
        yield pg
    finally:
        try:
            pg.server.stop()
        finally:
            shutil.rmtree(pg.root, ignore_errors=True)


# a -> (b, c, d) -> e -> (f, g, h) -> i -> j: fan-out, fan-in, and a chain at the end.
TEN_TASKS: list[tuple[str, list[str]]] = [
    ("a", []),
    ("b", ["a"]),
    ("c", ["a"]),
    ("d", ["a"]),
    ("e", ["b", "c", "d"]),
    ("f", ["e"]),
    ("g", ["e"]),
    ("h", ["e"]),
    ("i", ["f", "g", "h"]),
    ("j", ["i"]),
]


Shape = list[tuple[str, list[str]]]  # (task, its dependencies), in order


def dag_spec(shape: Shape, pod_annotations: dict[str, str] | None = None) -> dict[str, Any]:
    """The wire-format spec of a DAG of container tasks."""
    container: dict[str, Any] = {"image": "busybox", "command": ["true"]}
    if pod_annotations:
        container["podMetadata"] = {"annotations": dict(pod_annotations)}
    return {"tasks": [{"name": n, "dependsOn": d, "container": container} for n, d in shape]}


def ten_task_spec(pod_annotations: dict[str, str] | None = None) -> dict[str, Any]:
    """The wire-format spec of the 10-task DAG used by the operator and database benches."""
    return dag_spec(TEN_TASKS, pod_annotations)
