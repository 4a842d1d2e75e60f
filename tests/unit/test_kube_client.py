"""The API client: what it reads of a kubeconfig, what it sends, how it reads answers.

A real HTTP server on 127.0.0.1 stands in for the API server (TLS and client
certificates are exercised against the real one in tests/e2e/test_control_plane.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from maestro.k8s import config
from maestro.k8s.client import Kube, NotFound, PermanentAPIError, TransientAPIError, load_config
from maestro.k8s.config import ConfigError, current_namespace, load

REPO = Path(__file__).resolve().parents[2]


def kubeconfig(
    path: Path, server: str, user: dict[str, Any], *, namespace: str | None = None
) -> Path:
    context: dict[str, Any] = {"cluster": "c", "user": "u"}
    if namespace:
        context["namespace"] = namespace
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": server}}],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "x", "context": context}],
        "current-context": "x",
    }
    path.write_text(yaml.safe_dump(doc))
    return path


@dataclass
class FakeServer:
    """Records each request's method, path, query and Authorization; answers as told."""

    url: str = ""
    seen: list[tuple[str, str, dict[str, str], str | None, bytes]] = field(default_factory=list)
    # path -> (status, JSON body) for the next requests to it
    answers: dict[str, tuple[int, Any]] = field(default_factory=dict)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.seen.append(
            (
                request.method,
                request.rel_url.raw_path,  # as sent: percent-encoding kept
                dict(request.query),
                request.headers.get("Authorization"),
                body,
            )
        )
        status, answer = self.answers.get(request.rel_url.raw_path, (200, {"kind": "Status"}))
        return web.json_response(answer, status=status)


@pytest.fixture
async def server() -> AsyncIterator[FakeServer]:
    fake = FakeServer()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    fake.url = f"http://127.0.0.1:{port}"
    try:
        yield fake
    finally:
        await runner.cleanup()


@pytest.fixture(autouse=True)
def _no_cluster_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"HTTPS_PROXY": "http://proxy.example:3128"}, "http://proxy.example:3128"),
        ({"HTTPS_PROXY": "http://proxy.example:3128", "NO_PROXY": "10.9.8.7"}, None),
    ],
)
async def test_the_proxy_is_looked_up_once_and_the_session_does_not_look_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: dict[str, str], expected: str | None
) -> None:
    for name in ("HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    path = kubeconfig(tmp_path / "kc", "https://10.9.8.7:6443", {"token": "t"})
    api = await load_config(str(path))
    try:
        assert api.proxy == expected
        assert api.session.trust_env is False
    finally:
        await api.close()
    assert api.session.closed


async def test_requests_carry_the_token_and_answers_are_typed(
    tmp_path: Path, server: FakeServer
) -> None:
    path = kubeconfig(tmp_path / "kc", server.url, {"token": "sekret"})
    server.answers["/api/v1/namespaces/ns/pods/gone"] = (
        404,
        {"kind": "Status", "message": 'pods "gone" not found', "reason": "NotFound"},
    )
    server.answers["/api/v1/namespaces/ns/pods"] = (409, {"reason": "AlreadyExists"})
    server.answers["/apis/maestro.dev/v1alpha1/namespaces/ns/workflowruns"] = (
        422,
        {"message": "spec.params: Invalid value", "reason": "Invalid"},
    )
    async with await load_config(str(path)) as api:
        kube = Kube(api)
        with pytest.raises(NotFound) as missing:
            await kube.get_pod("ns", "gone")
        assert missing.value.message == 'pods "gone" not found'
        assert missing.value.what == "pod ns/gone"
        # A pod that exists already is no error to the executor: it is its own.
        assert await kube.create_pod("ns", {"metadata": {"name": "p"}}) is False
        with pytest.raises(PermanentAPIError, match=r"spec\.params: Invalid value"):
            await kube.create_run("ns", {"metadata": {"name": "r"}})
        await kube.patch_run_spec("ns", "r", {"spec": {"cancel": True}}, field_manager="alice")
    assert {auth for *_, auth, _ in server.seen} == {"Bearer sekret"}
    method, path_, query, _, body = server.seen[-1]
    assert (method, path_, query) == (
        "PATCH",
        "/apis/maestro.dev/v1alpha1/namespaces/ns/workflowruns/r",
        {"fieldManager": "alice"},
    )
    assert json.loads(body) == {"spec": {"cancel": True}}


async def test_a_hostile_name_stays_one_path_segment(tmp_path: Path, server: FakeServer) -> None:
    path = kubeconfig(tmp_path / "kc", server.url, {"token": "t"})
    async with await load_config(str(path)) as api:
        await Kube(api).get_run("ns", "../../../api/v1/namespaces/kube-system/secrets/x")
    assert server.seen[-1][1] == (
        "/apis/maestro.dev/v1alpha1/namespaces/ns/workflowruns/"
        "..%2F..%2F..%2Fapi%2Fv1%2Fnamespaces%2Fkube-system%2Fsecrets%2Fx"
    )


async def test_a_token_file_is_read_relative_to_the_kubeconfig_and_again_after_401(
    tmp_path: Path, server: FakeServer
) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "token").write_text("first\n")
    path = kubeconfig(tmp_path / "sub" / "kc", server.url, {"tokenFile": "token"})
    server.answers["/version"] = (401, {"reason": "Unauthorized"})
    async with await load_config(str(path)) as api:
        kube = Kube(api)
        with pytest.raises(PermanentAPIError):
            await kube.version()
        (tmp_path / "sub" / "token").write_text("second\n")  # rotated
        server.answers["/version"] = (200, {"gitVersion": "v1.31.0"})
        assert await kube.version() == "v1.31.0"
    assert [auth for *_, auth, _ in server.seen] == ["Bearer first", "Bearer second"]


async def test_an_exec_plugin_gives_the_token_and_is_run_once_while_it_lasts(
    tmp_path: Path, server: FakeServer
) -> None:
    runs = tmp_path / "runs"
    plugin = tmp_path / "plugin.sh"
    credential = {
        "apiVersion": "client.authentication.k8s.io/v1",
        "kind": "ExecCredential",
        "status": {"token": "from-exec", "expirationTimestamp": "2999-01-01T00:00:00Z"},
    }
    plugin.write_text(
        f"#!/bin/sh\necho \"$1 $GREETING\" >> {runs}\necho '{json.dumps(credential)}'\n"
    )
    plugin.chmod(plugin.stat().st_mode | stat.S_IXUSR)
    exec_user = {
        "exec": {
            "apiVersion": "client.authentication.k8s.io/v1",
            "command": "./plugin.sh",
            "args": ["hello"],
            "env": [{"name": "GREETING", "value": "world"}],
        }
    }
    path = kubeconfig(tmp_path / "kc", server.url, exec_user)
    async with await load_config(str(path)) as api:
        kube = Kube(api)
        await kube.get_run("ns", "a")
        await kube.get_run("ns", "b")
    assert [auth for *_, auth, _ in server.seen] == ["Bearer from-exec"] * 2
    assert runs.read_text().split("\n") == ["hello world", ""]


async def test_a_failing_exec_plugin_fails_the_request_naming_it(
    tmp_path: Path, server: FakeServer
) -> None:
    user = {"exec": {"command": "sh", "args": ["-c", "echo denied >&2; exit 3"]}}
    path = kubeconfig(tmp_path / "kc", server.url, user)
    async with await load_config(str(path)) as api:
        with pytest.raises(
            TransientAPIError, match="no credentials: exec plugin sh exited 3: denied"
        ):
            await Kube(api).get_run("ns", "a")
    assert server.seen == []


def test_kubeconfig_lists_merge_as_kubectl_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = kubeconfig(tmp_path / "a", "https://one:6443", {"token": "t1"}, namespace="team-a")
    second = tmp_path / "b"
    second.write_text(
        yaml.safe_dump(
            {
                "current-context": "other",
                "clusters": [{"name": "c", "cluster": {"server": "https://two:6443"}}],
                "users": [{"name": "u", "user": {"token": "t2"}}],
            }
        )
    )
    monkeypatch.setenv("KUBECONFIG", f"{first}:{tmp_path / 'missing'}:{second}")
    creds = load()
    # The first file's current-context and entries win.
    assert (creds.server, creds.token, creds.namespace) == ("https://one:6443", "t1", "team-a")
    assert current_namespace() == "team-a"


@pytest.mark.parametrize(
    ("doc", "says"),
    [
        ({"contexts": []}, "no current-context"),
        ({"current-context": "x", "contexts": []}, "'x' is not among its contexts"),
        (
            {"current-context": "x", "contexts": [{"name": "x", "context": {"cluster": "k"}}]},
            "cluster 'k' is not in the kubeconfig",
        ),
        (
            {
                "current-context": "x",
                "contexts": [{"name": "x", "context": {"cluster": "k"}}],
                "clusters": [{"name": "k", "cluster": {"certificate-authority-data": "@@"}}],
            },
            "cluster 'k' has no server",
        ),
        ("[1, 2", "is not YAML"),
    ],
)
def test_a_broken_kubeconfig_is_refused_saying_why(tmp_path: Path, doc: Any, says: str) -> None:
    path = tmp_path / "kc"
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=says):
        load(str(path))


def test_no_kubeconfig_anywhere_says_how_to_give_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ConfigError, match="set KUBECONFIG or pass --kubeconfig"):
        load()


async def test_conflict_on_a_named_event_counts_as_posted(
    tmp_path: Path, server: FakeServer
) -> None:
    path = kubeconfig(tmp_path / "kc", server.url, {"token": "t"})
    server.answers["/api/v1/namespaces/ns/events"] = (409, {"reason": "AlreadyExists"})
    run: dict[str, Any] = {
        "apiVersion": "maestro.dev/v1alpha1",
        "kind": "WorkflowRun",
        "metadata": {"name": "r", "namespace": "ns", "uid": "u-1"},
    }
    async with await load_config(str(path)) as api:
        await Kube(api).emit_event(run, reason="Started", message="go", name="r.started")
    event = json.loads(server.seen[-1][4])
    assert event["metadata"] == {"name": "r.started", "namespace": "ns"}
    assert event["involvedObject"]["uid"] == "u-1"
    assert event["firstTimestamp"].endswith("Z")


async def test_in_a_pod_the_service_account_is_used_and_its_token_read_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mounted = tmp_path / "serviceaccount"
    mounted.mkdir()
    (mounted / "token").write_text("one")
    (mounted / "namespace").write_text("team-a\n")
    monkeypatch.setattr(config, "IN_CLUSTER", mounted)
    monkeypatch.setattr(config, "TOKEN_FILE_SECONDS", 0.0)  # every request reads it
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "fd00::1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "6443")
    creds = load()
    assert (creds.server, creds.namespace) == ("https://[fd00::1]:6443", "team-a")
    assert current_namespace() == "team-a"
    assert await creds.authorization() == "Bearer one"
    (mounted / "token").write_text("two")  # the kubelet rotated it
    assert await creds.authorization() == "Bearer two"
    # An explicit kubeconfig wins over the pod's account, as with kubectl.
    path = kubeconfig(tmp_path / "kc", "https://elsewhere:6443", {"token": "t"})
    assert load(str(path)).server == "https://elsewhere:6443"


async def test_the_cli_reports_a_refusal_in_one_line_naming_the_object(
    tmp_path: Path, server: FakeServer
) -> None:
    path = kubeconfig(tmp_path / "kc", server.url, {"token": "t"}, namespace="team-a")
    server.answers["/apis/maestro.dev/v1alpha1/namespaces/team-a/workflowruns/nightly"] = (
        403,
        {"message": 'workflowruns "nightly" is forbidden: User "bob" cannot get', "reason": "x"},
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "maestro",
        "get",
        "nightly",
        "--kubeconfig",
        str(path),
        env={**os.environ, "PYTHONPATH": str(REPO / "operator")},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 1, (out, err)
    assert err.decode().strip() == (
        'Error: workflowrun team-a/nightly: workflowruns "nightly" is forbidden: '
        'User "bob" cannot get'
    )


async def test_a_hung_exec_plugin_is_stopped_and_named(
    tmp_path: Path, server: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(config, "EXEC_TIMEOUT", 0.5)
    pid_file = tmp_path / "pid"
    user = {"exec": {"command": "sh", "args": ["-c", f"echo $$ > {pid_file}; exec sleep 60"]}}
    path = kubeconfig(tmp_path / "kc", server.url, user)
    async with await load_config(str(path)) as api:
        with pytest.raises(TransientAPIError, match="exec plugin sh gave no credential within"):
            await Kube(api).get_run("ns", "a")
    pid = int(pid_file.read_text())
    assert not Path(f"/proc/{pid}").exists()  # killed and reaped, not left behind
    assert server.seen == []


async def test_a_log_the_kubelet_cannot_serve_is_no_log_to_follow(
    tmp_path: Path, server: FakeServer
) -> None:
    path = kubeconfig(tmp_path / "kc", server.url, {"token": "t"})
    refused = (500, {"message": "dial tcp 127.0.0.1:10250: connect: connection refused"})
    server.answers["/api/v1/namespaces/ns/pods/p/log"] = refused
    async with await load_config(str(path)) as api:
        kube = Kube(api)
        with pytest.raises(NotFound, match="connection refused"):
            async for _ in kube.follow_pod_log("ns", "p"):
                pass
        with pytest.raises(NotFound, match="connection refused"):
            await kube.pod_log("ns", "p")
    assert [query for _, _, query, _, _ in server.seen] == [{"follow": "true"}, {}]
