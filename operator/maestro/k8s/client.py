"""Thin async adapters over the Kubernetes API (kubernetes_asyncio).

Everything Maestro asks of the API server goes through :class:`Kube`, so the
permissions the chart must grant can be read from this one file.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, cast

import aiohttp
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from maestro.api.models import GROUP, VERSION

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"
RUNS = "workflowruns"
WORKFLOWS = "workflows"


class APIError(Exception):
    """A request the API server refused or never answered, translated once, here.

    ``status`` is the HTTP status (None when no answer came), ``reason`` the API's
    machine-readable reason (``Invalid``, ``Forbidden``, ...) and ``message`` its own
    human-readable text, which is what a failed task shows.
    """

    def __init__(
        self, what: str, message: str, *, status: int | None = None, reason: str = ""
    ) -> None:
        super().__init__(f"{what}: {message}")
        self.what, self.message, self.status, self.reason = what, message, status, reason


class TransientAPIError(APIError):
    """Worth trying again soon: 5xx, 429, a timeout or no connection at all."""


class PermanentAPIError(APIError):
    """Trying again changes nothing (422 Invalid, 403 Forbidden, ...): fail what asked."""


class NotFound(PermanentAPIError, LookupError):
    """The object does not exist."""


class Conflict(PermanentAPIError, RuntimeError):
    """The object changed since it was read, or already exists (409)."""


class NamespaceTerminating(PermanentAPIError):
    """The namespace is being deleted: nothing new may be created in it."""


def _status_body(err: ApiException) -> dict[str, Any]:
    try:
        body = json.loads(err.body or "")
    except (TypeError, ValueError):
        return {}
    return body if isinstance(body, dict) else {}


def translate(err: BaseException, what: str) -> APIError | None:
    """The typed error for a failed request about ``what``; None when not an API error.

    Like Kopf's ``check_response``: the API's Status body gives the message and causes.
    """
    if isinstance(err, ApiException):
        status = int(err.status or 0)
        body = _status_body(err)
        message = str(body.get("message") or err.reason or f"HTTP {status}")
        reason = str(body.get("reason") or err.reason or "")
        causes = (body.get("details") or {}).get("causes") or []
        if any(c.get("reason") == "NamespaceTerminating" for c in causes if isinstance(c, dict)):
            return NamespaceTerminating(what, message, status=status, reason="NamespaceTerminating")
        if status == 404:
            return NotFound(what, message, status=status, reason=reason)
        if status == 409:
            return Conflict(what, message, status=status, reason=reason)
        if status == 429 or status >= 500 or status == 0:
            return TransientAPIError(what, message, status=status, reason=reason)
        return PermanentAPIError(what, message, status=status, reason=reason)
    if isinstance(err, aiohttp.ClientError | asyncio.TimeoutError | ConnectionError):
        return TransientAPIError(what, f"{type(err).__name__}: {err}".rstrip(": "))
    return None


@contextlib.contextmanager
def api_errors(what: str) -> Iterator[None]:
    """Raise the typed :class:`APIError` for any failed request in the block."""
    try:
        yield
    except (TimeoutError, ApiException, aiohttp.ClientError, ConnectionError) as err:
        typed = translate(err, what)
        assert typed is not None
        raise typed from err


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
    """The API calls Maestro makes; every failure is raised as an :class:`APIError`."""

    def __init__(self, api: client.ApiClient) -> None:
        """Wrap an API client (closed by its owner)."""
        self.api = api
        self.batch = client.BatchV1Api(api)
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.reads = 0
        self.writes = 0

    async def close(self) -> None:
        """Close the underlying HTTP session."""
        await self.api.close()

    # Jobs and pods -------------------------------------------------------------------

    async def create_job(self, namespace: str, job: dict[str, Any]) -> bool:
        """Create a Job; False when one of that name already exists."""
        self.writes += 1
        try:
            with api_errors(f"create job {namespace}/{job['metadata']['name']}"):
                await self.batch.create_namespaced_job(namespace, cast(Any, job))
        except Conflict:
            return False
        return True

    async def get_job(self, namespace: str, name: str) -> dict[str, Any]:
        """A Job as a plain dict."""
        self.reads += 1
        with api_errors(f"job {namespace}/{name}"):
            job = await self.batch.read_namespaced_job(name, namespace)
        result: dict[str, Any] = self.api.sanitize_for_serialization(job)
        return result

    async def delete_job(self, namespace: str, name: str) -> None:
        """Delete a Job and, in the background, its pods; a missing Job is fine."""
        self.writes += 1
        with contextlib.suppress(NotFound), api_errors(f"delete job {namespace}/{name}"):
            await self.batch.delete_namespaced_job(name, namespace, propagation_policy="Background")

    async def job_pods(self, namespace: str, job_name: str) -> list[dict[str, Any]]:
        """The pods a Job created, newest first."""
        self.reads += 1
        with api_errors(f"pods of job {namespace}/{job_name}"):
            pods = await self.core.list_namespaced_pod(
                namespace, label_selector=f"job-name={job_name}"
            )
        items: list[dict[str, Any]] = [self.api.sanitize_for_serialization(p) for p in pods.items]
        items.sort(key=lambda p: p["metadata"].get("creationTimestamp", ""), reverse=True)
        return items

    async def pod_log_tail(self, namespace: str, pod: str, lines: int = 5) -> str:
        """The last lines of a pod's log, or '' when there is none (kwok has none)."""
        self.reads += 1
        try:
            with api_errors(f"log of pod {namespace}/{pod}"):
                text = await self.core.read_namespaced_pod_log(pod, namespace, tail_lines=lines)
        except APIError:  # a kubelet without logs (kwok) answers 500
            return ""
        return str(text or "")

    async def namespace_terminating(self, namespace: str) -> bool:
        """Whether the namespace is being deleted (False when it cannot be read)."""
        self.reads += 1
        try:
            with api_errors(f"namespace {namespace}"):
                ns = await self.core.read_namespace(namespace)
        except NotFound:
            return True
        except PermanentAPIError:
            return False  # not allowed to look: assume it lives, as before
        return bool(ns.metadata.deletion_timestamp) or (ns.status and ns.status.phase) == (
            "Terminating"
        )

    # Secrets -------------------------------------------------------------------------

    async def read_secret_key(self, namespace: str, name: str, key: str) -> str | None:
        """One decoded key of a Secret; None when the Secret or the key is missing."""
        self.reads += 1
        try:
            with api_errors(f"secret {namespace}/{name}"):
                secret = await self.core.read_namespaced_secret(name, namespace)
        except NotFound:
            return None
        data = secret.data or {}
        if key not in data:
            return None
        return base64.b64decode(data[key]).decode()

    # Maestro resources ---------------------------------------------------------------

    async def get_workflow(self, namespace: str, name: str) -> dict[str, Any]:
        """A Workflow as a dict."""
        self.reads += 1
        with api_errors(f"workflow {namespace}/{name}"):
            obj: dict[str, Any] = await self.custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, WORKFLOWS, name
            )
        return obj

    async def create_run(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        """Create a WorkflowRun; returns it as stored (with its generated name)."""
        self.writes += 1
        with api_errors(f"create workflowrun in {namespace}"):
            obj: dict[str, Any] = await self.custom.create_namespaced_custom_object(
                GROUP, VERSION, namespace, RUNS, body
            )
        return obj

    async def get_run(self, namespace: str, name: str) -> dict[str, Any]:
        """A WorkflowRun as a dict."""
        self.reads += 1
        with api_errors(f"workflowrun {namespace}/{name}"):
            obj: dict[str, Any] = await self.custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, RUNS, name
            )
        return obj

    async def list_runs(self, namespace: str) -> list[dict[str, Any]]:
        """Every WorkflowRun of a namespace."""
        self.reads += 1
        with api_errors(f"workflowruns in {namespace}"):
            found = await self.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, RUNS)
        items: list[dict[str, Any]] = found.get("items", [])
        return items

    async def patch_run_spec(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        """Merge-patch a WorkflowRun (include metadata.resourceVersion for compare-and-set)."""
        self.writes += 1
        call = cast(Any, self.custom.patch_namespaced_custom_object)
        with api_errors(f"workflowrun {namespace}/{name}"):
            await call(GROUP, VERSION, namespace, RUNS, name, patch, _content_type=MERGE_PATCH)

    async def pod_log(self, namespace: str, pod: str) -> str:
        """A pod's whole log; raises NotFound when the pod or its log is gone."""
        self.reads += 1
        try:
            with api_errors(f"log of pod {namespace}/{pod}"):
                return str(await self.core.read_namespaced_pod_log(pod, namespace) or "")
        except APIError as err:  # a kubelet without logs (kwok) answers 500: no log either
            raise NotFound(err.what, err.message, status=err.status, reason=err.reason) from None

    async def patch_status(
        self, plural: str, namespace: str, name: str, status: dict[str, Any]
    ) -> None:
        """Merge-patch the status subresource of one of our objects."""
        self.writes += 1
        # The generated signature omits _content_type, which the client does accept.
        patch = cast(Any, self.custom.patch_namespaced_custom_object_status)
        with api_errors(f"status of {plural} {namespace}/{name}"):
            await patch(
                GROUP,
                VERSION,
                namespace,
                plural,
                name,
                {"status": status},
                _content_type=MERGE_PATCH,
            )

    async def delete_run(self, namespace: str, name: str) -> None:
        """Delete a WorkflowRun (TTL after finish)."""
        self.writes += 1
        with contextlib.suppress(NotFound), api_errors(f"delete workflowrun {namespace}/{name}"):
            await self.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, RUNS, name)

    async def emit_event(
        self,
        involved: dict[str, Any],
        *,
        reason: str,
        message: str,
        warning: bool = False,
        name: str | None = None,
    ) -> None:
        """Record a Kubernetes Event about one of our objects.

        With ``name`` the Event is created under that name, and one that already
        exists counts as posted: a retry after a crash never posts it twice.
        Raises :class:`APIError`; callers decide whether an Event is worth a retry.
        """
        meta = involved["metadata"]
        now = datetime.now(UTC)
        self.writes += 1
        body = client.CoreV1Event(
            metadata=client.V1ObjectMeta(
                name=name,
                generate_name=None if name else f"{meta['name']}.",
                namespace=meta["namespace"],
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
        with contextlib.suppress(Conflict), api_errors(f"event {reason} on {meta['name']}"):
            await self.core.create_namespaced_event(meta["namespace"], body)
