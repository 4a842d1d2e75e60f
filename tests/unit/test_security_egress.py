"""HTTP egress policy: default denials, allow/deny CIDRs, pinned address, redirects, redaction."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from security_kit import attempt

from maestro.engine.executor import Result
from maestro.executors.http import EgressPolicy, HttpExecutor, egress_client
from maestro.executors.secrets import SecretUnavailable


@pytest.mark.parametrize(
    ("address", "rule"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("100.100.100.200", "cloud-metadata"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
    ],
)
def test_default_denials_name_the_rule(address: str, rule: str) -> None:
    why = EgressPolicy.of().refusal(ipaddress.ip_address(address))
    assert (why or "").startswith(rule), why


def test_public_address_allowed_and_own_address_denied() -> None:
    own = ipaddress.ip_address("10.1.2.3")
    policy = EgressPolicy.of(own=[own])
    assert policy.refusal(ipaddress.ip_address("93.184.216.34")) is None
    assert policy.refusal(ipaddress.ip_address("10.1.2.4")) is None
    assert "operator's own address" in (policy.refusal(own) or "")


def test_allow_lifts_a_default_and_deny_wins_over_allow() -> None:
    policy = EgressPolicy.of(allow=["127.0.0.0/8"], deny=["127.0.0.9/32", "10.0.0.0/8"])
    assert policy.refusal(ipaddress.ip_address("127.0.0.2")) is None
    assert (
        policy.refusal(ipaddress.ip_address("127.0.0.9")) == "denied by --egress-deny 127.0.0.9/32"
    )
    assert "--egress-deny 10.0.0.0/8" in (policy.refusal(ipaddress.ip_address("10.9.9.9")) or "")


def test_bad_cidr_names_the_flag() -> None:
    with pytest.raises(ValueError, match="--egress-allow 'nonsense'"):
        EgressPolicy.of(allow=["nonsense"])


class _Echo(BaseHTTPRequestHandler):
    """Echoes the Host and X-Token headers; /jump redirects to the Location in the query."""

    def do_GET(self) -> None:
        if self.path.startswith("/jump?to="):
            self.send_response(302)
            self.send_header("Location", self.path.split("=", 1)[1])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = json.dumps(
            {"host": self.headers.get("Host"), "token": self.headers.get("X-Token")}
        ).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet."""


def _serve(host: str) -> Iterator[int]:
    httpd = ThreadingHTTPServer((host, 0), _Echo)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(httpd.server_address[1])
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def allowed_port() -> Iterator[int]:
    """A server on 127.0.0.2, the one loopback address the tests' policy allows."""
    yield from _serve("127.0.0.2")


@pytest.fixture
def denied_port() -> Iterator[int]:
    """A server on 127.0.0.1, which stays denied (loopback)."""
    yield from _serve("127.0.0.1")


POLICY = EgressPolicy.of(allow=["127.0.0.2/32"])


class _Secrets:
    async def read(self, namespace: str, name: str, key: str, *, service_account: str) -> str:
        if service_account != "robot":
            raise SecretUnavailable(f"{service_account} may not")
        return 's3cr"3t-value'  # a quote: the echo JSON-escapes it


async def _call(url: str, headers: list[dict[str, object]] | None = None) -> Result:
    woke: list[str] = []
    async with egress_client(POLICY) as client:
        executor = HttpExecutor(_Secrets(), woke.append, client)
        ctx = attempt({"name": "call", "http": {"url": url, "headers": headers or []}})
        await executor.start(ctx)
        for _ in range(200):
            result = await executor.poll(ctx)
            if result is not None:
                return result
            await asyncio.sleep(0.02)
    raise AssertionError("no result")


async def test_operator_metrics_on_loopback_refused_naming_the_rule(denied_port: int) -> None:
    result = await _call(f"http://127.0.0.1:{denied_port}/metrics")
    assert result.reason == "EgressDenied"
    assert "egress to 127.0.0.1 (127.0.0.1) refused: loopback (127.0.0.0/8)" in result.message


async def test_name_resolving_to_loopback_refused() -> None:
    result = await _call("http://localhost:9/")
    assert result.reason == "EgressDenied"
    assert "egress to localhost" in result.message
    assert "loopback" in result.message


async def test_connects_to_checked_address_keeping_the_host_header(allowed_port: int) -> None:
    result = await _call(f"http://127.0.0.2:{allowed_port}/")
    assert result.outputs == {"host": f"127.0.0.2:{allowed_port}", "token": None}


async def test_redirect_to_a_denied_address_is_refused(allowed_port: int, denied_port: int) -> None:
    target = f"http://127.0.0.1:{denied_port}/metrics"
    result = await _call(f"http://127.0.0.2:{allowed_port}/jump?to={target}")
    assert result.reason == "EgressDenied", result
    assert "127.0.0.1" in result.message
    assert "loopback" in result.message


async def test_redirect_to_an_allowed_address_is_followed(allowed_port: int) -> None:
    target = f"http://127.0.0.2:{allowed_port}/final"
    result = await _call(f"http://127.0.0.2:{allowed_port}/jump?to={target}")
    assert result.outputs is not None
    assert result.outputs["host"] == f"127.0.0.2:{allowed_port}"


async def test_secret_echoed_by_the_server_is_redacted(allowed_port: int) -> None:
    header = {"name": "X-Token", "valueFrom": {"secretKeyRef": {"name": "api", "key": "t"}}}
    result = await _call(f"http://127.0.0.2:{allowed_port}/", [header])
    assert result.outputs == {"host": f"127.0.0.2:{allowed_port}", "token": "[redacted]"}
    assert "s3cr" not in str(result.outputs) + result.message
