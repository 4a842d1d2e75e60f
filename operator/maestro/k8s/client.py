"""Thin async adapters over the Kubernetes API (plain aiohttp, JSON with orjson).

Everything Maestro asks of the API server goes through :class:`Kube`, so the
permissions the chart must grant can be read from this one file.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson

from maestro import __version__
from maestro.api.models import API_VERSION, GROUP, VERSION
from maestro.k8s.config import ConfigError, Credentials, load

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


def status_error(what: str, status: int, reason: str, body: bytes) -> APIError:
    """The typed error for an answer with an error ``status``, about ``what``.

    Like Kopf's ``check_response``: the API's Status body gives the message and causes.
    """
    try:
        parsed = orjson.loads(body) if body else {}
    except orjson.JSONDecodeError:
        parsed = {}
    doc: dict[str, Any] = parsed if isinstance(parsed, dict) else {}
    message = str(doc.get("message") or reason or f"HTTP {status}")
    why = str(doc.get("reason") or reason or "")
    causes = (doc.get("details") or {}).get("causes") or []
    if any(c.get("reason") == "NamespaceTerminating" for c in causes if isinstance(c, dict)):
        return NamespaceTerminating(what, message, status=status, reason="NamespaceTerminating")
    if status == 404:
        return NotFound(what, message, status=status, reason=why)
    if status == 409:
        return Conflict(what, message, status=status, reason=why)
    if status == 429 or status >= 500:
        return TransientAPIError(what, message, status=status, reason=why)
    return PermanentAPIError(what, message, status=status, reason=why)


@contextlib.contextmanager
def api_errors(what: str) -> Iterator[None]:
    """Raise a request that got no (whole) answer in the block (a timeout, a refused or
    dropped connection, a TLS failure) as a :class:`TransientAPIError`: worth a retry."""
    try:
        yield
    except (aiohttp.ClientError, TimeoutError, ConnectionError) as err:
        raise TransientAPIError(what, f"{type(err).__name__}: {err}".rstrip(": ")) from err


# An ordinary request that receives nothing for this long is dead (the client had no
# timeout at all); a watch sets its own, a followed log none.
REQUEST_TIMEOUT = aiohttp.ClientTimeout(sock_connect=30, sock_read=60)
STREAM_TIMEOUT = aiohttp.ClientTimeout(sock_connect=30)
JSON = "application/json"


def _segment(name: str) -> str:
    """A name as one path segment: a hostile name never reaches another path."""
    return urllib.parse.quote(name, safe="")


class Api:
    """One HTTP session with the API server: JSON in and out, errors typed.

    A plain aiohttp client, not a generated one: the operator makes a dozen kinds of
    call, and the generated client's models cost ~36 MiB of memory (imported by Kopf,
    too, whenever installed) and more CPU per request than the request itself.
    """

    def __init__(self, creds: Credentials, *, connections: int | None = None) -> None:
        """A session to ``creds.server``; ``connections`` caps its pool (see load_config)."""
        self.creds = creds
        server = urllib.parse.urlsplit(creds.server)
        proxy = creds.proxy
        if proxy is None and not urllib.request.proxy_bypass(server.hostname or ""):
            # Looked up once (NO_PROXY honoured), not per request as a session that
            # trusts the environment would, reading ~/.netrc in a thread each time.
            proxy = urllib.request.getproxies().get(server.scheme)
        self.proxy = proxy
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=connections or 100, ssl=creds.ssl),
            trust_env=False,
            read_bufsize=2**21,  # a watch event may be large
            headers={"Accept": JSON, "User-Agent": f"maestro/{__version__}"},
        )

    async def close(self) -> None:
        """Close the session and its connections."""
        await self.session.close()

    async def __aenter__(self) -> Api:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(
        self,
        method: str,
        path: str,
        what: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        content_type: str = JSON,
        timing: aiohttp.ClientTimeout = REQUEST_TIMEOUT,
    ) -> aiohttp.ClientResponse:
        """The answer to a request, its status checked; the caller reads and releases it.

        Every failure is raised as an :class:`APIError` about ``what``.
        """
        headers = {}
        try:
            auth = await self.creds.authorization()
        except ConfigError as err:  # an exec plugin failed, a token file went: try later
            raise TransientAPIError(what, f"no credentials: {err}") from None
        if auth is not None:
            headers["Authorization"] = auth
        data = None
        if body is not None:
            data = orjson.dumps(body)
            headers["Content-Type"] = content_type
        with api_errors(what):
            rsp = await self.session.request(
                method,
                self.creds.server + path,
                params=params,
                data=data,
                headers=headers,
                timeout=timing,
                proxy=self.proxy,
                server_hostname=self.creds.server_name,
            )
            if 200 <= rsp.status <= 299:
                return rsp
            try:
                answer = await rsp.read()
            finally:
                rsp.release()
        if rsp.status == 401:
            self.creds.expire()  # a rotated token: read it again next time
        raise status_error(what, rsp.status, rsp.reason or "", answer)

    async def read(self, method: str, path: str, what: str, **kw: Any) -> bytes:
        """The body of the answer to a request (see :meth:`open`)."""
        rsp = await self.open(method, path, what, **kw)
        try:
            with api_errors(what):
                return await rsp.read()
        finally:
            rsp.release()

    async def call(self, method: str, path: str, what: str, **kw: Any) -> Any:
        """The decoded JSON answer to a request (see :meth:`open`)."""
        data = await self.read(method, path, what, **kw)
        return orjson.loads(data) if data else None


async def load_config(kubeconfig: str | None = None, *, connections: int | None = None) -> Api:
    """A session with the API server of ``kubeconfig``, $KUBECONFIG, ~/.kube/config, or
    the pod's service account (:mod:`maestro.k8s.config`).

    ``connections`` caps the connections it keeps to the API server (default 100).
    Each TLS connection holds its buffers for as long as it lives: the operator's burst
    of a hundred runs opened ~80 and kept ~23 MiB in them. Requests beyond the cap wait
    for a free connection; a watch or a followed log holds one for as long as it lasts,
    so the cap must count them.
    """
    return Api(load(kubeconfig), connections=connections)


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


@contextlib.contextmanager
def _no_log() -> Iterator[None]:
    """Any refusal to give a pod's log as :class:`NotFound`: a kubelet that cannot serve
    logs (kwok has none) answers 500, and to a reader that is no log either."""
    try:
        yield
    except APIError as err:
        raise NotFound(err.what, err.message, status=err.status, reason=err.reason) from None


CORE = "/api/v1"
OURS = f"/apis/{GROUP}/{VERSION}"
AUTHZ = "/apis/authorization.k8s.io/v1"
AUTHN = "/apis/authentication.k8s.io/v1"


def _in(namespace: str | None, base: str, resource: str, name: str | None = None) -> str:
    """The path of a collection in ``namespace`` (across all namespaces for None), or of
    the object ``name`` in it."""
    path = f"{base}/{resource}"
    if namespace is not None:
        path = f"{base}/namespaces/{_segment(namespace)}/{resource}"
    return path if name is None else f"{path}/{_segment(name)}"


def _pods(namespace: str, name: str | None = None) -> str:
    return _in(namespace, CORE, "pods", name)


def _ours(plural: str, namespace: str, name: str | None = None) -> str:
    return _in(namespace, OURS, plural, name)


class Kube:
    """The API calls Maestro makes; every failure is raised as an :class:`APIError`."""

    def __init__(self, api: Api) -> None:
        """Wrap an API session (closed by :meth:`close`)."""
        self.api = api
        self.reads = 0
        self.writes = 0

    async def close(self) -> None:
        """Close the underlying HTTP session."""
        await self.api.close()

    # Pods ----------------------------------------------------------------------------

    async def create_pod(self, namespace: str, pod: dict[str, Any]) -> bool:
        """Create a pod; False when one of that name already exists."""
        self.writes += 1
        what = f"create pod {namespace}/{pod['metadata']['name']}"
        try:
            # The pod sent back is not decoded (the watch brings it anyway).
            await self.api.read("POST", _pods(namespace), what, body=pod)
        except Conflict:
            return False
        return True

    async def create_pvc(self, namespace: str, claim: dict[str, Any]) -> bool:
        """Create a run's workspace claim; False when it already exists (idempotent)."""
        self.writes += 1
        what = f"create persistentvolumeclaim {namespace}/{claim['metadata']['name']}"
        try:
            await self.api.read(
                "POST", _in(namespace, CORE, "persistentvolumeclaims"), what, body=claim
            )
        except Conflict:
            return False
        return True

    async def get_pod(self, namespace: str, name: str) -> dict[str, Any]:
        """A pod as a plain dict."""
        self.reads += 1
        pod: dict[str, Any] = await self.api.call(
            "GET", _pods(namespace, name), f"pod {namespace}/{name}"
        )
        return pod

    async def delete_pod(self, namespace: str, name: str) -> None:
        """Delete a pod; a missing pod is fine."""
        self.writes += 1
        with contextlib.suppress(NotFound):
            await self.api.read("DELETE", _pods(namespace, name), f"delete pod {namespace}/{name}")

    def _collection(self, resource: str, namespace: str | None) -> str:
        if resource == "pods":
            return _in(namespace, CORE, "pods")
        return _in(namespace, OURS, resource)

    async def list_raw(self, resource: str, namespace: str | None, selector: str) -> bytes:
        """The JSON of a list of pods or WorkflowRuns (all namespaces for None),
        undecoded: the caller decodes it as it needs."""
        self.reads += 1
        return await self.api.read(
            "GET",
            self._collection(resource, namespace),
            f"{resource} in {namespace or 'all namespaces'}",
            params={"labelSelector": selector},
        )

    async def watch_raw(
        self, resource: str, namespace: str | None, selector: str, version: str, seconds: int
    ) -> AsyncIterator[bytes]:
        """The lines (one JSON watch event each) of a watch of pods or WorkflowRuns."""
        self.reads += 1
        what = f"watch {resource} in {namespace or 'all namespaces'}"
        rsp = await self.api.open(
            "GET",
            self._collection(resource, namespace),
            what,
            params={
                "labelSelector": selector,
                "watch": "true",
                "resourceVersion": version,
                "allowWatchBookmarks": "true",
                "timeoutSeconds": str(seconds),
            },
            # No read timeout beyond the watch's own, but a dead connection ends it.
            timing=aiohttp.ClientTimeout(sock_connect=30, sock_read=seconds + 30),
        )
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

    async def _log(self, namespace: str, pod: str, **params: str) -> str:
        data = await self.api.read(
            "GET",
            f"{_pods(namespace, pod)}/log",
            f"log of pod {namespace}/{pod}",
            params=params or None,
        )
        return data.decode("utf-8", errors="replace")

    async def pod_log_tail(self, namespace: str, pod: str, lines: int = 5) -> str:
        """The last lines of a pod's log, or '' when there is none (kwok has none)."""
        self.reads += 1
        try:
            return await self._log(namespace, pod, tailLines=str(lines))
        except APIError:  # a kubelet without logs (kwok) answers 500
            return ""

    async def namespace_terminating(self, namespace: str) -> bool:
        """Whether the namespace is being deleted (False when it cannot be read)."""
        self.reads += 1
        try:
            ns = await self.api.call(
                "GET", f"{CORE}/namespaces/{_segment(namespace)}", f"namespace {namespace}"
            )
        except NotFound:
            return True
        except PermanentAPIError:
            return False  # not allowed to look: assume it lives, as before
        meta, status = ns.get("metadata") or {}, ns.get("status") or {}
        return bool(meta.get("deletionTimestamp")) or status.get("phase") == "Terminating"

    # Secrets -------------------------------------------------------------------------

    async def read_secret_key(self, namespace: str, name: str, key: str) -> str | None:
        """One decoded key of a Secret; None when the Secret or the key is missing."""
        self.reads += 1
        try:
            secret = await self.api.call(
                "GET",
                _in(namespace, CORE, "secrets", name),
                f"secret {namespace}/{name}",
            )
        except NotFound:
            return None
        data = secret.get("data") or {}
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
        review = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "LocalSubjectAccessReview",
            "metadata": {"namespace": namespace},
            "spec": {
                "user": f"system:serviceaccount:{namespace}:{service_account}",
                "groups": [
                    "system:serviceaccounts",
                    f"system:serviceaccounts:{namespace}",
                    "system:authenticated",
                ],
                "resourceAttributes": {
                    "namespace": namespace,
                    "verb": verb,
                    "resource": resource,
                    "name": name,
                },
            },
        }
        try:
            result = await self.api.call(
                "POST",
                _in(namespace, AUTHZ, "localsubjectaccessreviews"),
                f"review of serviceaccount {namespace}/{service_account}",
                body=review,
            )
        except APIError as err:
            raise AccessCheckFailed(
                f"cannot review what serviceaccount {namespace}/{service_account} may do: "
                f"{err.status or ''} {err.reason or err.message} (the operator needs create on "
                "localsubjectaccessreviews)"
            ) from None
        status = result.get("status") or {}
        return bool(status.get("allowed")), str(status.get("reason") or "")

    # Maestro resources ---------------------------------------------------------------

    async def get_workflow(self, namespace: str, name: str) -> dict[str, Any]:
        """A Workflow as a dict."""
        self.reads += 1
        obj: dict[str, Any] = await self.api.call(
            "GET", _ours(WORKFLOWS, namespace, name), f"workflow {namespace}/{name}"
        )
        return obj

    async def create_run(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        """Create a WorkflowRun; returns it as stored (with its generated name)."""
        self.writes += 1
        obj: dict[str, Any] = await self.api.call(
            "POST", _ours(RUNS, namespace), f"create workflowrun in {namespace}", body=body
        )
        return obj

    async def get_run(self, namespace: str, name: str) -> dict[str, Any]:
        """A WorkflowRun as a dict."""
        self.reads += 1
        obj: dict[str, Any] = await self.api.call(
            "GET", _ours(RUNS, namespace, name), f"workflowrun {namespace}/{name}"
        )
        return obj

    async def list_runs(
        self, namespace: str | None, label_selector: str = ""
    ) -> list[dict[str, Any]]:
        """Every WorkflowRun of a namespace (of all namespaces for None), matching
        ``label_selector`` when given."""
        self.reads += 1
        found = await self.api.call(
            "GET",
            _in(namespace, OURS, RUNS),
            f"workflowruns in {namespace or 'all namespaces'}",
            params={"labelSelector": label_selector} if label_selector else None,
        )
        items: list[dict[str, Any]] = found.get("items") or []
        return items

    async def get_schedule(self, namespace: str, name: str) -> dict[str, Any]:
        """A WorkflowSchedule as a dict."""
        self.reads += 1
        obj: dict[str, Any] = await self.api.call(
            "GET", _ours(SCHEDULES, namespace, name), f"workflowschedule {namespace}/{name}"
        )
        return obj

    async def list_schedules(self, namespace: str) -> list[dict[str, Any]]:
        """Every WorkflowSchedule of a namespace."""
        self.reads += 1
        found = await self.api.call(
            "GET", _ours(SCHEDULES, namespace), f"workflowschedules in {namespace}"
        )
        items: list[dict[str, Any]] = found.get("items") or []
        return items

    async def _merge_patch(
        self, path: str, what: str, patch: dict[str, Any], field_manager: str | None = None
    ) -> None:
        """Merge-patch one of our objects (the object sent back is not needed)."""
        self.writes += 1
        await self.api.read(
            "PATCH",
            path,
            what,
            body=patch,
            content_type=MERGE_PATCH,
            params={"fieldManager": field_manager} if field_manager else None,
        )

    async def patch_schedule(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        """Merge-patch a WorkflowSchedule (``maestro schedule suspend/resume``)."""
        await self._merge_patch(
            _ours(SCHEDULES, namespace, name), f"workflowschedule {namespace}/{name}", patch
        )

    async def create_run_once(self, namespace: str, body: dict[str, Any]) -> bool:
        """Create a WorkflowRun with a fixed name; False when it already exists."""
        self.writes += 1
        try:
            await self.api.read(
                "POST", _ours(RUNS, namespace), f"create workflowrun in {namespace}", body=body
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
        await self._merge_patch(
            _ours(RUNS, namespace, name), f"workflowrun {namespace}/{name}", patch, field_manager
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
        found = await self.api.call(
            "GET", _pods(namespace), f"pods in {namespace}", params={"labelSelector": selector}
        )
        items: list[dict[str, Any]] = found.get("items") or []
        items.sort(key=lambda p: p["metadata"].get("creationTimestamp", ""))
        return items

    async def follow_pod_log(self, namespace: str, pod: str) -> AsyncIterator[bytes]:
        """A running pod's log as it is written, until the container ends; raises
        NotFound when there is none to follow."""
        self.reads += 1
        what = f"log of pod {namespace}/{pod}"
        with _no_log():
            rsp = await self.api.open(
                "GET",
                f"{_pods(namespace, pod)}/log",
                what,
                params={"follow": "true"},
                timing=STREAM_TIMEOUT,
            )
        try:
            with api_errors(what):
                async for chunk in rsp.content.iter_any():
                    yield chunk
        finally:
            rsp.release()

    async def review_token(self, token: str) -> Caller | None:
        """The caller a bearer token authenticates, or None when the API server says no."""
        self.writes += 1
        review = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token},
        }
        result = await self.api.call("POST", f"{AUTHN}/tokenreviews", "token review", body=review)
        status = result.get("status") or {}
        user = status.get("user")
        if not status.get("authenticated") or not user:
            return None
        return Caller(
            username=str(user.get("username") or ""),
            uid=str(user.get("uid") or ""),
            groups=tuple(user.get("groups") or ()),
            extra=tuple(sorted((k, tuple(v)) for k, v in (user.get("extra") or {}).items())),
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
        attributes = {"group": group, "resource": resource, "verb": verb}
        if subresource:
            attributes["subresource"] = subresource
        if namespace:
            attributes["namespace"] = namespace
        spec: dict[str, Any] = {
            "user": caller.username,
            "groups": list(caller.groups),
            "resourceAttributes": attributes,
        }
        if caller.uid:
            spec["uid"] = caller.uid
        if caller.extra:
            spec["extra"] = {k: list(v) for k, v in caller.extra}
        review = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SubjectAccessReview",
            "spec": spec,
        }
        result = await self.api.call(
            "POST",
            f"{AUTHZ}/subjectaccessreviews",
            f"access review of {caller.username}",
            body=review,
        )
        return bool((result.get("status") or {}).get("allowed"))

    async def version(self) -> str:
        """The API server's version (a cheap call: proves it answers)."""
        self.reads += 1
        info = await self.api.call("GET", "/version", "version")
        return str(info.get("gitVersion"))

    async def whoami(self) -> str:
        """The caller's user name, as the API server authenticated it (SelfSubjectReview)."""
        review = await self.api.call(
            "POST",
            f"{AUTHN}/selfsubjectreviews",
            "self subject review",
            body={"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"},
        )
        return str(((review.get("status") or {}).get("userInfo") or {}).get("username") or "")

    async def pod_log(self, namespace: str, pod: str) -> str:
        """A pod's whole log; raises NotFound when the pod or its log is gone."""
        self.reads += 1
        with _no_log():
            return await self._log(namespace, pod)

    async def patch_status(
        self, plural: str, namespace: str, name: str, status: dict[str, Any]
    ) -> None:
        """Merge-patch the status subresource of one of our objects."""
        await self._merge_patch(
            f"{_ours(plural, namespace, name)}/status",
            f"status of {plural} {namespace}/{name}",
            {"status": status},
        )

    async def delete_run(self, namespace: str, name: str) -> None:
        """Delete a WorkflowRun (TTL after finish)."""
        self.writes += 1
        with contextlib.suppress(NotFound):
            await self.api.read(
                "DELETE", _ours(RUNS, namespace, name), f"delete workflowrun {namespace}/{name}"
            )

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
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.writes += 1
        naming = {"name": name} if name else {"generateName": f"{meta['name']}."}
        reference = {
            "apiVersion": involved["apiVersion"],
            "kind": involved["kind"],
            "name": meta["name"],
            "namespace": meta["namespace"],
        }
        if meta.get("uid"):
            reference["uid"] = meta["uid"]
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {**naming, "namespace": meta["namespace"]},
            "involvedObject": reference,
            "reason": reason,
            "message": message[:1024],
            "type": "Warning" if warning else "Normal",
            "source": {"component": "maestro"},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        with contextlib.suppress(Conflict):
            await self.api.read(
                "POST",
                _in(meta["namespace"], CORE, "events"),
                f"event {reason} on {meta['name']}",
                body=body,
            )
