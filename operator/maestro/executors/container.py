"""Container tasks on a cluster: one Kubernetes Job per attempt.

Jobs are named deterministically from run, task and attempt (hashed when too
long or not a DNS-1123 label), so a start repeated after a crash finds the Job
already there (AlreadyExists is success when the Job's labels say it is this
attempt's) and an attempt never runs twice. The engine records when the Job was
created: a Job missing after that vanished (a failed attempt, reason ``Deleted``)
and is never created again under its name. ``backoffLimit: 0``:
the engine owns retries. Outputs are the JSON object the container writes to its
termination message.
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

MAX_NAME = 63
# How long a running Job's state from the watch is trusted before a poll asks the API.
CACHE_TRUST_SECONDS = 30.0
LABEL_RUN = "maestro.dev/run"
LABEL_RUN_ID = "maestro.dev/run-id"
LABEL_TASK = "maestro.dev/task"
LABEL_ATTEMPT = "maestro.dev/attempt"
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


def job_name(run_name: str, task: str, attempt: int) -> str:
    """``<run>-<task>-<attempt>``; a prefix plus a stable hash when that is no DNS-1123 label.

    Run names may be 253 characters and hold dots; a Job name must be a label (it is
    also the pods' ``job-name`` label value and their hostname prefix). Distinct inputs
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


def _condition(job: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind and cond.get("status") == "True":
            return dict(cond)
    return None


def _ended(job: dict[str, Any]) -> bool:
    return _condition(job, "Complete") is not None or _condition(job, "Failed") is not None


def _terminated(pod: dict[str, Any]) -> dict[str, Any] | None:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if status.get("name") == "main":
            state = (status.get("state") or {}).get("terminated")
            return dict(state) if state else None
    return None


class ContainerExecutor:
    """Creates, watches and deletes the Jobs of container tasks."""

    def __init__(self, kube: Kube, wake: Wake) -> None:
        """``wake`` is told about a run when one of its Jobs changes (see :meth:`observe`)."""
        self.kube = kube
        self.wake = wake
        # (namespace, name) -> (Job, monotonic time seen) from the operator's Job watch.
        self._jobs: dict[tuple[str, str], tuple[dict[str, Any], float]] = {}
        # (namespace, job name) -> the "main" container's terminated state, from a pod watch,
        # so reading outputs of a finished Job usually needs no API request.
        self._terminated: dict[tuple[str, str], dict[str, Any]] = {}

    def observe(self, job: dict[str, Any], deleted: bool = False) -> None:
        """Feed a Job from the operator's watch, so polls need no API request.

        Only an ending (or a deletion) wakes the run: the other updates of a Job
        (created, pod active, ready) change nothing the engine decides on.
        """
        meta = job["metadata"]
        key = (meta["namespace"], meta["name"])
        if deleted:
            self._jobs.pop(key, None)
            self._terminated.pop(key, None)
        else:
            self._jobs[key] = (job, time.monotonic())
        run_id = (meta.get("labels") or {}).get(LABEL_RUN_ID)
        if run_id and (deleted or _ended(job)):
            self.wake(run_id)

    def observe_pod(self, pod: dict[str, Any], deleted: bool = False) -> None:
        """Feed a pod of one of our Jobs from the operator's watch."""
        meta = pod["metadata"]
        job = (meta.get("labels") or {}).get("job-name")
        if not job:
            return
        key = (meta["namespace"], job)
        state = _terminated(pod)
        if deleted:
            self._terminated.pop(key, None)
        elif state is not None:
            self._terminated[key] = state

    def handle(self, ctx: AttemptContext) -> str | None:
        """The Job's name."""
        return job_name(ctx.run.name, ctx.task.name, ctx.attempt)

    def manifest(self, ctx: AttemptContext) -> dict[str, Any]:
        """The Job for one attempt."""
        spec = ctx.task.container
        assert spec is not None
        name = job_name(ctx.run.name, ctx.task.name, ctx.attempt)
        labels = {
            "app.kubernetes.io/managed-by": "maestro",
            LABEL_RUN: run_label(ctx.run.name),
            LABEL_RUN_ID: ctx.run.id,
            LABEL_TASK: label_value(ctx.task.name),  # an instance's name has brackets
            LABEL_ATTEMPT: str(ctx.attempt),
        }
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
            "restartPolicy": "Never",
            "containers": [container],
            # The run's identity, never one a task picks (docs/security.md).
            "serviceAccountName": run_service_account(ctx.run.spec),
            "automountServiceAccountToken": spec.automount_service_account_token,
            "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
            **podspec.pod_fields(ctx.run.spec, ctx.task, ctx.run.name),
        }
        job_spec: dict[str, Any] = {
            "backoffLimit": 0,
            "template": {
                "metadata": {
                    "labels": {**(pod_meta.labels if pod_meta else {}), **labels},
                    "annotations": dict(pod_meta.annotations) if pod_meta else {},
                },
                "spec": pod_spec,
            },
        }
        if ctx.task.timeout_seconds is not None:
            job_spec["activeDeadlineSeconds"] = ctx.task.timeout_seconds
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
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {
                "name": name,
                "namespace": ctx.run.namespace,
                "labels": labels,
                "ownerReferences": owner,
            },
            "spec": job_spec,
        }

    async def start(self, ctx: AttemptContext) -> None:
        """Create the Job; one that already exists is this attempt's (idempotent).

        The API refusing it for good (422 Invalid, 403 Forbidden) is
        :class:`StartRejected` with the API's own message; a Job of that name that
        belongs to something else is refused too, never adopted.
        """
        manifest = self.manifest(ctx)
        name = manifest["metadata"]["name"]
        try:
            if await self.kube.create_job(ctx.run.namespace, manifest):
                return
            existing = await self.kube.get_job(ctx.run.namespace, name)
        except NamespaceTerminating:
            raise
        except PermanentAPIError as err:
            reason = "InputError" if err.status in (400, 422) else "Rejected"
            raise StartRejected(f"cannot create job {name}: {err.message}", reason) from None
        labels = (existing.get("metadata") or {}).get("labels") or {}
        ours = manifest["metadata"]["labels"]
        if any(labels.get(k) != ours[k] for k in (LABEL_RUN_ID, LABEL_TASK, LABEL_ATTEMPT)):
            raise StartRejected(
                f"cannot create job {name}: a Job of that name exists and belongs to "
                f"run {labels.get(LABEL_RUN_ID)!r}, task {labels.get(LABEL_TASK)!r}",
                "NameTaken",
            )

    async def poll(self, ctx: AttemptContext) -> Result | None:
        """Read the Job (from the watch cache when possible) and, once it ended, its pod."""
        name = ctx.handle or job_name(ctx.run.name, ctx.task.name, ctx.attempt)
        key = (ctx.run.namespace, name)
        cached = self._jobs.get(key)
        job = cached[0] if cached else None
        fresh = cached is not None and time.monotonic() - cached[1] < CACHE_TRUST_SECONDS
        if job is None or not (_ended(job) or fresh):
            # Unknown to the watch (just created, or the operator restarted), or not heard
            # of for a while: ask the API server, in case a watch event was missed.
            try:
                job = await self.kube.get_job(ctx.run.namespace, name)
            except NotFound:
                # The engine polls only attempts whose Job was created: it vanished.
                if await self.kube.namespace_terminating(ctx.run.namespace):
                    raise NamespaceTerminating(
                        f"job {ctx.run.namespace}/{name}",
                        f"namespace {ctx.run.namespace} is being deleted",
                    ) from None
                return Result.failed(
                    f"job {name} was deleted before it finished; it is not created again "
                    "under its name (a retry, if any, is a new attempt)",
                    "Deleted",
                )
            self._jobs[key] = (job, time.monotonic())
        if _condition(job, "Complete"):
            return await self._succeeded(ctx, name)
        failed = _condition(job, "Failed")
        if failed:
            if await self.kube.namespace_terminating(ctx.run.namespace):
                # Its pods were removed with the namespace: no failure of the task's own.
                raise NamespaceTerminating(
                    f"job {ctx.run.namespace}/{name}",
                    f"namespace {ctx.run.namespace} is being deleted",
                )
            return await self._failed(ctx, name, failed)
        return None

    async def _final_state(self, namespace: str, name: str) -> tuple[dict[str, Any] | None, str]:
        """The container's terminated state and its pod's name ('' when from the cache)."""
        cached = self._terminated.get((namespace, name))
        if cached is not None:
            return cached, ""
        for pod in await self.kube.job_pods(namespace, name):
            state = _terminated(pod)
            if state is not None:
                return state, str(pod["metadata"]["name"])
        return None, ""

    async def _succeeded(self, ctx: AttemptContext, name: str) -> Result:
        state, _ = await self._final_state(ctx.run.namespace, name)
        text = (state or {}).get("message") or ""
        outputs, problem = parse_outputs(text, source="the termination message")
        if problem is not None:
            return Result.failed(problem, "InvalidOutputs")
        # Declared output files add their paths; the container's own values win.
        declared = podspec.declared_outputs(ctx.task)
        return Result.succeeded({**declared, **(outputs or {})}, f"job {name} completed")

    async def _failed(self, ctx: AttemptContext, name: str, cond: dict[str, Any]) -> Result:
        if cond.get("reason") == "DeadlineExceeded":
            return Result.failed(
                f"job {name} exceeded activeDeadlineSeconds={ctx.task.timeout_seconds}",
                "TimedOut",
            )
        state, pod_name = await self._final_state(ctx.run.namespace, name)
        if state is not None:
            detail = (state.get("message") or "").strip()
            if not detail and pod_name:
                detail = (await self.kube.pod_log_tail(ctx.run.namespace, pod_name)).strip()
            detail = " | ".join(detail.splitlines()[-5:])
            why = state.get("reason") or "Error"
            msg = f"exit code {state.get('exitCode')} ({why})"
            return Result.failed(f"{msg}: {detail}" if detail else msg)
        return Result.failed(
            f"job {name} failed: {cond.get('reason') or ''} {cond.get('message') or ''}".strip()
        )

    async def stop(self, ctx: AttemptContext) -> None:
        """Delete the Job (and its pods)."""
        name = ctx.handle or job_name(ctx.run.name, ctx.task.name, ctx.attempt)
        await self.kube.delete_job(ctx.run.namespace, name)
        self._jobs.pop((ctx.run.namespace, name), None)
