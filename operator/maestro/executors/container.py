"""Container tasks on a cluster: one pod per attempt, created by the operator.

No Job in between (as Argo and Tekton): a Job's status follows its pod at most once
per second, a floor of about a second on every dependency edge, and costs the Job
controller requests of its own. Pods are named deterministically from run, task and
attempt (hashed when too long or not a DNS-1123 label), so a start repeated after a
crash finds the pod already there (AlreadyExists is success when the pod's labels say
it is this attempt's) and an attempt never runs twice. The engine records when the pod
was created: a pod missing after that vanished (a failed attempt, reason ``Deleted``)
and is never created again under its name. ``restartPolicy: Never``: the engine owns
retries. The WorkflowRun owns its pods, so they go with it. Outputs are the JSON object
the container writes to its termination message.
"""

from __future__ import annotations

import hashlib
import re
import time
from typing import Any

from maestro.dag.fanout import label_value
from maestro.engine.executor import AttemptContext, Result, StartRejected, Wake
from maestro.executors import podspec
from maestro.executors.environment import OUTPUTS_IN_POD, parse_outputs, task_env
from maestro.executors.secrets import run_service_account
from maestro.k8s.client import Kube, NamespaceTerminating, NotFound, PermanentAPIError
from maestro.store.leases import bucket_of

MAX_NAME = 63
# How long a running pod's state from the watch is trusted before a poll asks the API.
CACHE_TRUST_SECONDS = 30.0
LABEL_RUN = "maestro.dev/run"
LABEL_RUN_ID = "maestro.dev/run-id"
LABEL_TASK = "maestro.dev/task"
LABEL_ATTEMPT = "maestro.dev/attempt"
LABEL_BUCKET = "maestro.dev/bucket"
# Secure by default; a task's own securityContext is merged over it and the namespace's
# Pod Security admission is what finally decides (docs/security.md).
CONTAINER_SECURITY: dict[str, Any] = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


DIGEST = 10
_NOT_IN_LABEL = re.compile(r"[^a-z0-9-]")


def _hashed(full: str, keep: str) -> str:
    """A readable prefix of ``full`` and a hash of all of it, at most MAX_NAME long.

    The prefix is cut before the hash and never ends in a character (``-``, ``.``) that
    may not precede the separator: the result is always a valid name or label value.
    """
    digest = hashlib.sha256(full.encode()).hexdigest()[:DIGEST]
    prefix = re.sub(keep, "-", full[: MAX_NAME - DIGEST - 1]).rstrip("-._")
    return f"{prefix}-{digest}" if prefix else digest


def pod_name(run_name: str, task: str, attempt: int) -> str:
    """``<run>-<task>-<attempt>``; a prefix plus a stable hash when that is no DNS-1123 label.

    Run names may be 253 characters and hold dots; the pod name is kept a label, as it
    is also the pod's hostname. Distinct inputs
    give distinct names: a readable name is the input itself, a hashed one ends in a
    hash of the whole input.
    """
    full = f"{run_name}-{task}-{attempt}"
    if len(full) <= MAX_NAME and not _NOT_IN_LABEL.search(full):
        return full
    return _hashed(full, r"[^a-z0-9-]")


def run_label(run_name: str) -> str:
    """The ``maestro.dev/run`` label value of a run: its name, hashed past 63 characters."""
    if len(run_name) <= MAX_NAME:
        return run_name  # an object name is a valid label value up to this length
    return _hashed(run_name, r"[^a-z0-9.-]")


def _terminated(pod: dict[str, Any]) -> dict[str, Any] | None:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if status.get("name") == "main":
            state = (status.get("state") or {}).get("terminated")
            return dict(state) if state else None
    return None


def _phase(pod: dict[str, Any]) -> str:
    return str((pod.get("status") or {}).get("phase") or "")


def _ended(pod: dict[str, Any]) -> bool:
    return _phase(pod) in ("Succeeded", "Failed")


def _vanishing(pod: dict[str, Any]) -> bool:
    """Deleted before it ended: it can never succeed any more."""
    return not _ended(pod) and bool((pod.get("metadata") or {}).get("deletionTimestamp"))


class ContainerExecutor:
    """Creates, watches and deletes the pods of container tasks."""

    def __init__(self, kube: Kube, wake: Wake) -> None:
        """``wake`` is told about a run when one of its pods ends (see :meth:`observe`)."""
        self.kube = kube
        self.wake = wake
        # (namespace, name) -> (pod, monotonic time seen) from the operator's pod watch.
        self._pods: dict[tuple[str, str], tuple[dict[str, Any], float]] = {}
        self._swept = time.monotonic()

    def observe(self, pod: dict[str, Any], deleted: bool = False) -> None:
        """Feed a task pod from the operator's watch, so polls need no API request.

        Only an ending or a deletion wakes the run: the other updates of a pod
        (scheduled, running, ready) change nothing the engine decides on.
        """
        meta = pod["metadata"]
        # Held until the pod ends; who wrote which field is never read from a pod.
        meta.pop("managedFields", None)
        key = (meta["namespace"], meta["name"])
        now = time.monotonic()
        if deleted:
            self._pods.pop(key, None)
        else:
            self._pods[key] = (pod, now)
        if now - self._swept > CACHE_TRUST_SECONDS:
            # Pods no attempt polls (those of finished runs, listed at start) would stay
            # forever; a polled pod whose copy is dropped costs one GET.
            self._swept = now
            old = now - 2 * CACHE_TRUST_SECONDS
            self._pods = {k: v for k, v in self._pods.items() if v[1] >= old}
        run_id = (meta.get("labels") or {}).get(LABEL_RUN_ID)
        if run_id and (deleted or _ended(pod) or _vanishing(pod)):
            self.wake(run_id)

    def handle(self, ctx: AttemptContext) -> str | None:
        """The pod's name."""
        return pod_name(ctx.run.name, ctx.task.name, ctx.attempt)

    def manifest(self, ctx: AttemptContext) -> dict[str, Any]:
        """The pod for one attempt, owned by its WorkflowRun (deleted with it)."""
        spec = ctx.task.container
        assert spec is not None
        name = pod_name(ctx.run.name, ctx.task.name, ctx.attempt)
        labels = {
            "app.kubernetes.io/managed-by": "maestro",
            LABEL_RUN: run_label(ctx.run.name),
            LABEL_RUN_ID: ctx.run.id,
            LABEL_TASK: label_value(ctx.task.name),  # an instance's name has brackets
            LABEL_ATTEMPT: str(ctx.attempt),
        }
        if ctx.run.uid is not None:
            # The replica holding this bucket watches the pod (a label selector).
            labels[LABEL_BUCKET] = str(bucket_of(ctx.run.uid))
        env: list[dict[str, Any]] = [
            {"name": k, "value": v} for k, v in task_env(ctx, OUTPUTS_IN_POD).items()
        ]
        for var in spec.env:
            if var.value is not None:
                env.append({"name": var.name, "value": var.value})
            elif var.value_from is not None:
                ref = var.value_from.secret_key_ref
                env.append(
                    {
                        "name": var.name,
                        "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}},
                    }
                )
        container: dict[str, Any] = {
            "name": "main",
            "image": spec.image,
            "env": env,
            # On failure the log tail becomes the message: a useful error for free.
            "terminationMessagePolicy": "FallbackToLogsOnError",
        }
        if spec.command is not None:
            container["command"] = spec.command
        if spec.args is not None:
            container["args"] = spec.args
        if spec.working_dir:
            container["workingDir"] = spec.working_dir
        if spec.resources is not None:
            container["resources"] = spec.resources.model_dump(exclude_defaults=True)
        container["securityContext"] = {**CONTAINER_SECURITY, **(spec.security_context or {})}
        container.update(podspec.container_fields(ctx.task))
        pod_meta = spec.pod_metadata
        pod_spec: dict[str, Any] = {
            # The engine owns retries: a failed container is a failed attempt.
            "restartPolicy": "Never",
            "containers": [container],
            # The run's identity, never one a task picks (docs/security.md).
            "serviceAccountName": run_service_account(ctx.run.spec),
            "automountServiceAccountToken": spec.automount_service_account_token,
            "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
            **podspec.pod_fields(ctx.run.spec, ctx.task, ctx.run.name),
        }
        if ctx.task.timeout_seconds is not None:
            # The kubelet ends the pod at the deadline even while the operator is down;
            # the engine's own timer stops it too (a kubelet that ignores it, kwok).
            pod_spec["activeDeadlineSeconds"] = ctx.task.timeout_seconds
        owner = []
        if ctx.run.uid:
            owner.append(
                {
                    "apiVersion": "maestro.dev/v1alpha1",
                    "kind": "WorkflowRun",
                    "name": ctx.run.name,
                    "uid": ctx.run.uid,
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            )
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": ctx.run.namespace,
                "labels": {**(pod_meta.labels if pod_meta else {}), **labels},
                "annotations": dict(pod_meta.annotations) if pod_meta else {},
                "ownerReferences": owner,
            },
            "spec": pod_spec,
        }

    async def start(self, ctx: AttemptContext) -> None:
        """Create the pod; one that already exists is this attempt's (idempotent).

        The API refusing it for good (422 Invalid, 403 Forbidden) is
        :class:`StartRejected` with the API's own message; a pod of that name that
        belongs to something else is refused too, never adopted.
        """
        manifest = self.manifest(ctx)
        name = manifest["metadata"]["name"]
        try:
            if await self.kube.create_pod(ctx.run.namespace, manifest):
                return
            existing = await self.kube.get_pod(ctx.run.namespace, name)
        except NamespaceTerminating:
            raise
        except PermanentAPIError as err:
            reason = "InputError" if err.status in (400, 422) else "Rejected"
            raise StartRejected(f"cannot create pod {name}: {err.message}", reason) from None
        labels = (existing.get("metadata") or {}).get("labels") or {}
        ours = manifest["metadata"]["labels"]
        if any(labels.get(k) != ours[k] for k in (LABEL_RUN_ID, LABEL_TASK, LABEL_ATTEMPT)):
            raise StartRejected(
                f"cannot create pod {name}: a pod of that name exists and belongs to "
                f"run {labels.get(LABEL_RUN_ID)!r}, task {labels.get(LABEL_TASK)!r}",
                "NameTaken",
            )

    async def poll(self, ctx: AttemptContext) -> Result | None:
        """Read the pod (from the watch cache when possible); its result once it ended."""
        name = ctx.handle or pod_name(ctx.run.name, ctx.task.name, ctx.attempt)
        namespace = ctx.run.namespace
        key = (namespace, name)
        cached = self._pods.get(key)
        pod = cached[0] if cached else None
        fresh = cached is not None and time.monotonic() - cached[1] < CACHE_TRUST_SECONDS
        if pod is None or not (_ended(pod) or fresh):
            # Unknown to the watch (just created, or the operator restarted), or not heard
            # of for a while: ask the API server, in case a watch event was missed.
            try:
                pod = await self.kube.get_pod(namespace, name)
            except NotFound:
                # The engine polls only attempts whose pod was created: it vanished.
                return await self._vanished(namespace, name)
            self._pods[key] = (pod, time.monotonic())
        phase = _phase(pod)
        if phase == "Succeeded":
            result = self._succeeded(ctx, pod)
        elif phase == "Failed":
            if await self.kube.namespace_terminating(namespace):
                # Killed with its namespace: no failure of the task's own.
                raise _namespace_gone(namespace, name)
            result = await self._failed(ctx, pod)
        elif _vanishing(pod):
            return await self._vanished(namespace, name)
        else:
            return None
        self._pods.pop(key, None)  # ended: never polled again
        return result

    async def _vanished(self, namespace: str, name: str) -> Result:
        if await self.kube.namespace_terminating(namespace):
            raise _namespace_gone(namespace, name)
        self._pods.pop((namespace, name), None)
        return Result.failed(
            f"pod {name} was deleted before it finished; it is not created again "
            "under its name (a retry, if any, is a new attempt)",
            "Deleted",
        )

    def _succeeded(self, ctx: AttemptContext, pod: dict[str, Any]) -> Result:
        name = pod["metadata"]["name"]
        text = (_terminated(pod) or {}).get("message") or ""
        outputs, problem = parse_outputs(text, source="the termination message")
        if problem is not None:
            return Result.failed(problem, "InvalidOutputs")
        # Declared output files add their paths; the container's own values win.
        declared = podspec.declared_outputs(ctx.task)
        return Result.succeeded({**declared, **(outputs or {})}, f"pod {name} succeeded")

    async def _failed(self, ctx: AttemptContext, pod: dict[str, Any]) -> Result:
        name = pod["metadata"]["name"]
        status = pod.get("status") or {}
        why = str(status.get("reason") or "")
        if why == "DeadlineExceeded":
            return Result.failed(
                f"pod {name} exceeded activeDeadlineSeconds={ctx.task.timeout_seconds}",
                "TimedOut",
            )
        state = _terminated(pod)
        if state is None or why == "Evicted":
            # Ended by the node (eviction, a lost node), not by its own container.
            detail = str(status.get("message") or "").strip()
            text = f"pod {name} failed: {why or 'no container ran'}"
            return Result.failed(f"{text}: {detail}" if detail else text, why or "Error")
        detail = (state.get("message") or "").strip()
        if not detail:
            detail = (await self.kube.pod_log_tail(ctx.run.namespace, name)).strip()
        detail = " | ".join(detail.splitlines()[-5:])
        msg = f"exit code {state.get('exitCode')} ({state.get('reason') or 'Error'})"
        return Result.failed(f"{msg}: {detail}" if detail else msg)

    async def stop(self, ctx: AttemptContext) -> None:
        """Delete the pod."""
        name = ctx.handle or pod_name(ctx.run.name, ctx.task.name, ctx.attempt)
        await self.kube.delete_pod(ctx.run.namespace, name)
        self._pods.pop((ctx.run.namespace, name), None)


def _namespace_gone(namespace: str, name: str) -> NamespaceTerminating:
    return NamespaceTerminating(
        f"pod {namespace}/{name}", f"namespace {namespace} is being deleted"
    )
