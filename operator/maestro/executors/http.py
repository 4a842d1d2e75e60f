"""HTTP tasks: one async request from the engine's process per attempt.

A JSON object in the response body becomes the outputs; any other body is kept as
``{"status": code, "body": text}``. The store's output cap applies to both.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx

from maestro.api.models import HttpTask
from maestro.engine.executor import AttemptContext, Result, Wake
from maestro.executors.secrets import SecretReader, SecretUnavailable

DEFAULT_TIMEOUT_SECONDS = 30.0
# Bodies are read up to this many bytes; larger ones fail the task before the store sees them.
MAX_BODY_BYTES = 4 * 1024 * 1024


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
            headers = await self._headers(ctx, spec)
        except SecretUnavailable as err:
            return Result.failed(f"header: {err}", "InputError")
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
        return _result(spec, response.status_code, bytes(body))

    async def _headers(self, ctx: AttemptContext, spec: HttpTask) -> dict[str, str]:
        headers: dict[str, str] = {}
        for h in spec.headers:
            if h.value is not None:
                headers[h.name] = h.value
            elif h.value_from is not None:
                ref = h.value_from.secret_key_ref
                headers[h.name] = await self.secrets.read(ctx.run.namespace, ref.name, ref.key)
        return headers

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


def _result(spec: HttpTask, status: int, body: bytes) -> Result:
    ok = status in spec.expected_status if spec.expected_status else 200 <= status < 300
    text = body.decode(errors="replace")
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
