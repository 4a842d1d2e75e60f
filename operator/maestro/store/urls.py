"""Database URLs: which driver serves which URL, and how to talk about one safely."""

from __future__ import annotations

import re
from urllib.parse import quote, quote_plus

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from maestro.store.errors import InvalidDatabaseURL

# Only these spellings are accepted; anything else is refused rather than guessed at,
# so that a typo can never silently land the run history somewhere unexpected.
_DRIVERS = {
    "postgresql": "postgresql+psycopg",
    "postgresql+psycopg": "postgresql+psycopg",
    "sqlite": "sqlite+aiosqlite",
    "sqlite+aiosqlite": "sqlite+aiosqlite",
}


def parse_url(url: str) -> URL:
    """Turn a user's database URL into the async SQLAlchemy URL that serves it.

    Raises :class:`InvalidDatabaseURL` (without echoing the password) when the URL
    is neither ``postgresql://`` nor an explicit ``sqlite:///`` file.
    """
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise InvalidDatabaseURL(
            "database URL is not a valid URL: expected postgresql://user:password@host:port/db "
            "or sqlite:///path"
        ) from None
    driver = _DRIVERS.get(parsed.drivername)
    if driver is None:
        raise InvalidDatabaseURL(
            f"unsupported database URL scheme {parsed.drivername!r}: "
            "use postgresql://… (or sqlite:///path for local development)"
        )
    in_memory = parsed.database in (None, "", ":memory:") or parsed.query.get("mode") == "memory"
    if driver.startswith("sqlite") and in_memory:
        raise InvalidDatabaseURL(
            "SQLite needs a file: sqlite:///path/to/maestro.db (in-memory stores are not allowed)"
        )
    return parsed.set(drivername=driver)


def describe(url: URL) -> str:
    """Where a URL points, for messages: ``database 'x' at host:port`` — never the password."""
    if url.get_backend_name() == "sqlite":
        return f"SQLite database {url.database}"
    host = url.host or "localhost"
    port = url.port or 5432
    return f"database {url.database!r} at {host}:{port}"


def scrub(text: str, url: URL) -> str:
    """Remove the URL's password from ``text`` (any spelling of it) and fold it to one line."""
    password = url.password
    if password:
        for form in {str(password), quote(str(password), safe=""), quote_plus(str(password))}:
            text = text.replace(form, "***")
    return re.sub(r"\s+", " ", text).strip()
