"""Pydantic models of the ``Workflow`` and ``WorkflowRun`` resources.

These models are the one source of truth: the CRDs in ``crds/`` are generated from
them (see :mod:`maestro.api.crd`), the CLI validates files with them and the
operator parses cluster objects with them. Field names are camelCase on the wire.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from maestro.api.phases import RunPhase, TaskPhase

GROUP = "maestro.dev"
VERSION = "v1alpha1"
API_VERSION: Literal["maestro.dev/v1alpha1"] = "maestro.dev/v1alpha1"

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
PARAM_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
ENV_NAME = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"

NO_NUL = r"^[^\x00]*$"
TaskName = Annotated[str, StringConstraints(pattern=DNS_LABEL, min_length=1, max_length=63)]
ParamName = Annotated[str, StringConstraints(pattern=PARAM_NAME, min_length=1, max_length=128)]
ResourceName = Annotated[str, StringConstraints(min_length=1, max_length=253)]
# Bounds the CRD's CEL cost estimate; also far beyond what one etcd object can hold.
MAX_TASKS = 5000
# A `when` is a one-line condition; the cap also bounds how much work one can describe.
MAX_WHEN_LENGTH = 1024
SERVICE_ACCOUNT_DOC = (
    "ServiceAccount of the run's namespace the run acts as: its pods run as it and the "
    "operator reads Secrets for it only if it may (SubjectAccessReview)."
)
# Kubernetes quantities arrive from YAML as numbers or strings ("500m", 1, "2Gi").
Quantity = int | str


class Model(BaseModel):
    """Base for every wire model: camelCase aliases, unknown fields are errors."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
    )


class ObjectMeta(BaseModel):
    """The parts of Kubernetes object metadata Maestro reads; the rest passes through."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, alias_generator=to_camel)

    name: str | None = None
    generate_name: str | None = None
    namespace: str | None = None
    uid: str | None = None
    generation: int | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


# --- Workflow spec -------------------------------------------------------------------


class Param(Model):
    """A declared input of a workflow."""

    name: ParamName
    default: str | None = Field(None, description="Value used when the run does not set it.")
    description: str | None = None


class RetryPolicy(Model):
    """How often and how fast a failed task is tried again (exponential backoff)."""

    limit: int = Field(0, ge=0, le=100, description="Retries after the first attempt.")
    backoff_seconds: float = Field(10.0, ge=0, description="Delay before the first retry.")
    factor: float = Field(2.0, ge=1, description="Multiplier applied to each further delay.")
    max_backoff_seconds: float = Field(3600.0, ge=0, description="Upper bound of the delay.")

    def delay(self, failed_attempt: int) -> float:
        """Seconds to wait after attempt number ``failed_attempt`` (1-based) failed."""
        raw = self.backoff_seconds * self.factor ** (failed_attempt - 1)
        return min(raw, self.max_backoff_seconds)


class SecretKeyRef(Model):
    """A key of a Secret in the run's namespace."""

    name: ResourceName
    key: Annotated[str, StringConstraints(min_length=1, max_length=253)]


class ValueFrom(Model):
    """Where a value comes from when it is not written inline."""

    secret_key_ref: SecretKeyRef


class _ValueOrSecret(Model):
    """A value written inline (templates allowed) or read from a Secret."""

    value: str | None = None
    value_from: ValueFrom | None = None

    @model_validator(mode="after")
    def _one_source(self) -> _ValueOrSecret:
        if (self.value is None) == (self.value_from is None):
            raise ValueError("exactly one of value and valueFrom must be set")
        return self


class EnvVar(_ValueOrSecret):
    """An environment variable of a container task."""

    name: Annotated[str, StringConstraints(pattern=ENV_NAME, min_length=1)]


class Resources(Model):
    """Compute requests and limits, as in a Kubernetes container."""

    requests: dict[str, Quantity] = Field(default_factory=dict)
    limits: dict[str, Quantity] = Field(default_factory=dict)


# Pod labels Maestro sets, or that mark a Job's pods to Kubernetes and its tools (see
# maestro.dag.validate, which checks the same at `maestro validate` and when a run starts).
_RESERVED_LABELS_RULE = (
    "!has(self.labels) || self.labels.all(k, !(k == 'job-name' || k == 'controller-uid'"
    " || k == 'app.kubernetes.io/managed-by' || k.startsWith('maestro.dev/')"
    " || k.startsWith('batch.kubernetes.io/') || k.startsWith('controller.kubernetes.io/')))"
)
MAX_POD_LABELS = 64


class PodMetadata(Model):
    """Labels and annotations added to the pods a container task creates."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": _RESERVED_LABELS_RULE,
                    "message": "labels: job-name, controller-uid, app.kubernetes.io/managed-by "
                    "and the maestro.dev/, batch.kubernetes.io/ and controller.kubernetes.io/ "
                    "prefixes are reserved",
                }
            ]
        }
    )

    labels: dict[str, str] = Field(default_factory=dict, max_length=MAX_POD_LABELS)
    annotations: dict[str, str] = Field(default_factory=dict)


# --- Volumes and pod placement ---------------------------------------------------------

VolumeName = Annotated[str, StringConstraints(pattern=DNS_LABEL, min_length=1, max_length=63)]
# Bounds the CRD's CEL cost estimate (mount names are checked against volume names).
MAX_VOLUMES = 32
# A relative path none of whose segments is "..": a pattern (RE2 has no lookahead) rather
# than CEL, whose cost estimate over 5000 tasks x 32 mounts the API server refuses.
_SEGMENT = r"[^/.][^/]*|\.([^/.][^/]*)?|\.\.[^/]+"
SUB_PATH = rf"^({_SEGMENT})(/({_SEGMENT})?)*$"


class KeyToPath(Model):
    """One key of a ConfigMap or Secret projected to a file."""

    key: Annotated[str, StringConstraints(min_length=1, max_length=253)]
    path: Annotated[str, StringConstraints(min_length=1, max_length=1024)]
    mode: int | None = Field(None, ge=0, le=0o777)


class PersistentVolumeClaimSource(Model):
    """An existing PersistentVolumeClaim of the run's namespace."""

    claim_name: ResourceName
    read_only: bool = False


class ConfigMapSource(Model):
    """A ConfigMap of the run's namespace, one file per key (or per listed item)."""

    name: ResourceName
    items: list[KeyToPath] = Field(default_factory=list, max_length=256)
    default_mode: int | None = Field(None, ge=0, le=0o777)
    optional: bool = False


class SecretSource(Model):
    """A Secret of the run's namespace, mounted by the pod itself (docs/security.md)."""

    secret_name: ResourceName
    items: list[KeyToPath] = Field(default_factory=list, max_length=256)
    default_mode: int | None = Field(None, ge=0, le=0o777)
    optional: bool = False


class EmptyDirSource(Model):
    """A scratch directory that lives as long as the task's pod."""

    medium: Literal["", "Memory"] = ""
    size_limit: Quantity | None = None


_ONE_VOLUME_SOURCE = (
    "exactly one of persistentVolumeClaim, configMap, secret and emptyDir must be set"
)


class Volume(Model):
    """A volume task pods may mount (by name, in ``container.volumeMounts``)."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "(has(self.persistentVolumeClaim) ? 1 : 0)"
                    " + (has(self.configMap) ? 1 : 0) + (has(self.secret) ? 1 : 0)"
                    " + (has(self.emptyDir) ? 1 : 0) == 1",
                    "message": _ONE_VOLUME_SOURCE,
                }
            ]
        }
    )

    name: VolumeName
    persistent_volume_claim: PersistentVolumeClaimSource | None = None
    config_map: ConfigMapSource | None = None
    secret: SecretSource | None = None
    empty_dir: EmptyDirSource | None = None

    @model_validator(mode="after")
    def _one_source(self) -> Volume:
        sources = (self.persistent_volume_claim, self.config_map, self.secret, self.empty_dir)
        if sum(x is not None for x in sources) != 1:
            raise ValueError(_ONE_VOLUME_SOURCE)
        return self


class VolumeMount(Model):
    """Where a task's container sees one of the workflow's volumes."""

    name: VolumeName = Field(description="A volume (or workspace) of the workflow.")
    mount_path: Annotated[str, StringConstraints(pattern=r"^/", min_length=1, max_length=1024)] = (
        Field(description="Absolute path in the container.")
    )
    read_only: bool = False
    sub_path: Annotated[str, StringConstraints(pattern=SUB_PATH, max_length=1024)] | None = Field(
        None, description="Mount only this path of the volume (relative, no '..')."
    )


class Toleration(Model):
    """Lets a task's pod run on nodes with a matching taint (as in a Kubernetes pod)."""

    key: str | None = Field(None, max_length=317)
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = Field(None, max_length=63)
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


class Affinity(Model):
    """Pod affinity rules, passed to the pod as written (Kubernetes checks their shape)."""

    node_affinity: dict[str, Any] | None = None
    pod_affinity: dict[str, Any] | None = None
    pod_anti_affinity: dict[str, Any] | None = None


class LocalObjectReference(Model):
    """An object of the run's namespace, by name."""

    name: ResourceName


AccessMode = Literal["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"]
MAX_WORKSPACES = 16


class ClaimResources(Model):
    """Storage the claim asks for."""

    requests: dict[str, Quantity] = Field(description="e.g. {storage: 1Gi}")


class ClaimSpec(Model):
    """The PersistentVolumeClaim spec of a workspace (a subset of Kubernetes')."""

    access_modes: list[AccessMode] = Field(min_length=1, max_length=4)
    resources: ClaimResources
    storage_class_name: str | None = Field(
        None, max_length=253, description='"" asks for no class (pre-provisioned volumes).'
    )
    volume_mode: Literal["Filesystem", "Block"] | None = None
    volume_name: ResourceName | None = Field(
        None, description="Bind to this PersistentVolume (pre-provisioned storage)."
    )


class ClaimTemplate(Model):
    """What each run's claim for a workspace looks like."""

    metadata: PodMetadata | None = None
    spec: ClaimSpec


class Workspace(Model):
    """Storage shared by the tasks of one run: a PVC made for the run when it starts."""

    name: VolumeName
    volume_claim_template: ClaimTemplate
    reclaim_policy: Literal["Delete", "Retain"] = Field(
        "Delete",
        description="Delete: the claim is owned by the WorkflowRun and goes with it. "
        "Retain: the claim stays after the run is deleted.",
    )


class OutputFile(Model):
    """An output too large for the termination message: a file the task writes to a
    workspace. The task's outputs get ``name: path`` (the path, not the content)."""

    name: ParamName
    workspace: VolumeName
    path: Annotated[str, StringConstraints(pattern=SUB_PATH, max_length=1024)] = Field(
        description="Relative to the workspace's root."
    )


class PodTemplate(Model):
    """Where task pods run and how they pull images.

    Set on the workflow for every container task; a task's own ``podTemplate`` replaces
    the workflow's field by field (a field the task sets, even to an empty list, wins
    whole; fields it leaves out are inherited).
    """

    node_selector: dict[str, str] | None = None
    tolerations: list[Toleration] | None = Field(None, max_length=64)
    affinity: Affinity | None = None
    priority_class_name: ResourceName | None = None
    image_pull_secrets: list[LocalObjectReference] | None = Field(None, max_length=64)
    runtime_class_name: ResourceName | None = None


class ContainerTask(Model):
    """Run an image as a Kubernetes pod (one pod per attempt, created by the operator).

    Outputs: the container writes a JSON object to its termination message
    (``/dev/termination-log``); it becomes the task's outputs.
    """

    image: Annotated[str, StringConstraints(min_length=1)]
    command: list[str] | None = None
    args: list[str] | None = None
    env: list[EnvVar] = Field(default_factory=list)
    working_dir: str | None = None
    resources: Resources | None = None
    # No serviceAccountName here: every pod of a run runs as the run's ServiceAccount
    # (WorkflowRun/Workflow ``spec.serviceAccountName``), so one admission policy on
    # runs and workflows decides what a run may act as (docs/security.md).
    pod_metadata: PodMetadata | None = None
    security_context: dict[str, Any] | None = Field(
        None,
        description="Container securityContext, merged over Maestro's restrictive default; "
        "the namespace's Pod Security admission decides what is allowed.",
    )
    automount_service_account_token: bool = Field(
        False, description="Mount the run's ServiceAccount token (only if the task calls the API)."
    )
    volume_mounts: list[VolumeMount] = Field(
        default_factory=list,
        max_length=MAX_VOLUMES,
        description="Volumes of the workflow (spec.volumes) this task's container mounts.",
    )
    pod_template: PodTemplate | None = Field(
        None, description="Overrides the workflow's podTemplate, field by field."
    )
    output_files: list[OutputFile] = Field(
        default_factory=list,
        max_length=64,
        description="Outputs written as files to a workspace the task mounts; each adds "
        "name: path to the outputs.",
    )


HttpMethod = Literal["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"]


class HttpHeader(_ValueOrSecret):
    """A request header."""

    name: Annotated[str, StringConstraints(min_length=1, max_length=256)]


class HttpTask(Model):
    """Call an HTTP endpoint from the operator; a JSON response body becomes the outputs."""

    url: Annotated[str, StringConstraints(min_length=1)]
    method: HttpMethod = "GET"
    headers: list[HttpHeader] = Field(default_factory=list)
    body: str | None = Field(None, description="Request body; templates are expanded.")
    expected_status: list[Annotated[int, Field(ge=100, le=599)]] = Field(
        default_factory=list, description="Accepted status codes; empty means any 2xx."
    )


class ApprovalTask(Model):
    """A gate that opens when the run's ``spec.approvals`` names the task."""

    message: str | None = Field(None, description="What the approver is asked.")


class WorkflowCall(Model):
    """Run another Workflow of the same namespace as a child run, and wait for it.

    The task's outputs are the child's declared ``outputs``. The child is owned by the
    parent run: cancelling or deleting the parent cancels or deletes it.
    """

    name: ResourceName = Field(description="A Workflow in the run's namespace.")
    params: dict[str, str] = Field(
        default_factory=dict, description="Params of the child run; templates are expanded."
    )


# How deep workflows may call workflows (a run of depth 0 starts children of depth 1).
MAX_CALL_DEPTH = 4

_ONE_EXECUTOR = "exactly one of container, http, approval and workflow must be set"

# Instances of one fan-out: each is a task attempt record, a status entry and a pod.
MAX_INSTANCES = 1024
# Instance names add "[<index>]" (at most 6 characters) to the task's name; the store
# and the events keep task names of at most 63 characters.
MAX_FANOUT_NAME = 57
_ONE_SOURCE = "exactly one of items and from must be set"
_ONE_LIST = "exactly one of items, from and matrix must be set"


class MatrixAxis(Model):
    """One list of a matrix: its values are read as ``{{ item.<name> }}``."""

    # No CEL rule for "exactly one source": the API server's CEL cannot see a field
    # whose items are free-form JSON (items), so the model's validator says it, in
    # `maestro validate` and when a run starts.

    name: ParamName
    items: list[Any] | None = Field(
        None,
        max_length=MAX_INSTANCES,
        description="The values, written inline (any JSON).",
    )
    from_: str | None = Field(
        None,
        alias="from",
        validation_alias=AliasChoices("from", "from_"),
        max_length=256,
        description="One template, {{ params.P }} or {{ tasks.T.outputs.K }}, holding a "
        "JSON list; read when the task becomes ready.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> MatrixAxis:
        if (self.items is None) == (self.from_ is None):
            raise ValueError(_ONE_SOURCE)
        return self


DURATION = r"^([0-9]+(s|m|h|d))+$"
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration_seconds(text: str) -> int:
    """Seconds of a duration such as ``90s``, ``1h30m`` or ``7d``."""
    return sum(int(n) * _DURATION_UNITS[u] for n, u in re.findall(r"([0-9]+)([smhd])", text))


class CachePolicy(Model):
    """Reuse the outputs of an earlier Succeeded attempt with the same rendered key.

    Scoped to the run's namespace; the newest matching attempt within ``maxAge`` wins.
    The key should say everything the outputs depend on (inputs, image, version).
    """

    key: Annotated[str, StringConstraints(min_length=1, max_length=1024)] = Field(
        description="Template, e.g. 'build-{{ params.commit }}'; {{ item }} in a fan-out."
    )
    max_age: Annotated[str, StringConstraints(pattern=DURATION, max_length=32)] = Field(
        description="How old a reused attempt may be: 30m, 12h, 7d, 1h30m."
    )


class ForEach(Model):
    """Run the task once per item of a list, or per combination of a matrix's lists.

    Each instance (``task[0]``, ``task[1]``, ...) has its own attempts, retries and
    status; dependents wait for all of them and read each output key as a list in item
    order. At most :data:`MAX_INSTANCES` instances.
    """

    # Exactly one list source is the validator's to say (see MatrixAxis).

    items: list[Any] | None = Field(
        None,
        max_length=MAX_INSTANCES,
        description="The items, written inline (any JSON); {{ item }} in the task.",
    )
    from_: str | None = Field(
        None,
        alias="from",
        validation_alias=AliasChoices("from", "from_"),
        max_length=256,
        description="One template, {{ params.P }} or {{ tasks.T.outputs.K }}, holding a "
        "JSON list; read when the task becomes ready.",
    )
    matrix: list[MatrixAxis] | None = Field(
        None,
        min_length=1,
        max_length=8,
        description="The cartesian product of these lists; {{ item.<name> }} in the task.",
    )
    concurrency: int | None = Field(
        None, ge=1, description="Max instances of this task running at once."
    )

    @model_validator(mode="after")
    def _one_list(self) -> ForEach:
        if sum(x is not None for x in (self.items, self.from_, self.matrix)) != 1:
            raise ValueError(_ONE_LIST)
        return self


class Task(Model):
    """One node of the DAG."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    # Ternaries, not a filtered list: the API server's CEL cost
                    # estimator rejects the list form for lists of thousands of tasks.
                    "rule": "(has(self.container) ? 1 : 0) + (has(self.http) ? 1 : 0)"
                    " + (has(self.approval) ? 1 : 0) + (has(self.workflow) ? 1 : 0) == 1",
                    "message": _ONE_EXECUTOR,
                },
                {
                    "rule": f"!has(self.forEach) || self.name.size() <= {MAX_FANOUT_NAME}",
                    "message": f"name: at most {MAX_FANOUT_NAME} characters with forEach "
                    "(instance names add [index])",
                },
                {
                    "rule": "!has(self.forEach) || !has(self.approval)",
                    "message": "an approval task cannot have forEach",
                },
                {
                    "rule": "!has(self.cache) || !has(self.approval)",
                    "message": "an approval task cannot be cached",
                },
            ]
        }
    )

    name: TaskName
    depends_on: list[TaskName] = Field(default_factory=list)
    when: str | None = Field(
        None,
        max_length=MAX_WHEN_LENGTH,
        description="Expression over params and upstream tasks; false skips the task.",
    )
    retries: RetryPolicy | None = None
    timeout_seconds: int | None = Field(None, ge=1, description="Per attempt.")
    container: ContainerTask | None = None
    http: HttpTask | None = None
    approval: ApprovalTask | None = None
    workflow: WorkflowCall | None = None
    for_each: ForEach | None = Field(
        None, description="Fan out: one instance of the task per item (or matrix combination)."
    )
    cache: CachePolicy | None = Field(
        None, description="Reuse the outputs of an earlier attempt with the same key."
    )

    @model_validator(mode="after")
    def _one_executor(self) -> Task:
        executors = (self.container, self.http, self.approval, self.workflow)
        if sum(x is not None for x in executors) != 1:
            raise ValueError(_ONE_EXECUTOR)
        if self.for_each is not None and self.approval is not None:
            raise ValueError("an approval task cannot have forEach")
        if self.cache is not None and self.approval is not None:
            raise ValueError("an approval task cannot be cached")
        if self.for_each is not None and len(self.name) > MAX_FANOUT_NAME:
            raise ValueError(
                f"name: at most {MAX_FANOUT_NAME} characters with forEach "
                "(instance names add [index])"
            )
        return self

    @property
    def kind(self) -> Literal["container", "http", "approval", "workflow"]:
        """Which executor runs this task."""
        if self.container is not None:
            return "container"
        if self.http is not None:
            return "http"
        if self.workflow is not None:
            return "workflow"
        return "approval"


_NAME_CLASH = "a workspace and a volume cannot share a name (volumeMounts name either)"


class WorkflowOutput(Model):
    """A result of the whole workflow, computed from its tasks' outputs when it succeeds."""

    name: ParamName
    value: Annotated[str, StringConstraints(min_length=1, max_length=1024)] = Field(
        description="Template, e.g. '{{ tasks.build.outputs.image }}'; a value that is one "
        "template keeps its JSON type (a fan-out's list stays a list)."
    )
    description: str | None = None


class WorkflowSpec(Model):
    """A reusable DAG template."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!has(self.workspaces) || !has(self.volumes) || "
                    "self.workspaces.all(w, !self.volumes.exists(v, v.name == w.name))",
                    "message": _NAME_CLASH,
                }
            ]
        }
    )

    params: list[Param] = Field(default_factory=list)
    tasks: list[Task] = Field(min_length=1, max_length=MAX_TASKS)
    finally_: list[Task] = Field(
        default_factory=list,
        max_length=MAX_TASKS,
        alias="finally",
        validation_alias=AliasChoices("finally", "finally_"),
        description="Tasks run after the DAG ends, whatever its outcome.",
    )
    concurrency: int | None = Field(None, ge=1, description="Max tasks running at once per run.")
    fail_fast: bool = Field(
        True, description="On a failure stop scheduling new tasks (true) or go on (false)."
    )
    timeout_seconds: int | None = Field(None, ge=1, description="Whole run.")
    service_account_name: ResourceName | None = Field(
        None, description=SERVICE_ACCOUNT_DOC + " A run's own setting wins."
    )
    volumes: list[Volume] = Field(
        default_factory=list,
        max_length=MAX_VOLUMES,
        description="Volumes container tasks may mount by name (container.volumeMounts).",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    workspaces: list[Workspace] = Field(
        default_factory=list,
        max_length=MAX_WORKSPACES,
        description="Run-scoped claims tasks mount by name (container.volumeMounts).",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    pod_template: PodTemplate | None = Field(
        None, description="Placement and image pulling of every container task's pod."
    )
    outputs: list[WorkflowOutput] = Field(
        default_factory=list,
        max_length=64,
        description="Results of the run, from its tasks' outputs, set when it succeeds.",
    )

    def all_tasks(self) -> list[Task]:
        """Main tasks followed by finally tasks."""
        return [*self.tasks, *self.finally_]


class Condition(Model):
    """A Kubernetes-style condition (kstatus compatible)."""

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str | None = None
    message: str | None = None
    last_transition_time: datetime | None = None
    observed_generation: int | None = None


class WorkflowStatus(Model):
    """What the operator reports about a Workflow."""

    conditions: list[Condition] = Field(default_factory=list)
    observed_generation: int | None = None
    task_count: int | None = None


class Workflow(Model):
    """The ``Workflow`` resource."""

    model_config = ConfigDict(title="Workflow")

    api_version: Literal["maestro.dev/v1alpha1"] = API_VERSION
    kind: Literal["Workflow"] = "Workflow"
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: WorkflowSpec
    status: WorkflowStatus | None = None


# --- WorkflowRun ---------------------------------------------------------------------


class WorkflowRef(Model):
    """A Workflow in the run's namespace."""

    name: ResourceName


class ApprovalNote(Model):
    """Who approved a gate and why, when the approval is given by a spec edit."""

    # No NUL characters: PostgreSQL text cannot hold them, so the store would refuse the
    # approval on every pass; refused at `kubectl apply` instead.
    by: str | None = Field(
        None,
        max_length=253,
        pattern=NO_NUL,
        description="The approver (default: the edit's field manager).",
    )
    comment: str | None = Field(
        None, max_length=1024, pattern=NO_NUL, description="Recorded with the approval."
    )


class WorkflowRunSpec(Model):
    """One execution of a workflow."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "has(self.workflowRef) != has(self.workflowSpec)",
                    "message": "exactly one of workflowRef and workflowSpec must be set",
                }
            ]
        }
    )

    workflow_ref: WorkflowRef | None = None
    workflow_spec: WorkflowSpec | None = None
    params: dict[str, str] = Field(default_factory=dict)
    suspend: bool = False
    cancel: bool = False
    approvals: list[TaskName] = Field(default_factory=list)
    approval_notes: dict[str, ApprovalNote] = Field(
        default_factory=dict,
        description="Per approved task: who approved (`by`) and a `comment`, for the history.",
    )
    ttl_seconds_after_finished: int | None = Field(None, ge=0)
    service_account_name: ResourceName | None = Field(
        None,
        description=SERVICE_ACCOUNT_DOC
        + " Default: the Workflow's, else the operator's --default-service-account.",
    )
    no_cache: bool = Field(
        False, description="Run every cached task again (its result still becomes an entry)."
    )

    @model_validator(mode="after")
    def _one_workflow(self) -> WorkflowRunSpec:
        if (self.workflow_ref is None) == (self.workflow_spec is None):
            raise ValueError("exactly one of workflowRef and workflowSpec must be set")
        return self


class TaskStatus(Model):
    """Summary of one task in a run's status (full detail lives in the store)."""

    phase: TaskPhase
    attempts: int = 0
    started_at: datetime | None = None
    finished_at: datetime | None = None
    reason: str | None = None
    message: str | None = None
    pod_name: str | None = Field(
        None, description="The pod of the newest attempt (container tasks)."
    )
    child_run: str | None = Field(
        None, description="The WorkflowRun the newest attempt started (workflow tasks)."
    )
    cached_from: dict[str, Any] | None = Field(
        None, description="For reason Cached: runId, task and attempt whose outputs it reused."
    )
    outputs: dict[str, Any] | None = Field(
        None, description="Outputs, shortened when large; the store keeps them whole."
    )


class WorkflowRunStatus(Model):
    """What the operator reports about a WorkflowRun."""

    phase: RunPhase | None = None
    run_id: str | None = None
    workflow_name: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    duration: str | None = None
    progress: str | None = None
    message: str | None = None
    tasks: dict[str, TaskStatus] = Field(default_factory=dict)
    conditions: list[Condition] = Field(default_factory=list)
    observed_generation: int | None = None
    workflow_spec: WorkflowSpec | None = Field(
        None, description="Snapshot taken at start; editing the Workflow never changes a run."
    )
    trace_id: str | None = Field(
        None, description="OpenTelemetry trace id of the run, when the operator exports traces."
    )
    outputs: dict[str, Any] | None = Field(
        None, description="The workflow's declared outputs, once the run Succeeded."
    )


class WorkflowRun(Model):
    """The ``WorkflowRun`` resource."""

    model_config = ConfigDict(title="WorkflowRun")

    api_version: Literal["maestro.dev/v1alpha1"] = API_VERSION
    kind: Literal["WorkflowRun"] = "WorkflowRun"
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: WorkflowRunSpec
    status: WorkflowRunStatus | None = None


# --- WorkflowSchedule ----------------------------------------------------------------

ConcurrencyPolicy = Literal["Allow", "Forbid", "Replace"]
# Runs a schedule creates are named <schedule>-<unix seconds>: 11 characters of suffix,
# and the schedule's name goes into a label value (at most 63).
MAX_SCHEDULE_NAME = 52
CRON_SHAPE = r"^(@(yearly|annually|monthly|weekly|daily|midnight|hourly)|(\S+\s+){4,5}\S+)$"
ZONE_SHAPE = r"^[A-Za-z][A-Za-z0-9_+-]*(/[A-Za-z0-9_+-]+)*$"


def schedule_problem(expr: str) -> str | None:
    """Why ``expr`` is not a cron expression Maestro accepts, or None.

    Five fields (as Kubernetes CronJob) or a macro; a sixth field (seconds, last) exists
    for tests only and the operator refuses it unless started with
    ``--allow-seconds-schedules``.
    """
    fields = expr.split()
    if not (expr.startswith("@") or len(fields) in (5, 6)) or not croniter.is_valid(expr):
        return (
            f"{expr!r} is not a cron expression (5 fields: minute hour "
            "day-of-month month day-of-week, or @hourly, @daily, @weekly, @monthly, @yearly)"
        )
    return None


def zone_problem(zone: str | None) -> str | None:
    """Why ``zone`` is not an IANA time zone, or None."""
    if zone is None:
        return None
    try:
        ZoneInfo(zone)
    except (ZoneInfoNotFoundError, ValueError):
        return f"{zone!r} is not an IANA time zone (e.g. UTC, Europe/Paris)"
    return None


class RunTemplate(Model):
    """The WorkflowRun a schedule creates at each time."""

    workflow_ref: WorkflowRef
    params: dict[str, str] = Field(default_factory=dict)
    service_account_name: ResourceName | None = Field(None, description=SERVICE_ACCOUNT_DOC)
    ttl_seconds_after_finished: int | None = Field(None, ge=0)


class WorkflowScheduleSpec(Model):
    """Create a WorkflowRun on a cron schedule, as a Kubernetes CronJob creates Jobs."""

    # The patterns are the shape `kubectl apply` can check; the values (minute 61, an
    # unknown zone) are checked by the validators below, in `maestro validate` and by
    # the operator (condition Ready=False).
    schedule: Annotated[str, StringConstraints(pattern=CRON_SHAPE, max_length=256)] = Field(
        description="Cron expression: 5 fields (minute hour day month weekday) or a macro "
        "such as @hourly."
    )
    time_zone: Annotated[str, StringConstraints(pattern=ZONE_SHAPE, max_length=64)] | None = Field(
        None, description="IANA time zone of the schedule (default UTC), e.g. Europe/Paris."
    )
    run_template: RunTemplate
    concurrency_policy: ConcurrencyPolicy = Field(
        "Allow",
        description="When a run of this schedule is still active: start another (Allow), "
        "skip this time (Forbid) or cancel it and start the new one (Replace).",
    )
    starting_deadline_seconds: int | None = Field(
        None, ge=0, description="A time missed by more than this is skipped."
    )
    successful_runs_history_limit: int = Field(3, ge=0, le=1000)
    failed_runs_history_limit: int = Field(1, ge=0, le=1000)
    suspend: bool = Field(False, description="Create no runs while true (running ones go on).")

    @field_validator("schedule")
    @classmethod
    def _valid_schedule(cls, value: str) -> str:
        problem = schedule_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("time_zone")
    @classmethod
    def _valid_zone(cls, value: str | None) -> str | None:
        problem = zone_problem(value)
        if problem:
            raise ValueError(problem)
        return value


class ActiveRun(Model):
    """A run of the schedule that has not ended."""

    name: str
    uid: str | None = None


class WorkflowScheduleStatus(Model):
    """What the operator reports about a WorkflowSchedule."""

    last_schedule_time: datetime | None = None
    last_successful_time: datetime | None = None
    next_schedule_time: datetime | None = None
    last_run_name: str | None = None
    active: list[ActiveRun] = Field(default_factory=list)
    conditions: list[Condition] = Field(default_factory=list)
    observed_generation: int | None = None


class WorkflowSchedule(Model):
    """The ``WorkflowSchedule`` resource."""

    model_config = ConfigDict(
        title="WorkflowSchedule",
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": f"self.metadata.name.size() <= {MAX_SCHEDULE_NAME}",
                    "message": f"metadata.name: at most {MAX_SCHEDULE_NAME} characters "
                    "(run names add a timestamp)",
                }
            ]
        },
    )

    api_version: Literal["maestro.dev/v1alpha1"] = API_VERSION
    kind: Literal["WorkflowSchedule"] = "WorkflowSchedule"
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: WorkflowScheduleSpec
    status: WorkflowScheduleStatus | None = None
