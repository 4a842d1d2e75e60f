"""Semantic validation of a workflow: every problem at once, each naming its tasks.

The pydantic models check shapes; this module checks meaning (the graph, the
expressions and the templates), which no CRD schema can express.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from maestro.api.models import MAX_CALL_DEPTH, MAX_INSTANCES, Task, WorkflowSpec
from maestro.dag import expressions, fanout, templates
from maestro.dag.graph import Graph


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a workflow. ``task`` is None for workflow-level problems."""

    task: str | None
    message: str

    def __str__(self) -> str:
        return f"{self.task}: {self.message}" if self.task else self.message


@dataclass(frozen=True)
class Plan:
    """A validated workflow's graphs, ready for scheduling."""

    main: Graph
    final: Graph
    order: tuple[str, ...]
    reads: Mapping[str, frozenset[str]]  # task -> tasks whose outputs or phase it reads


def _graph_problems(tasks: list[Task], graph: Graph, known: set[str], label: str) -> list[Problem]:
    problems: list[Problem] = []
    for task in tasks:
        for dep in task.depends_on:
            if dep == task.name:
                problems.append(Problem(task.name, "depends on itself"))
            elif dep not in known:
                problems.append(Problem(task.name, f"depends on unknown task {dep!r}"))
            elif dep not in graph.deps:
                problems.append(
                    Problem(
                        task.name,
                        f"{label} task cannot depend on {dep!r}: dependsOn of a {label} task "
                        f"may only name other {label} tasks",
                    )
                )
    for cycle in graph.cycles():
        problems.append(Problem(cycle[0], "dependency cycle: " + " -> ".join(cycle)))
    return problems


def _template_strings(task: Task) -> list[str]:
    """Strings whose templates a task reads: its executor's, its cache key and its fan-out's
    lists."""
    executor = getattr(task, task.kind)
    found = list(templates.strings_in(executor.model_dump(by_alias=True, exclude_none=True)))
    found += [task.cache.key] if task.cache else []
    return found + (fanout.sources(task.for_each) if task.for_each else [])


def _refs_quietly(text: str) -> list[templates.Ref]:
    """References in ``text``; none when it does not parse (reported elsewhere)."""
    try:
        return list(templates.refs_in(text))
    except templates.TemplateError:
        return []


def _fanout_problems(task: Task) -> list[Problem]:
    """What the schema cannot say of a forEach: list sources, axis names, the instance cap."""
    fe = task.for_each
    if fe is None:
        return []
    problems: list[Problem] = []
    for text in fanout.sources(fe):
        try:
            ref = templates.sole_ref(text)
        except templates.TemplateError as err:
            problems.append(Problem(task.name, f"forEach.from: {err}"))
            continue
        if ref.kind not in ("param", "output"):
            problems.append(
                Problem(
                    task.name,
                    f"forEach.from: {{{{ {ref} }}}} cannot hold the list: use "
                    "{{ params.P }} or {{ tasks.T.outputs.K }}",
                )
            )
    axes = Counter(a.name for a in fe.matrix or ())
    for name, count in axes.items():
        if count > 1:
            problems.append(Problem(task.name, f"forEach.matrix: {name!r} is used {count} times"))
    if task.cache is not None and not any(r.kind == "item" for r in _refs_quietly(task.cache.key)):
        problems.append(
            Problem(
                task.name,
                "cache.key must read {{ item }} (or item.KEY) in a task with forEach: "
                "otherwise every instance shares one cache entry",
            )
        )
    instances = fanout.static_count(fe)
    if instances is not None and instances > MAX_INSTANCES:
        problems.append(Problem(task.name, fanout.too_many(task.name, instances)))
    for text in _template_strings(task):
        for ref in _refs_quietly(text):
            head = (ref.key or "").split(".")[0]
            if ref.kind == "item" and fe.matrix is not None and head not in axes:
                known = ", ".join(axes)
                problems.append(
                    Problem(
                        task.name,
                        f"{{{{ {ref} }}}}: a matrix item is {{{{ item.AXIS }}}} (axes: {known})",
                    )
                )
    return problems


def _reference_problems(
    task: Task,
    params: set[str],
    graph: Graph,
    main_tasks: set[str],
    is_final: bool,
) -> list[Problem]:
    """Templates and ``when`` may only read declared params and upstream tasks."""
    problems: list[Problem] = []

    def check_task(name: str, how: str) -> None:
        if name not in main_tasks and name not in graph.deps:
            problems.append(Problem(task.name, f"{how} reads unknown task {name!r}"))
        elif is_final and name in main_tasks:
            return  # finally tasks run after the whole DAG, so every main task is upstream
        elif name == task.name:
            problems.append(Problem(task.name, f"{how} reads its own outputs"))
        elif name not in graph.deps or not graph.is_upstream(name, task.name):
            problems.append(
                Problem(
                    task.name,
                    f"{how} reads task {name!r}, which is not upstream: "
                    f"add it to dependsOn (directly or through another task)",
                )
            )

    if task.when is not None:
        try:
            for ref in expressions.parse(task.when):
                if ref.root == "params" and ref.name not in params:
                    problems.append(Problem(task.name, f"when: unknown param {ref.name!r}"))
                elif ref.root == "tasks":
                    check_task(ref.name, "when")
                elif ref.root == "run" and ref.name == "outcome" and not is_final:
                    problems.append(
                        Problem(task.name, "when: run.outcome is only known in finally tasks")
                    )
        except expressions.ExpressionError as err:
            problems.append(Problem(task.name, f"when: {err}"))

    for text in _template_strings(task):
        try:
            refs = list(templates.refs_in(text))
        except templates.TemplateError as err:
            problems.append(Problem(task.name, str(err)))
            continue
        for tref in refs:
            if tref.kind == "param" and tref.name not in params:
                problems.append(Problem(task.name, f"template reads unknown param {tref.name!r}"))
            elif tref.kind == "output":
                check_task(tref.name, f"template {{{{ {tref} }}}}")
            elif tref.kind == "run" and tref.name == "outcome" and not is_final:
                problems.append(Problem(task.name, "run.outcome is only known in finally tasks"))
            elif tref.kind == "item" and task.for_each is None:
                problems.append(
                    Problem(task.name, f"{{{{ {tref} }}}} is only known in a task with forEach")
                )
    return problems


_SHELLS = {"sh", "bash", "dash", "ash", "zsh", "ksh", "busybox"}


def _shell_scripts(task: Task) -> list[str]:
    """The strings a container task hands to ``SHELL -c`` (command and args together)."""
    spec = task.container
    if spec is None:
        return []
    argv = [*(spec.command or []), *(spec.args or [])]
    if not argv or argv[0].rsplit("/", 1)[-1] not in _SHELLS or "-c" not in argv:
        return []
    return argv[argv.index("-c") + 1 :]


def shell_warnings(spec: WorkflowSpec) -> list[Problem]:
    """Legal but risky: values pasted unquoted into a shell script (shell injection)."""
    found: list[Problem] = []
    for task in spec.all_tasks():
        for script in _shell_scripts(task):
            try:
                refs = list(templates.unquoted_in(script))
            except templates.TemplateError:
                continue  # validate() reports it
            for ref in refs:
                if ref.kind == "run" and ref.name != "outcome":
                    continue  # ids and names Maestro made: DNS labels, no shell syntax
                env = (
                    f"$MAESTRO_PARAM_{ref.name}"
                    if ref.kind == "param"
                    else "$MAESTRO_INPUTS"
                    if ref.kind == "output"
                    else "$MAESTRO_ITEM"
                    if ref.kind == "item"
                    else "$MAESTRO_RUN_OUTCOME"
                )
                found.append(
                    Problem(
                        task.name,
                        f"{{{{ {ref} }}}} is pasted unquoted into a shell script: a value "
                        f"with ; or $( ) runs commands. Use {{{{ {ref} | shquote }}}} or "
                        f'read "{env}" in the script',
                    )
                )
    return found


# Pod labels Maestro sets, or that mark a Job's pods: an author's value would mislead
# Maestro about which run a pod belongs to, or Kubernetes tools about which Job owns it.
RESERVED_LABEL_PREFIXES = ("maestro.dev/", "batch.kubernetes.io/", "controller.kubernetes.io/")
RESERVED_LABELS = frozenset({"job-name", "controller-uid", "app.kubernetes.io/managed-by"})
_LABEL_NAME = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
# Visible ASCII, space and tab: what every HTTP client sends as a header value.
_HEADER_VALUE = re.compile(r"^[\t\x20-\x7e]*$")


def _label_key_problem(key: str) -> str | None:
    if key in RESERVED_LABELS or key.startswith(RESERVED_LABEL_PREFIXES):
        return "is reserved for Maestro and the Job controller"
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        return "has a prefix that is not a DNS subdomain"
    if not name or len(name) > 63 or not _LABEL_NAME.match(name):
        return "is not a valid label name (63 alphanumerics, '-', '_', '.' inside)"
    return None


def field_problems(task: Task, *, rendered: bool) -> list[str]:
    """Executor fields Kubernetes or HTTP would refuse, each as ``field: problem``.

    With ``rendered`` False (static validation) strings holding templates are skipped:
    only their rendered value can be checked, which the engine does before a start.
    """

    def known(value: str) -> bool:
        return rendered or "{{" not in value

    problems: list[str] = []
    if task.container is not None:
        c = task.container
        if known(c.image) and (not c.image.strip() or c.image != c.image.strip()):
            problems.append(
                "container.image: is empty"
                if not c.image.strip()
                else f"container.image: {c.image!r} has leading or trailing whitespace"
            )
        meta = c.pod_metadata
        for key, value in (meta.labels if meta else {}).items():
            why = _label_key_problem(key)
            if why is not None:
                problems.append(f"container.podMetadata.labels[{key!r}]: {why}")
            elif known(value) and (len(value) > 63 or not _LABEL_NAME.match(value)):
                problems.append(
                    f"container.podMetadata.labels[{key!r}]: value {value!r} is not a valid "
                    "label value (at most 63 alphanumerics, '-', '_', '.' inside)"
                )
    if task.http is not None:
        h = task.http
        if known(h.url):
            problems += _url_problems(h.url)
        for header in h.headers:
            if not _HEADER_NAME.match(header.name):
                problems.append(f"http.headers[{header.name!r}]: not a valid header name")
            text = header.value
            if text is not None and known(text) and not _HEADER_VALUE.match(text):
                problems.append(
                    f"http.headers[{header.name!r}]: value has characters other than "
                    "printable ASCII (non-ASCII or a line break)"
                )
    return problems


def _url_problems(url: str) -> list[str]:
    if not url.strip():
        return ["http.url: is empty"]
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - parsing the port is what rejects "http://host:x"
    except ValueError as err:
        return [f"http.url: {url!r} is not a valid URL: {err}"]
    if parts.scheme not in ("http", "https"):
        return [f"http.url: {url!r} must start with http:// or https://"]
    if not parts.hostname:
        return [f"http.url: {url!r} has no host"]
    if any(ch.isspace() or ord(ch) < 32 for ch in url):
        return [f"http.url: {url!r} contains whitespace or control characters"]
    return []


def _volume_problems(spec: WorkflowSpec) -> list[Problem]:
    """Volume names are unique and every mount names one (the CRD schema cannot say the
    latter: its CEL cost estimate over 5000 tasks is refused by the API server)."""
    problems: list[Problem] = []
    counts = Counter(v.name for v in spec.volumes)
    spaces = Counter(w.name for w in spec.workspaces)
    for name, count in counts.items():
        if count > 1:
            problems.append(Problem(None, f"volumes: name {name!r} is used {count} times"))
    for name, count in spaces.items():
        if count > 1:
            problems.append(Problem(None, f"workspaces: name {name!r} is used {count} times"))
        if name in counts:
            problems.append(Problem(None, f"workspaces: {name!r} is also the name of a volume"))
    known = ", ".join(sorted({*counts, *spaces})) or "none"
    for task in spec.all_tasks():
        if task.container is None:
            continue
        paths: set[str] = set()
        for i, mount in enumerate(task.container.volume_mounts):
            field = f"container.volumeMounts[{i}]"
            if mount.name not in counts and mount.name not in spaces:
                problems.append(
                    Problem(
                        task.name,
                        f"{field}.name: unknown volume {mount.name!r} "
                        f"(spec.volumes and spec.workspaces: {known})",
                    )
                )
            if mount.mount_path in paths:
                problems.append(
                    Problem(task.name, f"{field}.mountPath: {mount.mount_path!r} is mounted twice")
                )
            paths.add(mount.mount_path)
        mounted = {m.name for m in task.container.volume_mounts}
        for i, out in enumerate(task.container.output_files):
            field = f"container.outputFiles[{i}].workspace"
            if out.workspace not in spaces:
                problems.append(Problem(task.name, f"{field}: unknown workspace {out.workspace!r}"))
            elif out.workspace not in mounted:
                problems.append(
                    Problem(
                        task.name,
                        f"{field}: {out.workspace!r} is not mounted by this task "
                        "(add it to container.volumeMounts)",
                    )
                )
    return problems


def workspace_warnings(spec: WorkflowSpec) -> list[Problem]:
    """Legal but likely to wait: two tasks that may run at once share a ReadWriteOnce
    workspace. A ReadWriteOnce volume attaches to one node, so if the scheduler puts
    them on different nodes the second pod waits (Multi-Attach) until the first ends."""
    found: list[Problem] = []
    main = Graph.build((t.name, t.depends_on) for t in spec.tasks)
    for ws in spec.workspaces:
        if "ReadWriteOnce" not in ws.volume_claim_template.spec.access_modes or {
            "ReadWriteMany",
            "ReadOnlyMany",
        } & set(ws.volume_claim_template.spec.access_modes):
            continue
        users = [
            t.name
            for t in spec.tasks
            if t.container and any(m.name == ws.name for m in t.container.volume_mounts)
        ]
        for i, a in enumerate(users):
            for b in users[i + 1 :]:
                if not (main.is_upstream(a, b) or main.is_upstream(b, a)):
                    found.append(
                        Problem(
                            b,
                            f"workspace {ws.name!r} is ReadWriteOnce and tasks {a!r} and "
                            f"{b!r} may run at once: on two nodes the second waits until "
                            "the first ends. Order them with dependsOn, use ReadWriteMany, "
                            "or pin both to one node with podTemplate.nodeSelector",
                        )
                    )
    return found


def validate(spec: WorkflowSpec) -> list[Problem]:
    """Every semantic problem of ``spec``; an empty list means it can run."""
    problems: list[Problem] = []
    names = Counter(t.name for t in spec.all_tasks())
    for name, count in names.items():
        if count > 1:
            problems.append(Problem(name, f"task name is used {count} times"))
    param_names = Counter(p.name for p in spec.params)
    for name, count in param_names.items():
        if count > 1:
            problems.append(Problem(None, f"param {name!r} is declared {count} times"))

    main = Graph.build((t.name, t.depends_on) for t in spec.tasks)
    final = Graph.build((t.name, t.depends_on) for t in spec.finally_)
    known = set(names)
    problems += _graph_problems(spec.tasks, main, known, "main")
    problems += _graph_problems(spec.finally_, final, known, "finally")

    problems += _volume_problems(spec)

    params = set(param_names)
    main_names = set(main.deps)
    for task in spec.tasks:
        problems += _reference_problems(task, params, main, main_names, is_final=False)
    for task in spec.finally_:
        problems += _reference_problems(task, params, final, main_names, is_final=True)
    for task in spec.all_tasks():
        problems += [Problem(task.name, p) for p in field_problems(task, rendered=False)]
        problems += _fanout_problems(task)
    problems += _output_problems(spec, params, set(names))
    return problems


def _output_problems(spec: WorkflowSpec, params: set[str], tasks: set[str]) -> list[Problem]:
    """Workflow outputs read declared params and tasks of the workflow, nothing else."""
    problems: list[Problem] = []
    for name, count in Counter(o.name for o in spec.outputs).items():
        if count > 1:
            problems.append(Problem(None, f"outputs: {name!r} is declared {count} times"))
    for out in spec.outputs:
        where = f"outputs.{out.name}"
        try:
            refs = list(templates.refs_in(out.value))
        except templates.TemplateError as err:
            problems.append(Problem(None, f"{where}: {err}"))
            continue
        for ref in refs:
            if ref.kind == "param" and ref.name not in params:
                problems.append(Problem(None, f"{where}: reads unknown param {ref.name!r}"))
            elif ref.kind == "output" and ref.name not in tasks:
                problems.append(Problem(None, f"{where}: reads unknown task {ref.name!r}"))
            elif ref.kind == "item":
                problems.append(Problem(None, f"{where}: {{{{ {ref} }}}} is only known in a task"))
    return problems


def call_problems(
    root: str, workflows: Mapping[str, WorkflowSpec], *, all_known: bool
) -> list[Problem]:
    """``workflow`` tasks reachable from workflow ``root``: cycles and nesting deeper than
    MAX_CALL_DEPTH, each naming the chain; with ``all_known``, callees missing from
    ``workflows`` too (local mode runs children only from the files given)."""
    problems: dict[str, Problem] = {}
    walked: set[tuple[str, int]] = set()  # diamonds are walked once per depth

    def walk(name: str, chain: list[str]) -> None:
        spec = workflows.get(name)
        if spec is None or (name, len(chain)) in walked:
            return
        walked.add((name, len(chain)))
        for task in spec.all_tasks():
            if task.workflow is None:
                continue
            path = [*chain, task.workflow.name]
            shown = " -> ".join(path)
            if task.workflow.name in chain:
                problem = Problem(task.name, f"workflow calls form a cycle: {shown}")
            elif len(path) - 1 > MAX_CALL_DEPTH:
                problem = Problem(
                    task.name, f"workflow calls nest deeper than {MAX_CALL_DEPTH}: {shown}"
                )
            elif task.workflow.name not in workflows:
                if not all_known:
                    continue
                problem = Problem(
                    task.name,
                    f"calls workflow {task.workflow.name!r}, which is not among the files given",
                )
            else:
                walk(task.workflow.name, path)
                continue
            problems.setdefault(str(problem), problem)

    walk(root, [root])
    return list(problems.values())


def reads_of(task: Task) -> frozenset[str]:
    """Tasks whose outputs (or phase) ``task`` reads, in templates or ``when``."""
    names = (
        {r.name for r in expressions.parse(task.when) if r.root == "tasks"} if task.when else set()
    )
    for text in _template_strings(task):
        names.update(r.name for r in templates.refs_in(text) if r.kind == "output")
    return frozenset(names)


def plan(spec: WorkflowSpec) -> Plan:
    """Graphs, order and data flow of a spec that :func:`validate` accepted."""
    main = Graph.build((t.name, t.depends_on) for t in spec.tasks)
    final = Graph.build((t.name, t.depends_on) for t in spec.finally_)
    return Plan(
        main,
        final,
        tuple(main.topological_order() + final.topological_order()),
        {t.name: reads_of(t) for t in spec.all_tasks()},
    )


def resolve_params(
    spec: WorkflowSpec, given: Mapping[str, str]
) -> tuple[dict[str, str], list[str]]:
    """Merge a run's params over the declared defaults.

    Returns the values and the problems: undeclared params and required params
    without a value, each named.
    """
    declared = {p.name: p for p in spec.params}
    problems = [
        f"params.{name}: not declared by the workflow (declared: "
        f"{', '.join(sorted(declared)) or 'none'})"
        for name in given
        if name not in declared
    ]
    values: dict[str, str] = {}
    for name, param in declared.items():
        if name in given:
            values[name] = given[name]
        elif param.default is not None:
            values[name] = param.default
        else:
            problems.append(f"params.{name}: required (no default) but not given")
    return values, problems
