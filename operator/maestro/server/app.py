"""The HTTP API and the web UI of ``maestro server`` (FastAPI).

Reads come from the store, so runs stay visible after their WorkflowRun is deleted;
actions go through the API server as WorkflowRun changes, exactly what the CLI's
cluster verbs do, after :class:`~maestro.server.auth.Authorizer` has checked the caller
may do the same with kubectl.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
from collections.abc import AsyncIterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import Body, Depends, FastAPI, Header, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field, ValidationError

from maestro import __version__
from maestro.api.models import NO_NUL, Task, WorkflowSpec
from maestro.api.parse import describe
from maestro.api.phases import RunPhase, TaskPhase
from maestro.dag import fanout
from maestro.dag.templates import Context, render
from maestro.dag.validate import resolve_params, validate
from maestro.executors.container import LABEL_ATTEMPT, LABEL_RUN_ID, LABEL_TASK
from maestro.k8s.client import (
    APIError,
    Caller,
    Conflict,
    Kube,
    NotFound,
    PermanentAPIError,
    retry_manifest,
    run_manifest,
)
from maestro.server.auth import ApiError, Authorizer
from maestro.server.graph import layout
from maestro.store import AttemptRecord, RunNotFound, RunRecord, Store, StoreError
from maestro.store.queries import list_runs_page

STATIC = Path(__file__).parent / "static"
#: Annotation naming who asked the server for a run (the server creates it).
SUBMITTED_BY = "maestro.dev/submitted-by"

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"
RUN_ID = r"^[0-9a-f-]{1,36}$"
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9]$")
_FINISHED = {RunPhase.SUCCEEDED, RunPhase.FAILED, RunPhase.CANCELLED}
_REQUEST_KEYS = {"params", "name", "labels"}
# How often the event stream looks for new events in the store.
EVENT_POLL_SECONDS = 0.5
KEEPALIVE_SECONDS = 15.0

Namespace = Annotated[
    str, Query(pattern=DNS_LABEL, max_length=63, description="Namespace of the run.")
]
RunId = Annotated[str, PathParam(pattern=RUN_ID, description="The run's id in the store.")]
TaskName = Annotated[str, PathParam(pattern=DNS_LABEL, max_length=63)]
#: Declares the bearer scheme in the OpenAPI document; the header is parsed by Authorizer.
BEARER = HTTPBearer(auto_error=False, description="A Kubernetes bearer token.")


class ExecuteRequest(BaseModel):
    """Start a run. The original system's shape, a plain JSON object of inputs (no
    ``params`` key), is accepted too and taken as the params."""

    params: dict[str, str | int | float | bool] = Field(default_factory=dict)
    name: str | None = Field(None, description="Run name; default WORKFLOW-<suffix>.")
    labels: dict[str, str] = Field(default_factory=dict)


class ApproveRequest(BaseModel):
    """Which approval gate to open."""

    task: str = Field(pattern=DNS_LABEL, max_length=63)
    comment: str | None = Field(
        None, max_length=1024, pattern=NO_NUL, description="Recorded with the approval."
    )


def _label_problem(key: str, value: str) -> str | None:
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not re.fullmatch(DNS_SUBDOMAIN, prefix)):
        return "label key prefix must be a DNS subdomain"
    if not _LABEL_NAME.fullmatch(name):
        return "label name must be 1-63 alphanumerics, '-', '_' or '.', alphanumeric at the ends"
    if not _LABEL_VALUE.fullmatch(value):
        return "label value must be at most 63 alphanumerics, '-', '_' or '.'"
    return None


def _execute_request(body: Any) -> tuple[dict[str, str], str | None, dict[str, str]]:
    """(params, run name, labels) from either request shape; 422 naming the field."""
    if not isinstance(body, dict):
        raise ApiError(422, "the body must be a JSON object", "body")
    if not ("params" in body and set(body) <= _REQUEST_KEYS and isinstance(body["params"], dict)):
        body = {"params": body}  # the original shape: the object is the inputs
    try:
        req = ExecuteRequest.model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"] if p not in ("str", "int", "float", "bool"))
        raise ApiError(422, describe(err)[0], field) from None
    params = {
        k: v if isinstance(v, str) else json.dumps(v) for k, v in req.params.items()
    }  # numbers and booleans as their JSON text: params are strings
    if req.name is not None and (len(req.name) > 253 or not re.fullmatch(DNS_SUBDOMAIN, req.name)):
        raise ApiError(422, "must be a DNS subdomain (lower case, digits, '-', '.')", "name")
    for key, value in req.labels.items():
        problem = _label_problem(key, value)
        if problem:
            raise ApiError(422, problem, f"labels.{key}")
    return params, req.name, req.labels


def _encode_cursor(at: datetime, run_id: str) -> str:
    return base64.urlsafe_b64encode(f"{at.isoformat()}|{run_id}".encode()).decode()


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        at, _, run_id = base64.urlsafe_b64decode(cursor.encode()).decode().partition("|")
        when = datetime.fromisoformat(at)
    except (ValueError, UnicodeError, binascii.Error):
        raise ApiError(400, "not a cursor this server returned", "cursor") from None
    if when.tzinfo is None or not re.fullmatch(RUN_ID, run_id):
        raise ApiError(400, "not a cursor this server returned", "cursor")
    return when, run_id


def _time(ts: datetime | None) -> str | None:
    return ts.isoformat() if ts else None


def _attempt(a: AttemptRecord) -> dict[str, Any]:
    return {
        "attempt": a.attempt,
        "phase": a.phase.value,
        "reason": a.reason,
        "message": a.message,
        "outputs": a.outputs,
        "podName": a.job_name,
        "createdAt": _time(a.created_at),
        "startedAt": _time(a.started_at),
        "finishedAt": _time(a.finished_at),
    }


def _summary(run: Any) -> dict[str, Any]:
    return {
        "id": run.id,
        "namespace": run.namespace,
        "name": run.name,
        "workflow": run.workflow_name,
        "phase": run.phase.value,
        "message": run.message,
        "createdAt": _time(run.created_at),
        "startedAt": _time(run.started_at),
        "finishedAt": _time(run.finished_at),
    }


def _spec_of(run: RunRecord) -> WorkflowSpec | None:
    try:
        return WorkflowSpec.model_validate(run.spec)
    except ValidationError:
        return None  # a run recorded before its spec could be read: no graph


async def _caller(
    request: Request, _: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]
) -> Caller:
    """The authenticated caller of a request (the Authorizer lives on the app's state)."""
    auth: Authorizer = request.app.state.auth
    try:
        return await auth.authenticate(request.headers.get("authorization"))
    except APIError as err:
        raise ApiError(503, f"cannot review the token: {err.message}") from None


CallerDep = Annotated[Caller, Depends(_caller)]


def _gate(task: Task, run: RunRecord, latest: Mapping[str, AttemptRecord]) -> str | None:
    """An approval gate's message, with params and upstream outputs filled in (as written
    when a reference cannot be resolved yet)."""
    if task.approval is None or task.approval.message is None:
        return None
    outputs = {n: a.outputs or {} for n, a in latest.items() if a.phase is TaskPhase.SUCCEEDED}
    try:
        return render(task.approval.message, Context(run.params, outputs, {}))
    except ValueError:  # TemplateError, or a reference that does not parse
        return task.approval.message


def create_app(
    store: Store,
    kube: Kube,
    *,
    allow_anonymous: bool = False,
    auth_cache_seconds: float = 5.0,
    run_id_wait: float = 10.0,
) -> FastAPI:
    """The application; ``store`` and ``kube`` are owned (and closed) by the caller."""
    app = FastAPI(
        # No Swagger/ReDoc pages: they load scripts from a CDN; /openapi.json is the contract.
        docs_url=None,
        redoc_url=None,
        title="Maestro",
        version=__version__,
        description="Start workflow runs, read run history (also of deleted runs), follow "
        "runs live. Every call needs a Kubernetes bearer token; it may do what the "
        "token's owner may do to WorkflowRuns with kubectl.",
    )
    auth = Authorizer(kube, allow_anonymous=allow_anonymous, cache_seconds=auth_cache_seconds)
    app.state.auth = auth

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, err: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        return JSONResponse(
            {
                "error": {"field": field, "message": first["msg"]},
                # Without the offending input: it may be bytes, and echoing it is useless.
                "detail": [
                    {"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]}
                    for e in err.errors()
                ],
            },
            status_code=422,
        )

    @app.exception_handler(StoreError)
    async def _store_down(_: Request, err: StoreError) -> JSONResponse:
        return JSONResponse({"error": {"message": str(err)}}, status_code=503)

    async def run_of(run_id: str) -> RunRecord:
        try:
            return await store.get_run(run_id)
        except RunNotFound:
            raise ApiError(404, f"run {run_id} not found", "id") from None

    async def live_object(run: RunRecord) -> dict[str, Any] | None:
        """The run's WorkflowRun, if it still exists (and is this run, not a namesake)."""
        try:
            obj = await kube.get_run(run.namespace, run.name)
        except NotFound:
            return None
        return obj if obj["metadata"].get("uid") == run.uid else None

    async def readable_run(run_id: str, caller: Caller, verb: str) -> RunRecord:
        run = await run_of(run_id)
        await auth.require(caller, verb, run.namespace)
        return run

    # Probes ---------------------------------------------------------------------------

    @app.get("/health", tags=["probes"])
    async def health() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/ready", tags=["probes"])
    async def ready() -> JSONResponse:
        """Readiness: the store and the Kubernetes API server both answer."""
        problems: dict[str, str] = {}
        try:
            await store.ping()
        except StoreError as err:
            problems["store"] = str(err)
        try:
            async with asyncio.timeout(2.0):
                await kube.version()
        except (OSError, TimeoutError, APIError) as err:
            problems["kubernetes"] = str(err) or type(err).__name__
        if problems:
            return JSONResponse({"status": "unready", "problems": problems}, status_code=503)
        return JSONResponse({"status": "ready"})

    # Starting runs ---------------------------------------------------------------------

    @app.post(
        "/api/workflows/{name}/execute",
        status_code=201,
        tags=["runs"],
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "oneOf": [
                                ExecuteRequest.model_json_schema(),
                                {
                                    "type": "object",
                                    "description": "Inputs (the original request shape).",
                                    "additionalProperties": {
                                        "type": ["string", "number", "boolean"]
                                    },
                                },
                            ]
                        }
                    }
                },
            }
        },
    )
    async def execute(
        caller: CallerDep,
        request: Request,
        name: Annotated[str, PathParam(pattern=DNS_SUBDOMAIN, max_length=253)],
        namespace: Namespace = "default",
    ) -> dict[str, Any]:
        """Start a run of Workflow NAME; returns the WorkflowRun's name and the run id."""
        await auth.require(caller, "create", namespace)
        try:
            body = await request.json()
        except ValueError:
            raise ApiError(422, "the body must be JSON", "body") from None
        params, run_name, labels = _execute_request(body)
        try:
            workflow = await kube.get_workflow(namespace, name)
        except NotFound:
            raise ApiError(
                404, f"workflow {name!r} not found in namespace {namespace!r}", "name"
            ) from None
        try:
            spec = WorkflowSpec.model_validate(workflow.get("spec") or {})
        except ValidationError as err:
            raise ApiError(422, f"workflow is invalid: {describe(err)[0]}", "name") from None
        problems = validate(spec)
        if problems:
            raise ApiError(422, f"workflow is invalid: {problems[0]}", "name")
        _, param_problems = resolve_params(spec, params)
        if param_problems:
            field, _, message = param_problems[0].partition(": ")
            raise ApiError(422, message, field)
        body = run_manifest(
            name,
            params,
            name=run_name,
            labels=labels,
            annotations={SUBMITTED_BY: caller.username},
        )
        try:
            created = await kube.create_run(namespace, body)
        except Conflict:
            raise ApiError(409, f"a run named {run_name!r} exists", "name") from None
        except PermanentAPIError as err:
            raise ApiError(422, f"rejected by the API server: {err.message}") from None
        meta = created["metadata"]
        run_id = None
        deadline = asyncio.get_running_loop().time() + run_id_wait
        # The operator gives the run its id when it records it; wait a little for it, so
        # a caller can follow /api/runs/{id} at once (None when the operator is slow).
        while run_id is None and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.2)
            try:
                run_id = ((await kube.get_run(namespace, meta["name"])).get("status") or {}).get(
                    "runId"
                )
            except NotFound:
                break
        return {"namespace": namespace, "name": meta["name"], "uid": meta["uid"], "runId": run_id}

    # History ---------------------------------------------------------------------------

    @app.get("/api/runs", tags=["runs"])
    async def runs(
        caller: CallerDep,
        namespace: Annotated[
            str | None, Query(pattern=DNS_LABEL, max_length=63, description="Default: all.")
        ] = None,
        workflow: Annotated[str | None, Query(pattern=DNS_SUBDOMAIN, max_length=253)] = None,
        phase: Annotated[list[RunPhase] | None, Query()] = None,
        since: Annotated[datetime | None, Query(description="Created at or after.")] = None,
        until: Annotated[datetime | None, Query(description="Created before.")] = None,
        cursor: Annotated[str | None, Query(max_length=200)] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
    ) -> dict[str, Any]:
        """Runs from the store, newest first (deleted ones too); pass ``nextCursor`` back
        as ``cursor`` for the next page. Needs ``list workflowruns`` in the namespace (in
        every namespace without one)."""
        await auth.require(caller, "list", namespace or "")
        for field, value in (("since", since), ("until", until)):
            if value is not None and value.tzinfo is None:
                raise ApiError(422, "needs a time zone (e.g. Z)", field)
        page, after = await list_runs_page(
            store,
            limit=limit,
            after=_decode_cursor(cursor) if cursor else None,
            namespace=namespace,
            workflow=workflow,
            phases=phase or (),
            created_after=since,
            created_before=until,
        )
        return {
            "items": [_summary(r) for r in page],
            "nextCursor": _encode_cursor(*after) if after else None,
        }

    @app.get("/api/runs/{id}", tags=["runs"])
    async def run_detail(id: RunId, caller: CallerDep) -> dict[str, Any]:
        """One run: its tasks' latest attempts, the DAG layout, and whether its
        WorkflowRun still exists."""
        run = await readable_run(id, caller, "get")
        latest = await store.latest_attempts(run.id)
        spec = _spec_of(run)
        tasks = []
        groups = fanout.instances_of(latest)
        for task in spec.all_tasks() if spec else []:
            a = latest.get(task.name)
            entry: dict[str, Any] = {
                "name": task.name,
                "kind": task.kind,
                "dependsOn": task.depends_on,
                "gate": _gate(task, run, latest),
                "phase": a.phase.value if a else None,
                "attempts": a.attempt if a else 0,
                "message": a.message if a else None,
                "startedAt": _time(a.started_at) if a else None,
                "finishedAt": _time(a.finished_at) if a else None,
            }
            if members := groups.get(task.name):
                # A fan-out's node stands for its instances, as its status entry does.
                phases = [latest[m].phase for m in members]
                entry["phase"] = fanout.summary(phases).value
                entry["message"] = fanout.progress(phases)
                entry["instances"] = [
                    {"name": m, "phase": latest[m].phase.value, "attempts": latest[m].attempt}
                    for m in members
                ]
            tasks.append(entry)
        live = await live_object(run)
        return {
            **_summary(run),
            "params": run.params,
            "controls": run.controls,
            "deleted": live is None,
            "tasks": tasks,
            "graph": layout(spec) if spec else None,
        }

    @app.get("/api/runs/{id}/tasks/{task}", tags=["runs"])
    async def task_detail(id: RunId, task: TaskName, caller: CallerDep) -> dict[str, Any]:
        """Every attempt of one task: phases, messages, outputs."""
        run = await readable_run(id, caller, "get")
        spec = _spec_of(run)
        declared = {t.name: t for t in spec.all_tasks()} if spec else {}
        if task not in declared:
            raise ApiError(404, f"run {id} has no task {task!r}", "task")
        found = [_attempt(a) for a in await store.attempts(run.id) if a.task == task]
        t = declared[task]
        return {
            "name": task,
            "kind": t.kind,
            "gate": _gate(t, run, await store.latest_attempts(run.id)) if t.approval else None,
            "attempts": found,
        }

    @app.get("/api/runs/{id}/events", tags=["runs"], response_class=StreamingResponse)
    async def events(
        caller: CallerDep,
        id: RunId,
        after: Annotated[int, Query(ge=0, description="Only events with a higher id.")] = 0,
        last_event_id: Annotated[str | None, Header(pattern=r"^\d{1,18}$")] = None,
    ) -> StreamingResponse:
        """The run's transitions as Server-Sent Events: the history first, then live ones
        until the run has finished (reconnect with Last-Event-ID to resume)."""
        run = await readable_run(id, caller, "watch")
        start = int(last_event_id) if last_event_id else after

        async def stream() -> AsyncIterator[str]:
            seen = start
            idle = 0.0
            while True:
                batch = await store.events(run.id, after=seen)
                for e in batch:
                    seen = e.id
                    data = {
                        "id": e.id,
                        "kind": e.kind,
                        "task": e.task,
                        "attempt": e.attempt,
                        "from": e.from_phase,
                        "to": e.to_phase,
                        "reason": e.reason,
                        "message": e.message,
                        "actor": e.actor,
                        "at": _time(e.at),
                    }
                    yield f"id: {e.id}\nevent: transition\ndata: {json.dumps(data)}\n\n"
                if not batch:
                    if (await store.get_run(run.id)).phase in _FINISHED:
                        yield "event: end\ndata: {}\n\n"
                        return
                    idle += EVENT_POLL_SECONDS
                    if idle >= KEEPALIVE_SECONDS:
                        idle = 0.0
                        yield ": keep-alive\n\n"
                await asyncio.sleep(0 if batch else EVENT_POLL_SECONDS)

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    @app.get("/api/runs/{id}/tasks/{task}/logs", tags=["runs"], response_class=StreamingResponse)
    async def logs(
        caller: CallerDep,
        id: RunId,
        task: TaskName,
        follow: bool = False,
    ) -> StreamingResponse:
        """Container logs of every attempt of a task, oldest first, as plain text;
        ``follow`` streams a running attempt's log until it ends. Needs ``get
        workflowruns`` and ``get pods/log`` in the run's namespace."""
        run = await run_of(id)
        await auth.require(caller, "get", run.namespace)
        await auth.require(
            caller, "get", run.namespace, resource="pods", group="", subresource="log"
        )
        pods = await kube.list_pods(run.namespace, f"{LABEL_RUN_ID}={run.id},{LABEL_TASK}={task}")
        if not pods:
            raise ApiError(404, f"no pods of task {task!r} (not a container task, or gone)", "task")

        async def stream() -> AsyncIterator[bytes]:
            for pod in pods:
                meta = pod["metadata"]
                attempt = (meta.get("labels") or {}).get(LABEL_ATTEMPT, "?")
                yield f"==> {task} attempt {attempt} ({meta['name']})\n".encode()
                running = (pod.get("status") or {}).get("phase") in ("Pending", "Running")
                try:
                    if follow and running:
                        async for chunk in kube.follow_pod_log(run.namespace, meta["name"]):
                            yield chunk
                    else:
                        yield (await kube.pod_log(run.namespace, meta["name"])).encode()
                except NotFound as err:
                    yield f"(no log: {err})\n".encode()

        return StreamingResponse(stream(), media_type="text/plain; charset=utf-8")

    # Actions ---------------------------------------------------------------------------

    async def acting_on(id: str, caller: Caller, verb: str) -> tuple[RunRecord, dict[str, Any]]:
        run = await run_of(id)
        await auth.require(caller, verb, run.namespace)
        obj = await live_object(run)
        if obj is None:
            raise ApiError(409, f"run {id}'s WorkflowRun was deleted; only its history is left")
        return run, obj

    async def change(run: RunRecord, edit: Any, caller: Caller) -> None:
        try:
            # As the caller's field manager, so the operator records who cancelled
            # (field managers are at most 128 characters).
            await kube.change_run_spec(
                run.namespace, run.name, edit, field_manager=caller.username[:128] or None
            )
        except NotFound:
            raise ApiError(409, f"run {run.id}'s WorkflowRun was deleted meanwhile") from None
        except Conflict as err:
            raise ApiError(409, str(err)) from None

    @app.post("/api/runs/{id}/approve", tags=["actions"])
    async def approve(
        id: RunId, req: Annotated[ApproveRequest, Body()], caller: CallerDep
    ) -> dict[str, Any]:
        """Open an approval gate (adds it to ``spec.approvals``; needs ``patch``)."""
        run, _ = await acting_on(id, caller, "patch")
        spec = _spec_of(run)
        gates = {t.name for t in spec.all_tasks() if t.approval} if spec else set()
        if req.task not in gates:
            raise ApiError(
                422, f"not an approval task of this run (gates: {sorted(gates)})", "task"
            )

        def add(spec: dict[str, Any]) -> dict[str, Any]:
            # The approver is the authenticated caller, not the server's identity.
            note = {"by": caller.username, **({"comment": req.comment} if req.comment else {})}
            return {
                "approvals": sorted({*(spec.get("approvals") or []), req.task}),
                "approvalNotes": {req.task: note},
            }

        await change(run, add, caller)
        return {"id": run.id, "approved": req.task}

    @app.post("/api/runs/{id}/cancel", tags=["actions"])
    async def cancel(id: RunId, caller: CallerDep) -> dict[str, Any]:
        """Cancel a run (sets ``spec.cancel``; needs ``patch``)."""
        run, _ = await acting_on(id, caller, "patch")
        if run.phase in _FINISHED:
            raise ApiError(409, f"run {id} already ended {run.phase.value}")
        await change(run, lambda _: {"cancel": True}, caller)
        return {"id": run.id, "cancelling": True}

    @app.post("/api/runs/{id}/retry", status_code=201, tags=["actions"])
    async def retry(id: RunId, caller: CallerDep) -> dict[str, Any]:
        """Start a new run reusing this run's succeeded tasks (needs ``create``)."""
        run, obj = await acting_on(id, caller, "create")
        created = await kube.create_run(run.namespace, retry_manifest(obj, run.id))
        return {"namespace": run.namespace, "name": created["metadata"]["name"]}

    # The UI ------------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    async def index() -> RedirectResponse:
        return RedirectResponse("/ui/")

    app.mount("/ui", StaticFiles(directory=STATIC, html=True), name="ui")
    return app
