"""Workspaces: each run's claims, created when the run starts, as its ServiceAccount may.

Creating a PersistentVolumeClaim is something a run's pods cannot do themselves, so the
operator first asks (LocalSubjectAccessReview) whether the run's ServiceAccount may
create persistentvolumeclaims in the namespace (docs/security.md). Denied, the run
fails at start naming the permission; nothing is created.
"""

from __future__ import annotations

from maestro.api.models import WorkflowSpec
from maestro.executors.podspec import claims
from maestro.executors.secrets import DEFAULT_SERVICE_ACCOUNT
from maestro.k8s.client import AccessCheckFailed, Kube


class WorkspaceError(Exception):
    """The run's workspaces cannot be created; the message says why."""


async def ensure_claims(
    kube: Kube, namespace: str, run_name: str, run_uid: str, spec: WorkflowSpec
) -> None:
    """Create the run's claims (those that exist already are this run's: idempotent)."""
    if not spec.workspaces:
        return
    account = spec.service_account_name or DEFAULT_SERVICE_ACCOUNT
    try:
        allowed, why = await kube.service_account_can(
            namespace, account, "create", "persistentvolumeclaims", ""
        )
    except AccessCheckFailed as err:  # fail closed: no answer is no
        raise WorkspaceError(f"spec.workspaces: {err}") from None
    if not allowed:
        detail = f" ({why})" if why else ""
        raise WorkspaceError(
            f"spec.workspaces: serviceaccount {namespace}/{account} may not create "
            f"persistentvolumeclaims in namespace {namespace}: the run acts as its "
            f"ServiceAccount, grant it create on persistentvolumeclaims with a Role{detail}"
        )
    for claim in claims(spec, run_name, run_uid):
        await kube.create_pvc(namespace, claim)
