"""Where the API server is and who we are to it: a kubeconfig or the pod's service account.

What kubectl reads, in the order it reads it: an explicit ``--kubeconfig``, else
``$KUBECONFIG`` (a list of files; for each entry the first file that has it wins),
else ``~/.kube/config``; inside a pod with none of those, the service account's token
and CA. Credentials: a bearer token (inline or ``tokenFile``), a client certificate
(inline or by path), basic auth, or an ``exec`` plugin (``client.authentication.k8s.io``
ExecCredential, as EKS and GKE configure). Paths in a kubeconfig are relative to the
file they are written in. Tokens that rotate (a projected service-account token, an
exec plugin's) are read again when they may have changed; nothing here is logged.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import ssl
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

IN_CLUSTER = Path("/var/run/secrets/kubernetes.io/serviceaccount")
# A projected service-account token is rotated by the kubelet; client-go reads it again
# every minute, and so do we.
TOKEN_FILE_SECONDS = 60.0
# An exec credential without an expiry is used this long before the plugin runs again.
EXEC_SECONDS = 300.0
EXEC_TIMEOUT = 60.0


class ConfigError(Exception):
    """The kubeconfig (or the pod's service account) cannot say how to reach the API."""


def in_cluster(kubeconfig: str | None) -> bool:
    """Whether to use the pod's service account: in a pod, with no kubeconfig asked for."""
    return (
        kubeconfig is None
        and "KUBERNETES_SERVICE_HOST" in os.environ
        and not os.environ.get("KUBECONFIG")
    )


@dataclass
class Credentials:
    """How to reach the API server and authenticate to it."""

    server: str
    ssl: ssl.SSLContext | bool  # False: insecure-skip-tls-verify
    namespace: str = "default"
    server_name: str | None = None  # tls-server-name
    proxy: str | None = None  # the cluster's proxy-url
    token: str | None = None
    token_file: Path | None = None
    basic: tuple[str, str] | None = None
    exec_plugin: Mapping[str, Any] | None = None
    base: Path = field(default_factory=Path.cwd)  # where the kubeconfig's paths start
    # (Authorization value, monotonic expiry) of a rotating token
    _cached: tuple[str, float] | None = field(default=None, init=False, repr=False)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock, init=False, repr=False)

    async def authorization(self) -> str | None:
        """The Authorization header's value now (None: the client certificate speaks)."""
        if self.token is not None:
            return f"Bearer {self.token}"
        if self.basic is not None:
            raw = f"{self.basic[0]}:{self.basic[1]}".encode()
            return f"Basic {base64.b64encode(raw).decode()}"
        if self.token_file is None and self.exec_plugin is None:
            return None
        cached = self._cached
        if cached is not None and time.monotonic() < cached[1]:
            return cached[0]
        async with self._lock:
            if self._cached is None or time.monotonic() >= self._cached[1]:
                self._cached = await self._refresh()
            return self._cached[0]

    def expire(self) -> None:
        """Read a rotating token again before the next request (the API server refused
        it: 401)."""
        if self._cached is not None:
            self._cached = (self._cached[0], 0.0)

    async def _refresh(self) -> tuple[str, float]:
        if self.token_file is not None:
            try:
                token = self.token_file.read_text(encoding="utf-8").strip()
            except OSError as err:
                if self._cached is not None:  # mid-rotation: the last token, a little longer
                    return self._cached[0], time.monotonic() + 1.0
                raise ConfigError(f"cannot read the token file {self.token_file}: {err}") from None
            return f"Bearer {token}", time.monotonic() + TOKEN_FILE_SECONDS
        assert self.exec_plugin is not None
        status = await _run_exec(self.exec_plugin, self.base)
        token = str(status.get("token") or "")
        if not token:
            raise ConfigError(
                "the exec plugin gave no token (client certificates from exec are not supported)"
            )
        until = EXEC_SECONDS
        expiry = status.get("expirationTimestamp")
        if expiry:
            left = datetime.fromisoformat(str(expiry).replace("Z", "+00:00")).timestamp()
            until = max(0.0, left - time.time() - 10)  # a little early: the clock may drift
        return f"Bearer {token}", time.monotonic() + until


def load(kubeconfig: str | None = None) -> Credentials:
    """The credentials kubectl would use (see the module's docstring)."""
    with _readable():
        if in_cluster(kubeconfig):
            return _service_account()
        return _from_kubeconfig(_kubeconfig_paths(kubeconfig))


def current_namespace(kubeconfig: str | None = None) -> str:
    """The namespace kubectl would use: the current context's, else ``default``.

    In a pod without a kubeconfig, the pod's own namespace.
    """
    with _readable():
        if in_cluster(kubeconfig):
            return _own_namespace()
        context, _ = _context(_merged(_kubeconfig_paths(kubeconfig)))
        return str(context.get("namespace") or "default")


@contextlib.contextmanager
def _readable() -> Iterator[None]:
    """A file that cannot be read, bad base64 or PEM, an entry of the wrong shape: one
    :class:`ConfigError` that says so."""
    try:
        yield
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ConfigError(f"cannot use the kubeconfig: {type(err).__name__}: {err}") from None


def _own_namespace() -> str:
    ns = IN_CLUSTER / "namespace"
    return (ns.read_text(encoding="utf-8").strip() if ns.exists() else "") or "default"


def _service_account() -> Credentials:
    host = os.environ["KUBERNETES_SERVICE_HOST"]
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    if ":" in host:
        host = f"[{host}]"  # IPv6
    token = IN_CLUSTER / "token"
    if not token.exists():
        raise ConfigError(f"in a pod, but {token} is missing: is a service account token mounted?")
    ca = IN_CLUSTER / "ca.crt"
    return Credentials(
        server=f"https://{host}:{port}",
        ssl=ssl.create_default_context(cafile=str(ca) if ca.exists() else None),
        namespace=_own_namespace(),
        token_file=token,
    )


def _kubeconfig_paths(kubeconfig: str | None) -> list[Path]:
    value = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
    paths = [Path(p).expanduser() for p in value.split(os.pathsep) if p.strip()]
    if not any(p.exists() for p in paths):
        raise ConfigError(f"no kubeconfig at {value} (set KUBECONFIG or pass --kubeconfig)")
    return paths


# (merged document, directory each named entry came from)
_Merged = tuple[dict[str, Any], dict[tuple[str, str], Path]]


def _merged(paths: list[Path]) -> _Merged:
    """kubectl's merge: for each named cluster, user and context the first file wins."""
    merged: dict[str, Any] = {"clusters": {}, "users": {}, "contexts": {}, "current-context": None}
    origin: dict[tuple[str, str], Path] = {}
    for path in paths:
        if not path.exists():
            continue
        try:
            doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"kubeconfig {path} is not YAML: {err}") from None
        if not isinstance(doc, dict):
            raise ConfigError(f"kubeconfig {path} is not a mapping")
        merged["current-context"] = merged["current-context"] or doc.get("current-context")
        for kind, inner in (("clusters", "cluster"), ("users", "user"), ("contexts", "context")):
            for item in doc.get(kind) or []:
                name = item.get("name") if isinstance(item, dict) else None
                if name is not None and name not in merged[kind]:
                    merged[kind][name] = item.get(inner) or {}
                    origin[(kind, name)] = path.resolve().parent
    return merged, origin


def _context(merged: _Merged) -> tuple[dict[str, Any], str]:
    doc = merged[0]
    name = doc["current-context"]
    if not name:
        raise ConfigError("the kubeconfig has no current-context")
    if name not in doc["contexts"]:
        raise ConfigError(f"the kubeconfig's current-context {name!r} is not among its contexts")
    return doc["contexts"][name], name


def _from_kubeconfig(paths: list[Path]) -> Credentials:
    merged = _merged(paths)
    doc, origin = merged
    context, name = _context(merged)
    cluster_name, user_name = str(context.get("cluster")), str(context.get("user"))
    if cluster_name not in doc["clusters"]:
        raise ConfigError(f"context {name!r}: cluster {cluster_name!r} is not in the kubeconfig")
    cluster = doc["clusters"][cluster_name]
    user = doc["users"].get(user_name) or {}
    if not cluster.get("server"):
        raise ConfigError(f"cluster {cluster_name!r} has no server")
    cluster_dir = origin[("clusters", cluster_name)]
    user_dir = origin.get(("users", user_name), cluster_dir)

    if cluster.get("insecure-skip-tls-verify"):
        context_or_off: ssl.SSLContext | bool = False
    else:
        ca_file = _relative(cluster.get("certificate-authority"), cluster_dir)
        ca_data = cluster.get("certificate-authority-data")
        context_or_off = ssl.create_default_context(
            cafile=str(ca_file) if ca_file else None,
            cadata=base64.b64decode(ca_data).decode() if ca_data else None,
        )
    cert = _pem(user, "client-certificate", user_dir)
    key = _pem(user, "client-key", user_dir)
    if cert is not None and key is not None:
        if context_or_off is False:
            context_or_off = ssl.create_default_context()
            context_or_off.check_hostname = False
            context_or_off.verify_mode = ssl.CERT_NONE
        assert isinstance(context_or_off, ssl.SSLContext)
        _load_chain(context_or_off, cert, key)
    token_file = _relative(user.get("tokenFile"), user_dir)
    basic = (
        (str(user["username"]), str(user.get("password") or "")) if user.get("username") else None
    )
    return Credentials(
        server=str(cluster["server"]).rstrip("/"),
        ssl=context_or_off,
        namespace=str(context.get("namespace") or "default"),
        server_name=cluster.get("tls-server-name"),
        proxy=cluster.get("proxy-url"),
        token=user.get("token") or None,
        token_file=token_file,
        basic=basic,
        exec_plugin=user.get("exec"),
        base=user_dir,
    )


def _relative(value: str | None, directory: Path) -> Path | None:
    """A path written in a kubeconfig: relative to the file that holds it."""
    return None if not value else directory / Path(value).expanduser()


def _pem(user: Mapping[str, Any], key: str, directory: Path) -> bytes | None:
    data = user.get(f"{key}-data")
    if data:
        return base64.b64decode(data)
    path = _relative(user.get(key), directory)
    return path.read_bytes() if path else None


def _load_chain(ctx: ssl.SSLContext, cert: bytes, key: bytes) -> None:
    """Load a client certificate held in memory (OpenSSL reads only files): through a
    private directory, removed at once."""
    with tempfile.TemporaryDirectory(prefix="maestro-tls-") as tmp:
        cert_path, key_path = Path(tmp, "tls.crt"), Path(tmp, "tls.key")
        cert_path.write_bytes(cert)
        key_path.touch(mode=0o600)
        key_path.write_bytes(key)
        ctx.load_cert_chain(cert_path, key_path)


async def _run_exec(plugin: Mapping[str, Any], base: Path) -> dict[str, Any]:
    """Run an exec credential plugin; its ExecCredential's status."""
    command = str(plugin.get("command") or "")
    if not command:
        raise ConfigError("the kubeconfig's exec plugin has no command")
    if os.sep in command and not os.path.isabs(command):
        command = str(base / command)
    env = dict(os.environ)
    env.update({str(e["name"]): str(e["value"]) for e in plugin.get("env") or []})
    api_version = str(plugin.get("apiVersion") or "client.authentication.k8s.io/v1")
    env["KUBERNETES_EXEC_INFO"] = json.dumps(
        {"apiVersion": api_version, "kind": "ExecCredential", "spec": {"interactive": False}}
    )
    try:
        proc = await asyncio.create_subprocess_exec(
            command,
            *[str(a) for a in plugin.get("args") or []],
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as e:
        raise ConfigError(f"exec plugin {command}: {type(e).__name__}: {e}") from None
    try:
        out, err = await asyncio.wait_for(proc.communicate(), EXEC_TIMEOUT)
    except TimeoutError:
        proc.kill()  # a plugin that hangs (waiting for a login) must not outlive the wait
        await proc.wait()
        raise ConfigError(
            f"exec plugin {command} gave no credential within {EXEC_TIMEOUT:g} s"
        ) from None
    if proc.returncode != 0:
        # stderr, not stdout: stdout would hold the credential
        raise ConfigError(
            f"exec plugin {command} exited {proc.returncode}: {err.decode(errors='replace')[:500]}"
        )
    try:
        status = json.loads(out).get("status") or {}
    except (ValueError, AttributeError):
        raise ConfigError(f"exec plugin {command} did not print an ExecCredential") from None
    return dict(status)
