"""Where executors read Secret values (HTTP headers, container env in local mode).

On a cluster the operator reads a Secret only for a run whose ServiceAccount may
``get`` it itself (a SubjectAccessReview first): a run never borrows the operator's
own permissions (docs/security.md).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Protocol

from maestro.executors.environment import env_var_name
from maestro.k8s.client import AccessCheckFailed, Kube

# What a run acts as when neither it nor its Workflow names a ServiceAccount.
DEFAULT_SERVICE_ACCOUNT = "default"


class SecretUnavailable(LookupError):
    """A Secret or key that cannot be read; the message names both."""


class SecretForbidden(SecretUnavailable):
    """The run's ServiceAccount may not read the Secret; the message names SA, verb, object."""


class SecretReader(Protocol):
    """Reads one key of one Secret in a namespace, on behalf of a ServiceAccount."""

    async def read(self, namespace: str, name: str, key: str, *, service_account: str) -> str:
        """The decoded value; raises :class:`SecretUnavailable`."""
        ...


def run_service_account(spec: Mapping[str, Any]) -> str:
    """The ServiceAccount of a run, from its stored spec snapshot (resolved at creation)."""
    return str(spec.get("serviceAccountName") or DEFAULT_SERVICE_ACCOUNT)


def env_name(name: str, key: str) -> str:
    """``MAESTRO_SECRET_<NAME>_<KEY>``, upper-cased, other characters as ``_``."""
    return env_var_name(f"MAESTRO_SECRET_{name}_{key}")


class EnvSecrets:
    """Local mode has no cluster: Secret values come from environment variables."""

    async def read(self, namespace: str, name: str, key: str, *, service_account: str) -> str:
        """The value of ``MAESTRO_SECRET_<NAME>_<KEY>`` (the user's own machine: no check)."""
        var = env_name(name, key)
        value = os.environ.get(var)
        if value is None:
            raise SecretUnavailable(
                f"secret {name!r} key {key!r}: local mode reads it from ${var}, which is not set"
            )
        return value


class KubeSecrets:
    """Secrets of the run's namespace, read only when the run's ServiceAccount may."""

    def __init__(self, kube: Kube) -> None:
        """Check with and read through the operator's API client."""
        self.kube = kube

    async def read(self, namespace: str, name: str, key: str, *, service_account: str) -> str:
        """The decoded value, or :class:`SecretUnavailable` naming what is wrong."""
        try:
            allowed, why = await self.kube.service_account_can(
                namespace, service_account, "get", "secrets", name
            )
        except AccessCheckFailed as err:  # fail closed: no answer is no
            raise SecretUnavailable(f"secret {namespace}/{name}: {err}") from None
        if not allowed:
            detail = f" ({why})" if why else ""
            raise SecretForbidden(
                f"serviceaccount {namespace}/{service_account} may not get "
                f"secrets/{name} in namespace {namespace}: the run acts as its "
                f"ServiceAccount, grant it get on that Secret with a Role{detail}"
            )
        value = await self.kube.read_secret_key(namespace, name, key)
        if value is None:
            raise SecretUnavailable(f"secret {namespace}/{name} has no key {key!r}")
        return value
