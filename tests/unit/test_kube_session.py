"""The API client reads the environment once: no proxy or netrc lookup per request."""

from __future__ import annotations

from pathlib import Path

import pytest

from maestro.k8s.client import load_config

KUBECONFIG = """
apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://10.9.8.7:6443", insecure-skip-tls-verify: true}}]
users: [{name: u, user: {token: t}}]
contexts: [{name: x, context: {cluster: c, user: u}}]
current-context: x
"""


@pytest.fixture
def kubeconfig(tmp_path: Path) -> str:
    path = tmp_path / "kubeconfig"
    path.write_text(KUBECONFIG)
    return str(path)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"HTTPS_PROXY": "http://proxy.example:3128"}, "http://proxy.example:3128"),
        ({"HTTPS_PROXY": "http://proxy.example:3128", "NO_PROXY": "10.9.8.7"}, None),
    ],
)
async def test_the_proxy_is_looked_up_once_and_the_session_does_not_look_again(
    kubeconfig: str, monkeypatch: pytest.MonkeyPatch, env: dict[str, str], expected: str | None
) -> None:
    for name in ("HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    api = await load_config(kubeconfig)
    try:
        assert api.rest_client.proxy == expected
        session = api.rest_client.pool_manager
        assert session.trust_env is False
        assert session.connector is not None
        assert not session.closed
    finally:
        await api.close()
    assert api.rest_client.pool_manager.closed
