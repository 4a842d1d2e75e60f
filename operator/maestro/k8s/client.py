"""Thin async adapters over the Kubernetes API (kubernetes_asyncio).

Everything Maestro asks of the API server goes through :class:`Kube`, so the
permissions the chart must grant can be read from this one file.
"""

from __future__ import annotations

import base64
import logging
import os
from datetime import UTC, datetime
from typing import Any, cast

from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from maestro.api.models import GROUP, VERSION

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"
RUNS = "workflowruns"
WORKFLOWS = "workflows"
SCHEDULES = "workflowschedules"


class NotFound(LookupError):
    """The object does not exist."""


class AccessCheckFailed(RuntimeError):
    """The API server could not answer an access review (so the answer is "no")."""


class Conflict(RuntimeError):
    """The object changed since it was read (optimistic concurrency)."""


async def load_config(kubeconfig: str | None = None) -> client.ApiClient:
    """An API client from ``kubeconfig``, $KUBECONFIG, ~/.kube/config, or in-cluster."""
    if (
        kubeconfig is None
        and "KUBERNETES_SERVICE_HOST" in os.environ
        and not os.environ.get("KUBECONFIG")
    ):
        config.load_incluster_config()  # type: ignore[no-untyped-call]
        return client.ApiClient()
    cfg = client.Configuration()
    await config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
    return client.ApiClient(configuration=cfg)


class Kube:
    """The API calls Maestro makes; 404 becomes :class:`NotFound`, 409 on create is success."""

    def __init__(self, api: client.ApiClient) -> None:
        """Wrap an API client (closed by its owner)."""
        self.api = api
        self.batch = client.BatchV1Api(api)
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.authz = client.AuthorizationV1Api(api)
        self.reads = 0
        self.writes = 0

    async def close(self) -> None:
        """Close the underlying HTTP session."""
        await self.api.close()

    # Jobs and pods -------------------------------------------------------------------

    async def create_job(self, namespace: str, job: dict[str, Any]) -> bool:
        """Create a Job; False when it already exists (an idempotent start)."""
        self.writes += 1
        try:
            await self.batch.create_namespaced_job(namespace, cast(Any, job))
        except ApiException as err:
            if err.status == 409:
                return False
            raise
        return True

    async def create_pvc(self, namespace: str, claim: dict[str, Any]) -> bool:
        """Create a run's workspace claim; False when it already exists (idempotent)."""
        self.writes += 1
        try:
            await self.core.create_namespaced_persistent_volume_claim(namespace, cast(Any, claim))
        except ApiException as err:
            if err.status == 409:
                return False
            raise
        return True

    async def get_job(self, namespace: str, name: str) -> dict[str, Any]:
        """A Job as a plain dict."""
        self.reads += 1
        try:
            job = await self.batch.read_namespaced_job(name, namespace)
        except ApiException as err:
            if err.status == 404:
                raise NotFound(f"job {namespace}/{name}") from None
            raise
        result: dict[str, Any] = self.api.sanitize_for_serialization(job)
        return result

    async def delete_job(self, namespace: str, name: str) -> None:
        """Delete a Job and, in the background, its pods; a missing Job is fine."""
        self.writes += 1
        try:
            await self.batch.delete_namespaced_job(name, namespace, propagation_policy="Background")
        except ApiException as err:
            if err.status != 404:
                raise

    async def job_pods(self, namespace: str, job_name: str) -> list[dict[str, Any]]:
        """The pods a Job created, newest first."""
        self.reads += 1
        pods = await self.core.list_namespaced_pod(namespace, label_selector=f"job-name={job_name}")
        items: list[dict[str, Any]] = [self.api.sanitize_for_serialization(p) for p in pods.items]
        items.sort(key=lambda p: p["metadata"].get("creationTimestamp", ""), reverse=True)
        return items

    async def pod_log_tail(self, namespace: str, pod: str, lines: int = 5) -> str:
        """The last lines of a pod's log, or '' when there is none (kwok has none)."""
        self.reads += 1
        try:
            text = await self.core.read_namespaced_pod_log(pod, namespace, tail_lines=lines)
        except ApiException:
            return ""
        return str(text or "")

    # Secrets -------------------------------------------------------------------------

    async def read_secret_key(self, namespace: str, name: str, key: str) -> str | None:
        """One decoded key of a Secret; None when the Secret or the key is missing."""
        self.reads += 1
        try:
            secret = await self.core.read_namespaced_secret(name, namespace)
        except ApiException as err:
            if err.status == 404:
                return None
            raise
        data = secret.data or {}
        if key not in data:
            return None
        return base64.b64decode(data[key]).decode()

    async def service_account_can(
        self, namespace: str, service_account: str, verb: str, resource: str, name: str
    ) -> tuple[bool, str]:
        """Whether a ServiceAccount may ``verb`` one core object: (allowed, reason).

        A LocalSubjectAccessReview (namespaced, so a namespaced install can be granted
        it) with the user and groups the API server gives that ServiceAccount's token.
        """
        self.writes += 1
        review = client.V1LocalSubjectAccessReview(
            metadata=client.V1ObjectMeta(namespace=namespace),
            spec=client.V1SubjectAccessReviewSpec(
                user=f"system:serviceaccount:{namespace}:{service_account}",
                groups=[
                    "system:serviceaccounts",
                    f"system:serviceaccounts:{namespace}",
                    "system:authenticated",
                ],
                resource_attributes=client.V1ResourceAttributes(
                    namespace=namespace, verb=verb, resource=resource, name=name
                ),
            ),
        )
        try:
            result = await self.authz.create_namespaced_local_subject_access_review(
                namespace, review
            )
        except ApiException as err:
            raise AccessCheckFailed(
                f"cannot review what serviceaccount {namespace}/{service_account} may do: "
                f"{err.status} {err.reason} (the operator needs create on "
                "localsubjectaccessreviews)"
            ) from None
        status = result.status
        return bool(status and status.allowed), str((status and status.reason) or "")

    # Maestro resources ---------------------------------------------------------------

    async def get_workflow(self, namespace: str, name: str) -> dict[str, Any]:
        """A Workflow as a dict."""
        self.reads += 1
        try:
            obj: dict[str, Any] = await self.custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, WORKFLOWS, name
            )
        except ApiException as err:
            if err.status == 404:
                raise NotFound(f"workflow {namespace}/{name}") from None
            raise
        return obj

    async def create_run(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        """Create a WorkflowRun; returns it as stored (with its generated name)."""
        self.writes += 1
        obj: dict[str, Any] = await self.custom.create_namespaced_custom_object(
            GROUP, VERSION, namespace, RUNS, body
        )
        return obj

    async def get_run(self, namespace: str, name: str) -> dict[str, Any]:
        """A WorkflowRun as a dict."""
        self.reads += 1
        try:
            obj: dict[str, Any] = await self.custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, RUNS, name
            )
        except ApiException as err:
            if err.status == 404:
                raise NotFound(f"workflowrun {namespace}/{name}") from None
            raise
        return obj

    async def list_runs(self, namespace: str, label_selector: str = "") -> list[dict[str, Any]]:
        """Every WorkflowRun of a namespace (matching ``label_selector`` when given)."""
        self.reads += 1
        found = await self.custom.list_namespaced_custom_object(
            GROUP, VERSION, namespace, RUNS, label_selector=label_selector
        )
        items: list[dict[str, Any]] = found.get("items", [])
        return items

    async def get_schedule(self, namespace: str, name: str) -> dict[str, Any]:
        """A WorkflowSchedule as a dict."""
        self.reads += 1
        try:
            obj: dict[str, Any] = await self.custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, SCHEDULES, name
            )
        except ApiException as err:
            if err.status == 404:
                raise NotFound(f"workflowschedule {namespace}/{name}") from None
            raise
        return obj

    async def list_schedules(self, namespace: str) -> list[dict[str, Any]]:
        """Every WorkflowSchedule of a namespace."""
        self.reads += 1
        found = await self.custom.list_namespaced_custom_object(
            GROUP, VERSION, namespace, SCHEDULES
        )
        items: list[dict[str, Any]] = found.get("items", [])
        return items

    async def patch_schedule(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        """Merge-patch a WorkflowSchedule (``maestro schedule suspend/resume``)."""
        self.writes += 1
        call = cast(Any, self.custom.patch_namespaced_custom_object)
        try:
            await call(GROUP, VERSION, namespace, SCHEDULES, name, patch, _content_type=MERGE_PATCH)
        except ApiException as err:
            if err.status == 404:
                raise NotFound(f"workflowschedule {namespace}/{name}") from None
            raise

    async def create_run_once(self, namespace: str, body: dict[str, Any]) -> bool:
        """Create a WorkflowRun with a fixed name; False when it already exists."""
        self.writes += 1
        try:
            await self.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, RUNS, body)
        except ApiException as err:
            if err.status == 409:
                return False
            raise
        return True

    async def patch_run_spec(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        """Merge-patch a WorkflowRun (include metadata.resourceVersion for compare-and-set)."""
        self.writes += 1
        call = cast(Any, self.custom.patch_namespaced_custom_object)
        try:
            await call(GROUP, VERSION, namespace, RUNS, name, patch, _content_type=MERGE_PATCH)
        except ApiException as err:
            if err.status == 404:
                raise NotFound(f"workflowrun {namespace}/{name}") from None
            if err.status == 409:
                raise Conflict(f"workflowrun {namespace}/{name} changed meanwhile") from None
            raise

    async def pod_log(self, namespace: str, pod: str) -> str:
        """A pod's whole log; raises NotFound when the pod or its log is gone."""
        self.reads += 1
        try:
            return str(await self.core.read_namespaced_pod_log(pod, namespace) or "")
        except ApiException as err:
            raise NotFound(f"log of pod {namespace}/{pod}: {err.reason}") from None

    async def patch_status(
        self, plural: str, namespace: str, name: str, status: dict[str, Any]
    ) -> None:
        """Merge-patch the status subresource of one of our objects."""
        self.writes += 1
        try:
            # The generated signature omits _content_type, which the client does accept.
            patch = cast(Any, self.custom.patch_namespaced_custom_object_status)
            await patch(
                GROUP,
                VERSION,
                namespace,
                plural,
                name,
                {"status": status},
                _content_type=MERGE_PATCH,
            )
        except ApiException as err:
            if err.status == 404:
                raise NotFound(f"{plural} {namespace}/{name}") from None
            raise

    async def delete_run(self, namespace: str, name: str) -> None:
        """Delete a WorkflowRun (TTL after finish)."""
        self.writes += 1
        try:
            await self.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, RUNS, name)
        except ApiException as err:
            if err.status != 404:
                raise

    async def emit_event(
        self,
        involved: dict[str, Any],
        *,
        reason: str,
        message: str,
        warning: bool = False,
    ) -> None:
        """Record a Kubernetes Event about one of our objects (best effort)."""
        meta = involved["metadata"]
        now = datetime.now(UTC)
        self.writes += 1
        body = client.CoreV1Event(
            metadata=client.V1ObjectMeta(
                generate_name=f"{meta['name']}.", namespace=meta["namespace"]
            ),
            involved_object=client.V1ObjectReference(
                api_version=involved["apiVersion"],
                kind=involved["kind"],
                name=meta["name"],
                namespace=meta["namespace"],
                uid=meta.get("uid"),
            ),
            reason=reason,
            message=message[:1024],
            type="Warning" if warning else "Normal",
            source=client.V1EventSource(component="maestro"),
            first_timestamp=now,
            last_timestamp=now,
            count=1,
        )
        try:
            await self.core.create_namespaced_event(meta["namespace"], body)
        except ApiException as err:  # events are advisory: never fail a run over one
            log.warning(
                "cannot post event %s on %s: %s %s", reason, meta["name"], err.status, err.reason
            )
