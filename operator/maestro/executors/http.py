"""HTTP tasks: one async request from the engine's process per attempt.

A JSON object in the response body becomes the outputs; any other body is kept as
``{"status": code, "body": text}``. The store's output cap applies to both.

On a cluster the request leaves from the operator's network position, so an
:class:`EgressPolicy` decides where it may go: the host is resolved once, every
address is checked, and the connection goes to the checked address (Host header
and TLS SNI keep the name), so DNS cannot answer differently between check and
connect. Redirects go through the same check (docs/security.md).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from maestro.api.models import HttpTask
from maestro.engine.executor import AttemptContext, Result, Wake
from maestro.executors.secrets import SecretReader, SecretUnavailable, run_service_account

DEFAULT_TIMEOUT_SECONDS = 30.0
# Bodies are read up to this many bytes; larger ones fail the task before the store sees them.
MAX_BODY_BYTES = 4 * 1024 * 1024
MAX_REDIRECTS = 5
REDACTED = "[redacted]"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# Denied unless an allow CIDR covers them: the operator's host, link-local (cloud
# metadata lives there), and addresses that are not one destination.
DEFAULT_DENY: dict[str, tuple[str, ...]] = {
    "loopback": ("127.0.0.0/8", "::1/128"),
    "link-local": ("169.254.0.0/16", "fe80::/10"),
    "cloud-metadata": ("100.100.100.200/32", "fd00:ec2::254/128"),
    "unspecified": ("0.0.0.0/8", "::/128"),
    "multicast": ("224.0.0.0/4", "ff00::/8"),
    "broadcast": ("255.255.255.255/32",),
}


class EgressDenied(Exception):
    """A request the egress policy refuses; the message names host, address and rule."""


def _normal(addr: Address) -> Address:
    # ::ffff:127.0.0.1 is 127.0.0.1 to the kernel: judge it as such.
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def own_addresses() -> set[Address]:
    """The operator pod's addresses: $POD_IP(S) (downward API) and its hostname's."""
    found: set[Address] = set()
    names = [os.environ.get("POD_IP", ""), *os.environ.get("POD_IPS", "").split(",")]
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None, proto=socket.IPPROTO_TCP)
        names += [str(info[4][0]) for info in infos]
    except OSError:
        pass  # no resolvable hostname: only the downward API's addresses
    for name in names:
        try:
            found.add(_normal(ipaddress.ip_address(name.strip().split("%")[0])))
        except ValueError:
            continue
    return found


@dataclass(frozen=True)
class EgressPolicy:
    """Where HTTP tasks may connect: ``deny`` wins, then ``allow``, then the defaults."""

    allow: tuple[Network, ...] = ()
    deny: tuple[Network, ...] = ()
    own: frozenset[Address] = field(default_factory=frozenset)

    @classmethod
    def of(
        cls, allow: Iterable[str] = (), deny: Iterable[str] = (), own: Iterable[Address] = ()
    ) -> EgressPolicy:
        """Parse CIDRs (``ValueError`` names a bad one)."""

        def nets(cidrs: Iterable[str], flag: str) -> tuple[Network, ...]:
            out = []
            for cidr in cidrs:
                try:
                    out.append(ipaddress.ip_network(cidr.strip(), strict=False))
                except ValueError as err:
                    raise ValueError(f"{flag} {cidr!r}: {err}") from None
            return tuple(out)

        return cls(
            nets(allow, "--egress-allow"),
            nets(deny, "--egress-deny"),
            frozenset(_normal(a) for a in own),
        )

    def refusal(self, addr: Address) -> str | None:
        """Why ``addr`` is refused (the rule), or None when it is allowed."""
        addr = _normal(addr)
        for net in self.deny:
            if addr.version == net.version and addr in net:
                return f"denied by --egress-deny {net}"
        for net in self.allow:
            if addr.version == net.version and addr in net:
                return None
        for rule, cidrs in DEFAULT_DENY.items():
            for cidr in cidrs:
                net = ipaddress.ip_network(cidr)
                if addr.version == net.version and addr in net:
                    return f"{rule} ({net}) is denied by default; --egress-allow lifts it"
        if addr in self.own:
            return "it is the operator's own address; --egress-allow lifts it"
        return None

    async def resolve(self, host: str, port: int) -> str:
        """The address to connect to: every address ``host`` resolves to must be allowed."""
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as err:
            raise EgressDenied(f"cannot resolve {host!r}: {err}") from None
        addrs = [_normal(ipaddress.ip_address(str(i[4][0]).split("%")[0])) for i in infos]
        for addr in addrs:
            why = self.refusal(addr)
            if why is not None:
                raise EgressDenied(f"egress to {host} ({addr}) refused: {why}")
        return str(addrs[0])


class _PinnedTransport(httpx.AsyncBaseTransport):
    """Connects to the address the policy checked, never to a second DNS answer."""

    def __init__(self, policy: EgressPolicy) -> None:
        self.policy = policy
        self.inner = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        port = request.url.port or (443 if request.url.scheme == "https" else 80)
        addr = await self.policy.resolve(host, port)
        # The Host header was set from the name when the request was built; SNI and
        # certificate checks use the name too, only the socket goes to the address.
        request.url = request.url.copy_with(host=addr)
        request.extensions = {**request.extensions, "sni_hostname": host}
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def egress_client(policy: EgressPolicy) -> httpx.AsyncClient:
    """The client of HTTP tasks on a cluster: every request and redirect is checked.

    No proxies from the environment: a proxy would connect on our behalf, unchecked.
    """
    return httpx.AsyncClient(
        transport=_PinnedTransport(policy),
        follow_redirects=True,
        max_redirects=MAX_REDIRECTS,
        trust_env=False,
    )


def _redact(value: Any, secrets: list[str]) -> Any:
    """``value`` (a string, or JSON-like) with every Secret value replaced by REDACTED.

    Applied to the raw body (before parsing, so snippets are clean) and again to the
    parsed outputs (where JSON escapes no longer hide a value).
    """
    if not secrets:
        return value
    if isinstance(value, str):
        for secret in secrets:
            if secret:
                value = value.replace(secret, REDACTED)
        return value
    if isinstance(value, dict):
        return {_redact(k, secrets): _redact(v, secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(v, secrets) for v in value]
    return value


def _key(ctx: AttemptContext) -> tuple[str, str, int]:
    return (ctx.run.id, ctx.task.name, ctx.attempt)


class HttpExecutor:
    """Calls ``url`` with httpx; expected codes default to any 2xx."""

    def __init__(self, secrets: SecretReader, wake: Wake, client: httpx.AsyncClient) -> None:
        """``client`` is shared by every attempt (connection pooling); closed by the owner."""
        self.secrets = secrets
        self.wake = wake
        self.client = client
        self._calls: dict[tuple[str, str, int], asyncio.Task[Result]] = {}

    def handle(self, ctx: AttemptContext) -> str | None:
        """HTTP calls have no external object."""
        return None

    async def start(self, ctx: AttemptContext) -> None:
        """Send the request in the background; :meth:`poll` collects the result."""
        key = _key(ctx)
        if key in self._calls:
            return
        call = asyncio.create_task(self._call(ctx))
        self._calls[key] = call
        call.add_done_callback(lambda _: self.wake(ctx.run.id))

    async def _call(self, ctx: AttemptContext) -> Result:
        spec = ctx.task.http
        assert spec is not None
        try:
            headers, secrets = await self._headers(ctx, spec)
        except SecretUnavailable as err:
            return Result.failed(f"header: {err}", "InputError")
        result = await self._send(ctx, spec, headers, secrets)
        # A server may echo what it was sent: no Secret value reaches status or the store.
        return Result(
            result.phase,
            _redact(result.message, secrets),
            result.reason,
            _redact(result.outputs, secrets),
        )

    async def _send(
        self, ctx: AttemptContext, spec: HttpTask, headers: Mapping[str, str], secrets: list[str]
    ) -> Result:
        timeout = float(ctx.task.timeout_seconds or DEFAULT_TIMEOUT_SECONDS)
        try:
            async with self.client.stream(
                spec.method,
                spec.url,
                headers=headers,
                content=spec.body.encode() if spec.body is not None else None,
                timeout=timeout,
            ) as response:
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_BODY_BYTES:
                        return Result.failed(
                            f"{spec.method} {spec.url}: response body is over "
                            f"{MAX_BODY_BYTES} bytes",
                            "OutputsTooLarge",
                        )
        except EgressDenied as err:
            return Result.failed(f"{spec.method} {spec.url}: {err}", "EgressDenied")
        except httpx.TimeoutException:
            return Result.failed(
                f"{spec.method} {spec.url}: no response within {timeout:g}s", "TimedOut"
            )
        except httpx.HTTPError as err:
            return Result.failed(f"{spec.method} {spec.url}: {type(err).__name__}: {err}")
        except (httpx.InvalidURL, UnicodeError, ValueError) as err:
            # What the engine's checks of the rendered task let through, httpx may refuse.
            return Result.failed(
                f"{spec.method} {spec.url}: the request cannot be sent: {err}", "InputError"
            )
        return _result(
            spec, response.status_code, _redact(bytes(body).decode(errors="replace"), secrets)
        )

    async def _headers(
        self, ctx: AttemptContext, spec: HttpTask
    ) -> tuple[dict[str, str], list[str]]:
        """The headers and the Secret values among them (to keep out of results)."""
        headers: dict[str, str] = {}
        secrets: list[str] = []
        for h in spec.headers:
            if h.value is not None:
                headers[h.name] = h.value
            elif h.value_from is not None:
                ref = h.value_from.secret_key_ref
                value = await self.secrets.read(
                    ctx.run.namespace,
                    ref.name,
                    ref.key,
                    service_account=run_service_account(ctx.run.spec),
                )
                headers[h.name] = value
                secrets.append(value)
        return headers, secrets

    async def poll(self, ctx: AttemptContext) -> Result | None:
        """The call's result; an attempt with no call in this process was interrupted."""
        call = self._calls.get(_key(ctx))
        if call is None:
            return Result.failed(
                "the engine restarted during the HTTP call, so its outcome is unknown; "
                "it is not repeated (retries may run it again)",
                "Interrupted",
            )
        if not call.done():
            return None
        del self._calls[_key(ctx)]
        if call.cancelled():
            return Result.failed("the HTTP call was cancelled", "Interrupted")
        err = call.exception()
        if err is not None:  # a bug, not the task's fault: still, the attempt ends
            return Result.failed(f"{spec_line(ctx)}: {type(err).__name__}: {err}")
        return call.result()

    async def stop(self, ctx: AttemptContext) -> None:
        """Cancel the request if it is still in flight."""
        call = self._calls.pop(_key(ctx), None)
        if call is not None:
            call.cancel()


def spec_line(ctx: AttemptContext) -> str:
    """``METHOD url`` of an attempt, as messages start."""
    spec = ctx.task.http
    return f"{spec.method} {spec.url}" if spec is not None else ctx.task.name


def _result(spec: HttpTask, status: int, text: str) -> Result:
    ok = status in spec.expected_status if spec.expected_status else 200 <= status < 300
    if not ok:
        expected = ", ".join(map(str, spec.expected_status)) or "2xx"
        snippet = text.strip().replace("\n", " ")[:200]
        return Result.failed(
            f"{spec.method} {spec.url}: status {status}, expected {expected}: {snippet}",
            "UnexpectedStatus",
        )
    outputs: dict[str, Any]
    try:
        value = json.loads(text) if text.strip() else None
    except json.JSONDecodeError:
        value = None
    outputs = value if isinstance(value, dict) else {"status": status, "body": text}
    return Result.succeeded(outputs, f"status {status}")
