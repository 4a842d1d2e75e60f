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
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

import aiohttp
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from maestro.api.models import API_VERSION, GROUP, VERSION

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"
RUNS = "workflowruns"
WORKFLOWS = "workflows"
# Annotation of a WorkflowRun made by a retry: the store id of the run it retries.
RETRY_OF = "maestro.dev/retry-of"
# Held on every WorkflowRun the operator drives: a deleted run is recorded Cancelled (and
# its pods stopped) by its owner before the object goes.
FINALIZER = "maestro.dev/finalizer"
# How often a read-modify-write of a run's spec is tried before giving up.
SPEC_CHANGE_ATTEMPTS = 5
SCHEDULES = "workflowschedules"


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


class AccessCheckFailed(RuntimeError):
    """The API server could not answer an access review (so the answer is "no")."""


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


async def _body(rsp: Any) -> bytes:
    """A raw (not preloaded) response's body; an error status raised as the client would."""
    data: bytes = await rsp.read()
    if not 200 <= rsp.status <= 299:
        err = ApiException(status=rsp.status, reason=rsp.reason)
        err.body = data  # the API's Status, which translate() reads
        raise err
    return data


async def load_config(
    kubeconfig: str | None = None, *, connections: int | None = None
) -> client.ApiClient:
    """An API client from ``kubeconfig``, $KUBECONFIG, ~/.kube/config, or in-cluster.

    ``connections`` caps the connections it keeps to the API server (the client's
    default is 100). Each TLS connection holds its buffers for as long as it lives: the
    operator's burst of a hundred runs opened ~80 and kept ~23 MiB in them. Requests
    beyond the cap wait for a free connection; a watch or a followed log holds one for
    as long as it lasts, so the cap must count them.
    """
    cfg = client.Configuration()
    if (
        kubeconfig is None
        and "KUBERNETES_SERVICE_HOST" in os.environ
        and not os.environ.get("KUBECONFIG")
    ):
        config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
    else:
        await config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
    if connections is not None:
        cfg.connection_pool_maxsize = connections
    return _direct(client.ApiClient(configuration=cfg))


def _direct(api: client.ApiClient) -> client.ApiClient:
    """The client with the environment read once, not on every request.

    kubernetes_asyncio's session trusts the environment, so aiohttp looks up the proxy
    variables and reads ~/.netrc in a thread for every request (two thread hops and a
    file read per pod created). The proxy for the API server is looked up here, once
    (NO_PROXY honoured), and a session that does not look again takes over the same
    connection pool; a netrc login never applies to the API server's own credentials.
    """
    rest = api.rest_client
    server = urllib.parse.urlsplit(api.configuration.host or "")
    proxy = urllib.request.getproxies().get(server.scheme)
    if proxy and not rest.proxy and not urllib.request.proxy_bypass(server.hostname or ""):
        rest.proxy = proxy
    trusting = rest.pool_manager
    rest.pool_manager = aiohttp.ClientSession(
        connector=trusting.connector,
        trust_env=False,
        read_bufsize=2**21,  # as kubernetes_asyncio's: a watch event may be large
    )
    trusting.detach()  # the connector is the new session's now
    return api


@dataclass(frozen=True)
class Caller:
    """Who a bearer token belongs to, as the API server's TokenReview says."""

    username: str
    uid: str
    groups: tuple[str, ...]
    # Pairs rather than a dict, so a Caller is hashable (a cache key).
    extra: tuple[tuple[str, tuple[str, ...]], ...]


def run_manifest(
    workflow: str,
    params: Mapping[str, str],
    *,
    name: str | None = None,
    labels: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
    no_cache: bool = False,
) -> dict[str, Any]:
    """A WorkflowRun of ``workflow`` (named ``name``, else ``WORKFLOW-`` plus a suffix)."""
    meta: dict[str, Any] = {"name": name} if name else {"generateName": f"{workflow}-"}
    if labels:
        meta["labels"] = dict(labels)
    if annotations:
        meta["annotations"] = dict(annotations)
    spec: dict[str, Any] = {"workflowRef": {"name": workflow}, "params": dict(params)}
    if no_cache:
        spec["noCache"] = True
    return {"apiVersion": API_VERSION, "kind": "WorkflowRun", "metadata": meta, "spec": spec}


def retry_manifest(old: Mapping[str, Any], run_id: str) -> dict[str, Any]:
    """A new WorkflowRun retrying ``old`` (store id ``run_id``): same spec, not cancelled."""
    spec = {k: v for k, v in (old.get("spec") or {}).items() if k not in ("cancel", "suspend")}
    return {
        "apiVersion": API_VERSION,
        "kind": "WorkflowRun",
        "metadata": {
            "generateName": f"{old['metadata']['name']}-retry-",
            "annotations": {RETRY_OF: run_id},
        },
        "spec": spec,
    }


IN_CLUSTER_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def current_namespace(kubeconfig: str | None = None) -> str:
    """The namespace kubectl would use: the current context's, else ``default``.

    In a pod without a kubeconfig, the pod's own namespace.
    """
    if (
        kubeconfig is None
        and "KUBERNETES_SERVICE_HOST" in os.environ
        and not os.environ.get("KUBECONFIG")
        and os.path.exists(IN_CLUSTER_NAMESPACE)
    ):
        with open(IN_CLUSTER_NAMESPACE, encoding="utf-8") as fh:
            return fh.read().strip() or "default"
    _, active = config.list_kube_config_contexts(config_file=kubeconfig)
    return str(((active or {}).get("context") or {}).get("namespace") or "default")


class Kube:
    """The API calls Maestro makes; every failure is raised as an :class:`APIError`."""

    def __init__(self, api: client.ApiClient) -> None:
        """Wrap an API client (closed by its owner)."""
        self.api = api
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.authz = client.AuthorizationV1Api(api)
        self.auth = client.AuthenticationV1Api(api)
        self.reads = 0
        self.writes = 0

    async def close(self) -> None:
        """Close the underlying HTTP session."""
        await self.api.close()

    # Pods ----------------------------------------------------------------------------

    async def create_pod(self, namespace: str, pod: dict[str, Any]) -> bool:
        """Create a pod; False when one of that name already exists."""
        self.writes += 1
        try:
            with api_errors(f"create pod {namespace}/{pod['metadata']['name']}"):
                # The pod sent back is not read: decoding it into the client's models cost
                # more than the request (the watch brings it anyway).
                await _body(
                    await self.core.create_namespaced_pod(
                        namespace, cast(Any, pod), _preload_content=False
                    )
                )
        except Conflict:
            return False
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

    async def get_pod(self, namespace: str, name: str) -> dict[str, Any]:
        """A pod as a plain dict."""
        self.reads += 1
        with api_errors(f"pod {namespace}/{name}"):
            pod = await self.core.read_namespaced_pod(name, namespace)
        result: dict[str, Any] = self.api.sanitize_for_serialization(pod)
        return result

    async def delete_pod(self, namespace: str, name: str) -> None:
        """Delete a pod; a missing pod is fine."""
        self.writes += 1
        with contextlib.suppress(NotFound), api_errors(f"delete pod {namespace}/{name}"):
            await self.core.delete_namespaced_pod(name, namespace)

    async def list_raw(self, resource: str, namespace: str | None, selector: str) -> bytes:
        """The JSON of a list of pods or WorkflowRuns (all namespaces for None),
        undecoded: the caller's decoder is faster than the client's models."""
        self.reads += 1
        with api_errors(f"{resource} in {namespace or 'all namespaces'}"):
            rsp = await self._list_request(resource, namespace, label_selector=selector)
            return await _body(rsp)

    async def watch_raw(
        self, resource: str, namespace: str | None, selector: str, version: str, seconds: int
    ) -> AsyncIterator[bytes]:
        """The lines (one JSON watch event each) of a watch of pods or WorkflowRuns."""
        self.reads += 1
        what = f"watch {resource} in {namespace or 'all namespaces'}"
        with api_errors(what):
            rsp = await self._list_request(
                resource,
                namespace,
                label_selector=selector,
                watch=True,
                resource_version=version,
                allow_watch_bookmarks=True,
                timeout_seconds=seconds,
                # No read timeout beyond the watch's own, but a dead connection ends it.
                _request_timeout=aiohttp.ClientTimeout(connect=30, sock_read=seconds + 30),
            )
            if rsp.status != 200:
                await _body(rsp)  # raises the typed error
        try:
            buffer = b""
            with api_errors(what):
                # Not line iteration: aiohttp refuses lines over 64 KiB, and a pod may be larger.
                async for chunk in rsp.content.iter_any():
                    buffer += chunk
                    *lines, buffer = buffer.split(b"\n")
                    for line in lines:
                        if line.strip():
                            yield line
        finally:
            rsp.release()

    async def _list_request(self, resource: str, namespace: str | None, **kw: Any) -> Any:
        # Without preloading, the generated client returns the aiohttp response as it is.
        kw["_preload_content"] = False
        if resource == "pods":
            if namespace is None:
                return await self.core.list_pod_for_all_namespaces(**kw)
            return await self.core.list_namespaced_pod(namespace, **kw)
        if namespace is None:
            return await self.custom.list_cluster_custom_object(GROUP, VERSION, resource, **kw)
        return await self.custom.list_namespaced_custom_object(
            GROUP, VERSION, namespace, resource, **kw
        )

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

    async def list_runs(
        self, namespace: str | None, label_selector: str = ""
    ) -> list[dict[str, Any]]:
        """Every WorkflowRun of a namespace (of all namespaces for None), matching
        ``label_selector`` when given."""
        self.reads += 1
        with api_errors(f"workflowruns in {namespace or 'all namespaces'}"):
            if namespace is None:
                found = await self.custom.list_cluster_custom_object(
                    GROUP, VERSION, RUNS, label_selector=label_selector
                )
            else:
                found = await self.custom.list_namespaced_custom_object(
                    GROUP, VERSION, namespace, RUNS, label_selector=label_selector
                )
        items: list[dict[str, Any]] = found.get("items", [])
        return items

    async def get_schedule(self, namespace: str, name: str) -> dict[str, Any]:
        """A WorkflowSchedule as a dict."""
        self.reads += 1
        with api_errors(f"workflowschedule {namespace}/{name}"):
            obj: dict[str, Any] = await self.custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, SCHEDULES, name
            )
        return obj

    async def list_schedules(self, namespace: str) -> list[dict[str, Any]]:
        """Every WorkflowSchedule of a namespace."""
        self.reads += 1
        with api_errors(f"workflowschedules in {namespace}"):
            found = await self.custom.list_namespaced_custom_object(
                GROUP, VERSION, namespace, SCHEDULES
            )
        items: list[dict[str, Any]] = found.get("items", [])
        return items

    async def patch_schedule(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        """Merge-patch a WorkflowSchedule (``maestro schedule suspend/resume``)."""
        self.writes += 1
        call = cast(Any, self.custom.patch_namespaced_custom_object)
        with api_errors(f"workflowschedule {namespace}/{name}"):
            await call(GROUP, VERSION, namespace, SCHEDULES, name, patch, _content_type=MERGE_PATCH)

    async def create_run_once(self, namespace: str, body: dict[str, Any]) -> bool:
        """Create a WorkflowRun with a fixed name; False when it already exists."""
        self.writes += 1
        try:
            with api_errors(f"create workflowrun in {namespace}"):
                await self.custom.create_namespaced_custom_object(
                    GROUP, VERSION, namespace, RUNS, body
                )
        except Conflict:
            return False
        return True

    async def patch_run_spec(
        self,
        namespace: str,
        name: str,
        patch: dict[str, Any],
        *,
        field_manager: str | None = None,
    ) -> None:
        """Merge-patch a WorkflowRun (include metadata.resourceVersion for compare-and-set).

        ``field_manager`` names who edits (the operator reads it back as the actor).
        """
        self.writes += 1
        call = cast(Any, self.custom.patch_namespaced_custom_object)
        extra = {"field_manager": field_manager} if field_manager else {}
        with api_errors(f"workflowrun {namespace}/{name}"):
            await call(
                GROUP, VERSION, namespace, RUNS, name, patch, _content_type=MERGE_PATCH, **extra
            )

    async def change_run_finalizers(
        self, namespace: str, name: str, body: Mapping[str, Any], add: bool
    ) -> None:
        """Add or remove the operator's finalizer, keeping everyone else's.

        A merge patch of the whole list, made only at the resourceVersion it was read at
        (``body`` first, then fresh reads after a conflict). NotFound: the run is gone.
        """
        obj: Mapping[str, Any] = body
        for _ in range(SPEC_CHANGE_ATTEMPTS):
            meta = obj["metadata"]
            present = list(meta.get("finalizers") or [])
            wanted = [f for f in present if f != FINALIZER] + ([FINALIZER] if add else [])
            if wanted == present:
                return
            patch = {"metadata": {"resourceVersion": meta["resourceVersion"], "finalizers": wanted}}
            try:
                await self.patch_run_spec(namespace, name, patch)
                return
            except Conflict:
                obj = await self.get_run(namespace, name)
        raise Conflict(f"workflowrun {namespace}/{name}", "finalizers keep changing; try again")

    async def change_run_spec(
        self,
        namespace: str,
        name: str,
        change: Callable[[dict[str, Any]], dict[str, Any]],
        *,
        check: Callable[[dict[str, Any]], None] = lambda obj: None,
        field_manager: str | None = None,
    ) -> None:
        """Merge ``change(spec)`` into a run's spec; read-modify-write with the
        resourceVersion, so concurrent edits are not lost. ``check`` may refuse the edit
        (by raising) after each read; ``field_manager`` names who edits (the operator
        reads it back as the actor). Raises :class:`Conflict` when the run keeps
        changing, :class:`NotFound` when it is gone."""
        for _ in range(SPEC_CHANGE_ATTEMPTS):
            obj = await self.get_run(namespace, name)
            check(obj)
            patch = {
                "metadata": {"resourceVersion": obj["metadata"]["resourceVersion"]},
                "spec": change(obj.get("spec") or {}),
            }
            try:
                await self.patch_run_spec(namespace, name, patch, field_manager=field_manager)
                return
            except Conflict:
                continue  # someone else wrote first: read again
        raise Conflict(f"workflowrun {namespace}/{name}", "keeps changing; try again")

    async def list_pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        """Pods matching a label selector, oldest first."""
        self.reads += 1
        pods = await self.core.list_namespaced_pod(namespace, label_selector=selector)
        items: list[dict[str, Any]] = [self.api.sanitize_for_serialization(p) for p in pods.items]
        items.sort(key=lambda p: p["metadata"].get("creationTimestamp", ""))
        return items

    async def follow_pod_log(self, namespace: str, pod: str) -> AsyncIterator[bytes]:
        """A running pod's log as it is written, until the container ends."""
        self.reads += 1
        with api_errors(f"log of pod {namespace}/{pod}"):
            # Without preloading, the call returns the aiohttp response to stream from.
            rsp: Any = await self.core.read_namespaced_pod_log(
                pod, namespace, follow=True, _preload_content=False
            )
        try:
            async for chunk in rsp.content.iter_any():
                yield chunk
        finally:
            rsp.release()

    async def review_token(self, token: str) -> Caller | None:
        """The caller a bearer token authenticates, or None when the API server says no."""
        self.writes += 1
        review = client.V1TokenReview(spec=client.V1TokenReviewSpec(token=token))
        result = await client.AuthenticationV1Api(self.api).create_token_review(review)
        status = result.status
        if status is None or not status.authenticated or status.user is None:
            return None
        user = status.user
        return Caller(
            username=user.username or "",
            uid=user.uid or "",
            groups=tuple(user.groups or ()),
            extra=tuple(sorted((k, tuple(v)) for k, v in (user.extra or {}).items())),
        )

    async def may(
        self,
        caller: Caller,
        verb: str,
        resource: str,
        namespace: str,
        *,
        group: str = GROUP,
        subresource: str | None = None,
    ) -> bool:
        """Whether the API server's authorizer lets ``caller`` do ``verb`` on ``resource``
        in ``namespace`` ("" for every namespace): a SubjectAccessReview."""
        self.writes += 1
        review = client.V1SubjectAccessReview(
            spec=client.V1SubjectAccessReviewSpec(
                user=caller.username,
                uid=caller.uid or None,
                groups=list(caller.groups),
                extra={k: list(v) for k, v in caller.extra} or None,
                resource_attributes=client.V1ResourceAttributes(
                    group=group,
                    resource=resource,
                    subresource=subresource,
                    verb=verb,
                    namespace=namespace or None,
                ),
            )
        )
        result = await client.AuthorizationV1Api(self.api).create_subject_access_review(review)
        return bool(result.status and result.status.allowed)

    async def version(self) -> str:
        """The API server's version (a cheap call: proves it answers)."""
        self.reads += 1
        info = await client.VersionApi(self.api).get_code()
        return str(info.git_version)

    async def whoami(self) -> str:
        """The caller's user name, as the API server authenticated it (SelfSubjectReview)."""
        review = await self.auth.create_self_subject_review(
            client.V1SelfSubjectReview(
                api_version="authentication.k8s.io/v1", kind="SelfSubjectReview"
            )
        )
        return str(review.status.user_info.username)

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
            rsp = await patch(
                GROUP,
                VERSION,
                namespace,
                plural,
                name,
                {"status": status},
                _content_type=MERGE_PATCH,
                _preload_content=False,  # the object sent back is not needed
            )
            await _body(rsp)

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
            await _body(
                await self.core.create_namespaced_event(
                    meta["namespace"], body, _preload_content=False
                )
            )
