"""``maestro db``: migrate, inspect and prune the context store's database."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import click

from maestro.store import Store, StoreError, current, head, upgrade
from maestro.store.leases import owners

T = TypeVar("T")

_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


class Duration(click.ParamType[timedelta, str | timedelta]):
    """A duration such as ``90m``, ``12h``, ``30d`` or ``2w``."""

    name = "duration"

    def convert(
        self, value: str | timedelta, param: click.Parameter | None, ctx: click.Context | None
    ) -> timedelta:
        """Parse ``<number><s|m|h|d|w>`` into a timedelta."""
        if isinstance(value, timedelta):
            return value
        match = re.fullmatch(r"(\d+)([smhdw])", str(value).strip())
        if match is None:
            self.fail(f"{value!r} is not a duration like 90m, 12h or 30d", param, ctx)
        return timedelta(**{_UNITS[match[2]]: int(match[1])})


def _run(coro: Coroutine[Any, Any, T]) -> T:
    # Store errors are the user's to fix (DSN, server, schema): one line, no traceback.
    # Their messages never contain the password.
    try:
        return asyncio.run(coro)
    except StoreError as exc:
        click.echo(f"maestro: error: {exc}", err=True)
        sys.exit(1)


def _database_options(func: Callable[..., None]) -> Callable[..., None]:
    func = click.option(
        "--connect-timeout",
        type=click.FloatRange(min=0.1),
        default=5.0,
        show_default=True,
        help="Seconds to wait for the database before giving up.",
    )(func)
    return click.option(
        "--database-url",
        envvar="MAESTRO_DATABASE_URL",
        show_envvar=True,
        required=True,
        metavar="URL",
        help="postgresql://user:password@host:port/db (or sqlite:///path for local use).",
    )(func)


@click.group("db")
def db() -> None:
    """Migrate, inspect and prune the run-history database."""


@db.command("upgrade")
@_database_options
def upgrade_cmd(database_url: str, connect_timeout: float) -> None:
    """Migrate the database schema to the one this Maestro needs."""
    revision = _run(upgrade(database_url, connect_timeout=connect_timeout))
    click.echo(f"database schema is at {revision} (head)")


@db.command("current")
@_database_options
def current_cmd(database_url: str, connect_timeout: float) -> None:
    """Show the database's schema revision and whether it is the one needed."""
    revision = _run(current(database_url, connect_timeout=connect_timeout))
    need = head()
    state = "head" if revision == need else f"this Maestro needs {need}"
    click.echo(f"{revision or 'none'} ({state})")


async def _prune(url: str, connect_timeout: float, older_than: timedelta) -> int:
    store = await Store.open(url, connect_timeout=connect_timeout)
    try:
        return await store.prune(older_than=older_than)
    finally:
        await store.close()


@db.command("prune")
@click.option(
    "--older-than",
    type=Duration(),
    required=True,
    help="Delete runs that finished longer ago than this (e.g. 30d, 12h, 90m).",
)
@_database_options
def prune_cmd(older_than: timedelta, database_url: str, connect_timeout: float) -> None:
    """Delete finished runs (with their attempts and events) older than a duration."""
    count = _run(_prune(database_url, connect_timeout, older_than))
    click.echo(f"pruned {count} finished run{'' if count == 1 else 's'}")


async def _owners(url: str, connect_timeout: float) -> dict[str, Any]:
    store = await Store.open(url, connect_timeout=connect_timeout)
    try:
        buckets, replicas = await owners(store)
    finally:
        await store.close()
    now = datetime.now(UTC)
    held: dict[str, list[int]] = {}
    for b in buckets:
        if b.holder is not None and b.expires_at is not None and b.expires_at > now:
            held.setdefault(b.holder, []).append(b.bucket)
    return {
        "replicas": [
            {
                "name": name,
                "live": expires > now,
                "expiresInSeconds": round((expires - now).total_seconds(), 1),
                "buckets": held.get(name, []),
            }
            for name, expires in replicas
        ],
        "unheld": [b.bucket for b in buckets if not any(b.bucket in h for h in held.values())],
        "buckets": [{"bucket": b.bucket, "holder": b.holder, "epoch": b.epoch} for b in buckets],
    }


@db.command("owners")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table")
@_database_options
def owners_cmd(output: str, database_url: str, connect_timeout: float) -> None:
    """Which operator replica holds which buckets of runs (and which are held by none)."""
    found = _run(_owners(database_url, connect_timeout))
    if output == "json":
        click.echo(json.dumps(found, indent=2))
        return
    click.echo(f"{'REPLICA':<40} {'STATE':<8} {'BUCKETS':>7}  HELD")
    for r in found["replicas"]:
        state = "live" if r["live"] else "gone"
        held = ",".join(map(str, r["buckets"])) or "-"
        click.echo(f"{r['name']:<40} {state:<8} {len(r['buckets']):>7}  {held}")
    unheld = found["unheld"]
    click.echo(f"held by no live replica: {','.join(map(str, unheld)) if unheld else 'none'}")
