"""Where executors read Secret values (HTTP headers, container env in local mode)."""

from __future__ import annotations

import os
import re
from typing import Protocol


class SecretUnavailable(LookupError):
    """A Secret or key that cannot be read; the message names both."""


class SecretReader(Protocol):
    """Reads one key of one Secret in a namespace."""

    async def read(self, namespace: str, name: str, key: str) -> str:
        """The decoded value; raises :class:`SecretUnavailable`."""
        ...


def env_name(name: str, key: str) -> str:
    """``MAESTRO_SECRET_<NAME>_<KEY>``, upper-cased, other characters as ``_``."""
    return "MAESTRO_SECRET_" + re.sub(r"[^A-Z0-9]", "_", f"{name}_{key}".upper())


class EnvSecrets:
    """Local mode has no cluster: Secret values come from environment variables."""

    async def read(self, namespace: str, name: str, key: str) -> str:
        """The value of ``MAESTRO_SECRET_<NAME>_<KEY>``."""
        var = env_name(name, key)
        value = os.environ.get(var)
        if value is None:
            raise SecretUnavailable(
                f"secret {name!r} key {key!r}: local mode reads it from ${var}, which is not set"
            )
        return value
