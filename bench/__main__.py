"""``python -m bench all`` (or ``python -m bench NAME ...``): run, print one table, write JSON.

Names: ``dag``, ``engine``, ``overhead``, ``db``, ``operator`` (the operator pass also
gives the recovery figures), ``failover`` (bucket takeover between three active
replicas after a SIGKILL and a graceful stop, and their balance), ``scaleout``
(throughput and CPU per replica with 1, 2 and 3 replicas), ``image`` (the operator
image's size and build time), ``server`` (history pages and the run page of the web UI).
``--quick`` shrinks every benchmark for a smoke run.
The JSON lands in ``bench/results/<UTC date and time>.json`` (git-ignored).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import REPO, Figure, Outcome, fmt

NAMES = (
    "dag",
    "engine",
    "overhead",
    "db",
    "operator",
    "failover",
    "scaleout",
    "image",
    "server",
)
MODULES = {
    "dag": "bench.dag_scale",
    "engine": "bench.engine_latency",
    "db": "bench.db_cost",
    "operator": "bench.operator_e2e",
    "image": "bench.image",
    "server": "bench.server_list",
    "failover": "bench.failover",
    "scaleout": "bench.scale_out",
}


def machine() -> dict[str, Any]:
    """CPU model, core count and memory of this machine, for the record."""
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    load = os.getloadavg()
    return {
        "cpu": model,
        "nproc": os.cpu_count(),
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "loadavg_at_start": [round(x, 2) for x in load],
    }


def overhead(quick: bool) -> Outcome:
    """Engine overhead per transition, from ``bench/engine_overhead.py`` (its own module).

    It runs as a subprocess so its output format stays its own business: numbers from a
    JSON object on its last output line become figures; otherwise the text is kept.
    """
    out = Outcome()
    if not (REPO / "bench" / "engine_overhead.py").exists():
        out.details["missing"] = "bench/engine_overhead.py does not exist yet"
        return out
    cmd = [sys.executable, "-m", "bench.engine_overhead"] + (["--quick"] if quick else [])
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
    if proc.returncode != 0 and quick:
        proc = subprocess.run(cmd[:-1], cwd=REPO, capture_output=True, text=True, timeout=900)
    out.details = {
        "returncode": proc.returncode,
        "stdout": proc.stdout,
        "stderr": proc.stderr[-4000:],
    }
    lines = proc.stdout.strip().splitlines()
    with contextlib.suppress(ValueError, IndexError):
        data = json.loads(lines[-1])
        if isinstance(data, dict):
            for key, value in data.items():
                values = value if isinstance(value, list) else [value]
                if values and all(isinstance(v, int | float) for v in values):
                    out.figures.append(Figure("overhead", key, "", [float(v) for v in values]))
    return out


def run_one(name: str, quick: bool, runs: int, passes: list[str] | None = None) -> Outcome:
    """One benchmark by name."""
    if name == "overhead":
        return overhead(quick)
    module = importlib.import_module(MODULES[name])
    if name == "operator":
        result: Outcome = module.run(quick=quick, runs=runs, passes=passes)
        return result
    result = module.run(quick=quick)
    return result


def table(figures: list[Figure]) -> str:
    """The one table: median and (min - max) over repeats, target, and whether it is met."""
    header = ("benchmark", "metric", "median", "spread (min - max)", "n", "unit", "target", "met")
    rows = [header]
    for f in figures:
        lo, hi = f.spread
        met = "" if f.met is None else ("yes" if f.met else "NO")
        spread = f"{fmt(lo)} - {fmt(hi)}" if len(f.values) > 1 else ""
        rows.append(
            (
                f.bench,
                f.metric,
                fmt(f.median),
                spread,
                str(len(f.values)),
                f.unit,
                f.target or "",
                met,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the named benchmarks (``all`` for every one), print the table, write the JSON."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("names", nargs="+", choices=("all", *NAMES))
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat")
    parser.add_argument("--runs", type=int, default=100, help="WorkflowRuns in the operator pass")
    parser.add_argument(
        "--passes",
        nargs="*",
        help="operator passes: ten, wide, chain, recovery, fanout (default all)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    names = list(NAMES) if "all" in args.names else list(dict.fromkeys(args.names))

    started = datetime.now(UTC)
    report: dict[str, Any] = {
        "date": started.isoformat(),
        "machine": machine(),
        "quick": args.quick,
    }
    figures: list[Figure] = []
    failures: dict[str, str] = {}
    for name in names:
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        try:
            outcome = run_one(name, args.quick, args.runs, args.passes)
        except Exception as err:  # one broken benchmark must not hide the others' figures
            failures[name] = f"{type(err).__name__}: {err}"
            print(f"bench: {name} FAILED: {failures[name]}", file=sys.stderr, flush=True)
            continue
        seconds = time.monotonic() - t0
        print(f"bench: {name} done in {seconds:.0f} s", file=sys.stderr, flush=True)
        figures += outcome.figures
        report[name] = {"seconds": seconds, "details": outcome.details}
    report["figures"] = [f.as_json() for f in figures]
    report["failures"] = failures
    report["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]

    print(table(figures))
    for name, why in failures.items():
        print(f"FAILED {name}: {why}")
    missing = report.get("overhead", {}).get("details", {}).get("missing")
    if missing:
        print(f"note: overhead skipped: {missing}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{started.strftime('%Y-%m-%dT%H-%M-%SZ')}.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    print(f"results: {path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
