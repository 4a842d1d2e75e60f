"""Local Kubernetes control plane for Maestro's e2e tests, started as plain processes.

Verbs (``hack/control-plane.sh`` is the entry point):

* ``build``       build the pinned binaries from Go modules into the cache (no-op when cached)
* ``up DIR``      start etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok
* ``down DIR``    stop them by pid (TERM, then KILL) and wait
* ``env DIR``     print ``export KUBECONFIG=...`` (and PATH with the built binaries)
* ``status DIR``  show which components are alive and whether the API server is ready

Standard library only, so it runs with any Python 3.11 before the project venv exists.
The pytest fixture imports this file and calls :func:`start` / :func:`stop` directly so the
plane's processes are children of pytest (see ``docs/testing.md``).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ctypes
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
KWOK_STAGES = REPO / "tests" / "e2e" / "kwok" / "stages.yaml"

K8S_VERSION = "v1.34.12"
ETCD_VERSION = "v3.6.16"
KWOK_VERSION = "v0.8.0"
HELM_VERSION = "v3.22.0"

FAKE_NODE = "kwok-node-0"
SERVICE_CIDR = "10.96.0.0/16"
SERVICE_IP = "10.96.0.1"
POD_CIDR = "10.244.0.0/16"
# Components in start order; stopped in reverse.
_PR_SET_PDEATHSIG = 1
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")


@dataclasses.dataclass(frozen=True)
class Binary:
    """One executable: which wrapper module builds it, from which package, with which flags."""

    name: str
    module: str
    package: str
    ldflags: tuple[str, ...] = ()


def _k8s_ldflags() -> tuple[str, ...]:
    major, minor = K8S_VERSION.lstrip("v").split(".")[:2]
    flags: list[str] = []
    # Without these /version reports v0.0.0-master, which breaks kubeVersion checks (Helm).
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [
            f"-X {pkg}.gitVersion={K8S_VERSION}",
            f"-X {pkg}.gitMajor={major}",
            f"-X {pkg}.gitMinor={minor}",
            f"-X {pkg}.gitTreeState=clean",
            f"-X {pkg}.buildDate=1970-01-01T00:00:00Z",
        ]
    return tuple(flags)


BINARIES = (
    Binary("kube-apiserver", "k8s", "./cmd/kube-apiserver", _k8s_ldflags()),
    Binary("kube-controller-manager", "k8s", "./cmd/kube-controller-manager", _k8s_ldflags()),
    Binary("kube-scheduler", "k8s", "./cmd/kube-scheduler", _k8s_ldflags()),
    Binary("kubectl", "k8s", "./cmd/kubectl", _k8s_ldflags()),
    Binary("etcd", "etcd", "."),
    Binary(
        "kwok",
        "kwok",
        "sigs.k8s.io/kwok/cmd/kwok",
        (f"-X sigs.k8s.io/kwok/pkg/consts.Version={KWOK_VERSION.lstrip('v')}",),
    ),
    Binary(
        "helm",
        "helm",
        "helm.sh/helm/v3/cmd/helm",
        (
            f"-X helm.sh/helm/v3/internal/version.version={HELM_VERSION}",
            "-X helm.sh/helm/v3/internal/version.gitTreeState=clean",
        ),
    ),
)


class ControlPlaneError(RuntimeError):
    """The control plane could not be built, started or stopped."""


# --------------------------------------------------------------------------- build


def cache_dir() -> Path:
    """Root of the binary cache (``$MAESTRO_CACHE_DIR`` or ``~/.cache/maestro``)."""
    root = os.environ.get("MAESTRO_CACHE_DIR") or str(Path.home() / ".cache" / "maestro")
    return Path(root) / "control-plane" / K8S_VERSION


def bin_dir() -> Path:
    """Directory holding the built binaries."""
    return cache_dir() / "bin"


def _inputs_digest() -> str:
    # Any change to a wrapper module, its go.sum or the flags invalidates the cache, so a
    # version bump in git can never silently run stale binaries.
    h = hashlib.sha256()
    for b in BINARIES:
        h.update(repr(b).encode())
    for path in sorted(HERE.glob("*/**/*")):
        if path.is_file() and path.suffix in {".go", ".mod", ".sum"}:
            h.update(str(path.relative_to(HERE)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def _stamp_ok(digest: str) -> bool:
    stamp = bin_dir() / ".inputs"
    if not stamp.is_file() or stamp.read_text().strip() != digest:
        return False
    return all(os.access(bin_dir() / b.name, os.X_OK) for b in BINARIES)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build(*, force: bool = False, log: Any = sys.stderr) -> Path:
    """Build every binary into :func:`bin_dir` unless the cache matches; return that dir."""
    digest = _inputs_digest()
    if not force and _stamp_ok(digest):
        return bin_dir()
    if shutil.which("go") is None:
        raise ControlPlaneError("the Go toolchain (go) is not on PATH; it is needed to build")
    # Two test sessions may start at once; only one may build.
    with _lock(cache_dir() / ".build.lock"):
        if not force and _stamp_ok(digest):
            return bin_dir()
        out = bin_dir()
        out.mkdir(parents=True, exist_ok=True)
        (out / ".inputs").unlink(missing_ok=True)
        env = dict(os.environ, CGO_ENABLED="0", GOTOOLCHAIN="local")
        # -mod=readonly: builds must use exactly the committed go.sum.
        env["GOFLAGS"] = (env.get("GOFLAGS", "") + " -mod=readonly -buildvcs=false").strip()
        started = time.monotonic()
        for b in BINARIES:
            t0 = time.monotonic()
            print(f"control-plane: building {b.name} ...", file=log, flush=True)
            tmp = out / f".{b.name}.tmp"
            cmd = [
                "go",
                "build",
                "-trimpath",
                # The builds are memory-hungry (~2 GiB each): never run two at once.
                "-p",
                str(min(os.cpu_count() or 2, 4)),
                "-ldflags",
                " ".join(("-s", "-w", *b.ldflags)),
                "-o",
                str(tmp),
                b.package,
            ]
            proc = subprocess.run(cmd, cwd=HERE / b.module, env=env, check=False)
            if proc.returncode != 0:
                raise ControlPlaneError(f"go build of {b.name} failed (exit {proc.returncode})")
            tmp.replace(out / b.name)
            print(
                f"control-plane: built {b.name} in {time.monotonic() - t0:.0f}s",
                file=log,
                flush=True,
            )
        (out / ".inputs").write_text(digest + "\n")
        print(f"control-plane: build took {time.monotonic() - started:.0f}s", file=log, flush=True)
    return out


# --------------------------------------------------------------------------- PKI


_OPENSSL_CNF = "[req]\ndistinguished_name = dn\nprompt = no\n[dn]\n"


def _openssl(*args: str, cwd: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["openssl", *args],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=dict(os.environ, OPENSSL_CONF=str(cwd / "openssl.cnf")),
    )


def _wait_all(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise ControlPlaneError(f"openssl failed: {err.decode(errors='replace').strip()}")


def _leaf(pki: Path, name: str, subject: str, *exts: str) -> subprocess.Popen[bytes]:
    # EC P-256 keys: generating them costs milliseconds, RSA would dominate start-up time.
    return _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.crt", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-days", "3650", "-subj", subject,
        "-addext", "basicConstraints=critical,CA:FALSE",
        "-addext", "keyUsage=critical,digitalSignature,keyEncipherment",
        *[a for e in exts for a in ("-addext", e)],
        cwd=pki,
    )  # fmt: skip


def make_pki(pki: Path) -> None:
    """Write a throw-away CA, serving/client certificates and service-account keys."""
    pki.mkdir(parents=True, exist_ok=True)
    (pki / "openssl.cnf").write_text(_OPENSSL_CNF)
    _wait_all([
        _openssl(
            "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", "ca.key", "-out", "ca.crt", "-days", "3650",
            "-subj", "/CN=maestro-e2e-ca",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
            cwd=pki,
        ),
        _openssl(
            "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-out", "sa.key", cwd=pki,
        ),
    ])  # fmt: skip
    client = "extendedKeyUsage=clientAuth"
    san = f"subjectAltName=IP:127.0.0.1,IP:{SERVICE_IP},DNS:localhost," + ",".join(
        "DNS:kubernetes" + s for s in ("", ".default", ".default.svc", ".default.svc.cluster.local")
    )
    _wait_all([
        _openssl("pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki),
        _leaf(pki, "apiserver", "/CN=kube-apiserver", "extendedKeyUsage=serverAuth", san),
        _leaf(pki, "admin", "/O=system:masters/CN=maestro-e2e-admin", client),
        _leaf(pki, "controller-manager", "/CN=system:kube-controller-manager", client),
        _leaf(pki, "scheduler", "/CN=system:kube-scheduler", client),
        # kwok patches status of nodes and pods of any namespace; a node identity would
        # be limited by the Node authorizer to its own pods, so give it cluster admin.
        _leaf(pki, "kwok", "/O=system:masters/CN=kwok", client),
    ])  # fmt: skip


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def write_kubeconfig(path: Path, server: str, pki: Path, user: str) -> None:
    """Write a kubeconfig with embedded CA and client certificate for ``user``."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "maestro-e2e",
                "cluster": {
                    "server": server,
                    "certificate-authority-data": _b64(pki / "ca.crt"),
                },
            }
        ],
        "users": [
            {
                "name": user,
                "user": {
                    "client-certificate-data": _b64(pki / f"{user}.crt"),
                    "client-key-data": _b64(pki / f"{user}.key"),
                },
            }
        ],
        "contexts": [{"name": "maestro-e2e", "context": {"cluster": "maestro-e2e", "user": user}}],
        "current-context": "maestro-e2e",
    }
    # JSON is valid YAML, and every kubeconfig loader reads it.
    path.write_text(json.dumps(config, indent=2) + "\n")
    path.chmod(0o600)


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclasses.dataclass(frozen=True)
class PlaneInfo:
    """What a started plane looks like from the outside (also saved as DIR/plane.json)."""

    dir: Path
    server: str
    kubeconfig: Path
    bin_dir: Path
    pids: dict[str, int]
    etcd_url: str

    def save(self) -> None:
        """Persist to ``DIR/plane.json`` for ``down``, ``env`` and ``status``."""
        data = dataclasses.asdict(self)
        data = {k: (str(v) if isinstance(v, Path) else v) for k, v in data.items()}
        (self.dir / "plane.json").write_text(json.dumps(data, indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path) -> PlaneInfo:
        """Read ``DIR/plane.json`` written by :meth:`save`."""
        path = directory / "plane.json"
        if not path.is_file():
            raise ControlPlaneError(f"{path} not found: no plane was started in {directory}")
        data = json.loads(path.read_text())
        return cls(
            dir=Path(data["dir"]),
            server=data["server"],
            kubeconfig=Path(data["kubeconfig"]),
            bin_dir=Path(data["bin_dir"]),
            pids={k: int(v) for k, v in data["pids"].items()},
            etcd_url=data["etcd_url"],
        )


def _command_lines(d: Path, bins: Path, ports: dict[str, int], server: str) -> dict[str, list[str]]:
    pki = d / "pki"
    etcd_client = f"http://127.0.0.1:{ports['etcd']}"
    etcd_peer = f"http://127.0.0.1:{ports['etcd-peer']}"
    return {
        "etcd": [
            str(bins / "etcd"),
            "--name=default",
            f"--data-dir={d / 'etcd'}",
            f"--listen-client-urls={etcd_client}",
            f"--advertise-client-urls={etcd_client}",
            f"--listen-peer-urls={etcd_peer}",
            f"--initial-advertise-peer-urls={etcd_peer}",
            f"--initial-cluster=default={etcd_peer}",
            # Test data is disposable; fsync is most of etcd's latency on a slow disk.
            "--unsafe-no-fsync=true",
            "--quota-backend-bytes=2147483648",
            # A single member elects itself after one election timeout (default 1 s).
            "--heartbeat-interval=10",
            "--election-timeout=100",
            "--log-level=warn",
        ],
        "kube-apiserver": [
            str(bins / "kube-apiserver"),
            f"--etcd-servers={etcd_client}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={ports['apiserver']}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            "--authorization-mode=Node,RBAC",
            f"--service-account-issuer={server}",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--allow-privileged=true",
            # The kubernetes Service endpoint would be 127.0.0.1, which Endpoints
            # validation rejects; nothing in-cluster needs to reach the API via the VIP.
            "--endpoint-reconciler-type=none",
            "--profiling=false",
        ],
        "kube-controller-manager": [
            str(bins / "kube-controller-manager"),
            f"--kubeconfig={d / 'controller-manager.kubeconfig'}",
            "--bind-address=127.0.0.1",
            "--secure-port=0",
            "--leader-elect=false",
            # Each controller uses its own ServiceAccount, so RBAC is exercised as in a
            # real cluster (e.g. the Job controller's ClusterRole).
            "--use-service-account-credentials=true",
            # The default client rate limit (20 qps) serialises start-up at ~150 ms per
            # controller and throttles bursts of test Jobs; a test cluster has no one to
            # protect.
            "--kube-api-qps=500",
            "--kube-api-burst=1000",
            f"--service-account-private-key-file={pki / 'sa.key'}",
            f"--root-ca-file={pki / 'ca.crt'}",
            f"--cluster-signing-cert-file={pki / 'ca.crt'}",
            f"--cluster-signing-key-file={pki / 'ca.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--controllers=*,-nodeipam,-cloud-node-lifecycle,-service-lb-controller,"
            "-node-route-controller,-persistentvolume-attach-detach-controller",
        ],
        "kube-scheduler": [
            str(bins / "kube-scheduler"),
            f"--kubeconfig={d / 'scheduler.kubeconfig'}",
            "--kube-api-qps=500",
            "--kube-api-burst=1000",
            "--bind-address=127.0.0.1",
            "--secure-port=0",
            "--leader-elect=false",
        ],
        "kwok": [
            str(bins / "kwok"),
            f"--kubeconfig={d / 'kwok.kubeconfig'}",
            f"--config={KWOK_STAGES}",
            "--manage-all-nodes=false",
            "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
            f"--cidr={POD_CIDR}",
            "--node-ip=127.0.0.1",
        ],
    }


def _spawn(
    name: str, argv: list[str], logs: Path, *, die_with_parent: bool
) -> subprocess.Popen[bytes]:
    with (logs / f"{name}.log").open("ab") as log:
        preexec = None
        if die_with_parent:
            # Resolved here: the child of a threaded parent must not import or allocate.
            prctl = ctypes.CDLL(None, use_errno=True).prctl

            def preexec() -> None:
                # If pytest is SIGKILLed its finalizers never run; the kernel then sends
                # SIGTERM to the plane so nothing is left behind.
                prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)

        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            # Own session: a Ctrl-C in the terminal reaches pytest, whose teardown then
            # stops the plane in order, instead of killing etcd under a live apiserver.
            start_new_session=True,
            preexec_fn=preexec,
        )


class Client:
    """Minimal HTTPS client for the API server using the admin client certificate."""

    def __init__(self, server: str, pki: Path) -> None:
        self.server = server
        ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
        self._ctx = ctx

    def request(
        self, method: str, path: str, body: dict[str, Any] | None = None, timeout: float = 5
    ) -> tuple[int, bytes]:
        """Send one request; return (status, body) without raising on HTTP errors."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.server + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, context=self._ctx, timeout=timeout) as resp:
                return int(resp.status), bytes(resp.read())
        except urllib.error.HTTPError as err:
            return int(err.code), bytes(err.read())


def _fake_node() -> dict[str, Any]:
    capacity = {"cpu": "1000", "memory": "4Ti", "pods": "1000", "ephemeral-storage": "10Ti"}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": FAKE_NODE,
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "kubernetes.io/hostname": FAKE_NODE,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "kwok",
            },
        },
        # No taint: test pods must land here without tolerations.
        "spec": {},
        "status": {"capacity": capacity, "allocatable": capacity},
    }


def _alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (exited, not yet reaped) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_until(what: str, check: Any, deadline: float, procs: dict[str, int], d: Path) -> None:
    while True:
        if check():
            return
        for name, pid in procs.items():
            if not _alive(pid):
                raise ControlPlaneError(
                    f"{name} (pid {pid}) exited while waiting for {what}; see "
                    f"{d / 'logs' / (name + '.log')}:\n{_tail(d / 'logs' / (name + '.log'))}"
                )
        if time.monotonic() > deadline:
            raise ControlPlaneError(f"timed out waiting for {what}; logs in {d / 'logs'}")
        time.sleep(0.05)


def _etcd_healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=1) as resp:
            return bool(json.loads(resp.read()).get("health") == "true")
    except (OSError, ValueError):
        return False


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def start(
    directory: Path,
    *,
    die_with_parent: bool = False,
    timeout: float = 120,
    log: Any = sys.stderr,
) -> tuple[PlaneInfo, dict[str, subprocess.Popen[bytes]]]:
    """Build if needed, start a plane in ``directory`` and wait until it is usable.

    Returns the plane description and the ``Popen`` objects (so an in-process caller can
    reap its children after :func:`stop`). On failure everything started is stopped.
    """
    for attempt in range(3):
        try:
            return _start(directory, die_with_parent=die_with_parent, timeout=timeout, log=log)
        except ControlPlaneError as err:
            # free_port() cannot reserve a port; another process may take it first.
            if "address already in use" not in str(err) or attempt == 2:
                raise
            print(f"control-plane: port collision, retrying: {err}", file=log, flush=True)
    raise AssertionError("unreachable")


def _start(
    directory: Path, *, die_with_parent: bool, timeout: float, log: Any
) -> tuple[PlaneInfo, dict[str, subprocess.Popen[bytes]]]:
    t0 = time.monotonic()
    bins = build(log=log)
    d = directory.resolve()

    def mark(what: str) -> None:
        print(f"control-plane: {what} at +{time.monotonic() - t0:.2f}s", file=log, flush=True)

    if (d / "plane.json").exists() and any(_alive(p) for p in PlaneInfo.load(d).pids.values()):
        raise ControlPlaneError(f"a plane is already running in {d}; run down first")
    for sub in ("pki", "etcd", "logs"):
        shutil.rmtree(d / sub, ignore_errors=True)
    (d / "logs").mkdir(parents=True)
    make_pki(d / "pki")
    mark("certificates written")
    ports = {name: free_port() for name in ("etcd", "etcd-peer", "apiserver")}
    server = f"https://127.0.0.1:{ports['apiserver']}"
    pki = d / "pki"
    write_kubeconfig(d / "kubeconfig", server, pki, "admin")
    for user in ("controller-manager", "scheduler", "kwok"):
        write_kubeconfig(d / f"{user}.kubeconfig", server, pki, user)

    procs: dict[str, subprocess.Popen[bytes]] = {}
    info = PlaneInfo(
        dir=d,
        server=server,
        kubeconfig=d / "kubeconfig",
        bin_dir=bins,
        pids={},
        etcd_url=f"http://127.0.0.1:{ports['etcd']}",
    )
    try:
        # kcm, scheduler and kwok start right after the API server: they retry until it
        # answers, so their start-up overlaps with its own.
        deadline = time.monotonic() + timeout
        for name, argv in _command_lines(d, bins, ports, server).items():
            procs[name] = _spawn(name, argv, d / "logs", die_with_parent=die_with_parent)
            info.pids[name] = procs[name].pid
            (d / f"{name}.pid").write_text(f"{procs[name].pid}\n")
            info.save()
            if name == "etcd":
                # The API server's etcd client backs off for up to a second when etcd is
                # not listening yet; etcd is ready in ~100 ms, so waiting for it is faster.
                _wait_until(
                    "etcd /health", lambda: _etcd_healthy(info.etcd_url), deadline, info.pids, d
                )
                mark("etcd ready")
        client = Client(server, pki)

        def ok(path: str) -> bool:
            try:
                return client.request("GET", path, timeout=2)[0] == 200
            except OSError:
                return False

        _wait_until("kube-apiserver /readyz", lambda: ok("/readyz"), deadline, info.pids, d)
        mark("kube-apiserver ready")
        status, body = client.request("POST", "/api/v1/nodes", _fake_node())
        if status not in (201, 409):
            raise ControlPlaneError(f"creating node {FAKE_NODE} failed: {status} {body!r}")

        def node_ready() -> bool:
            code, raw = client.request("GET", f"/api/v1/nodes/{FAKE_NODE}")
            if code != 200:
                return False
            conds = json.loads(raw).get("status", {}).get("conditions") or []
            return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)

        _wait_until("the kwok node to be Ready", node_ready, deadline, info.pids, d)
        mark(f"node {FAKE_NODE} Ready")
        _wait_until(
            "ServiceAccount default/default",
            lambda: ok("/api/v1/namespaces/default/serviceaccounts/default"),
            deadline,
            info.pids,
            d,
        )
        mark("ServiceAccount default/default exists")
    except BaseException:
        stop(d, procs=procs)
        raise
    return info, procs


def stop(
    directory: Path,
    *,
    grace: float = 10,
    procs: dict[str, subprocess.Popen[bytes]] | None = None,
) -> list[int]:
    """Stop a plane by its recorded pids: TERM in reverse start order, KILL after ``grace``.

    Returns the pids that were signalled. Children passed in ``procs`` are also reaped.
    """
    d = directory.resolve()
    pids: dict[str, int] = {}
    if (d / "plane.json").exists():
        pids.update(PlaneInfo.load(d).pids)
    for name in COMPONENTS:
        pid_file = d / f"{name}.pid"
        if pid_file.exists():
            pids.setdefault(name, int(pid_file.read_text()))
    if procs:
        pids.update({n: p.pid for n, p in procs.items()})
    signalled: list[int] = []
    # Clients first (they only log errors once the API server is gone), then the
    # API server, and etcd last so the API server never sees its storage vanish.
    clients = [n for n in reversed(COMPONENTS) if n not in ("kube-apiserver", "etcd")]
    for names in (clients, ["kube-apiserver"], ["etcd"]):
        group = [(n, pids[n]) for n in names if n in pids]
        for name, pid in group:
            if _owned(pid, name):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
                    signalled.append(pid)
        deadline = time.monotonic() + grace
        for name, pid in group:
            while _alive(pid) and time.monotonic() < deadline:
                _reap(procs, name)
                time.sleep(0.02)
            if _alive(pid) and _owned(pid, name):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            while _alive(pid):
                _reap(procs, name)
                time.sleep(0.02)
    for p in (procs or {}).values():
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=5)
    for name in COMPONENTS:
        (d / f"{name}.pid").unlink(missing_ok=True)
    return signalled


def _reap(procs: dict[str, subprocess.Popen[bytes]] | None, name: str) -> None:
    if procs and name in procs:
        procs[name].poll()


def _owned(pid: int, name: str) -> bool:
    # A recorded pid may have been reused by an unrelated process after a crash.
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0", 1)[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return os.path.basename(argv0.decode(errors="replace")) == name


# --------------------------------------------------------------------------- CLI


def _cmd_status(d: Path) -> int:
    info = PlaneInfo.load(d)
    rc = 0
    for name, pid in info.pids.items():
        alive = _alive(pid) and _owned(pid, name)
        rc |= 0 if alive else 1
        print(f"{name:<24} pid {pid:<8} {'running' if alive else 'stopped'}")
    try:
        code, body = Client(info.server, d / "pki").request("GET", "/readyz", timeout=2)
        ready = f"{code} {body.decode(errors='replace').strip()}"
    except OSError as err:
        ready, rc = f"unreachable ({err})", 1
    print(f"{'server':<24} {info.server}  /readyz: {ready}")
    return rc


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (see module docstring)."""
    parser = argparse.ArgumentParser(prog="control-plane.sh", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="verb", required=True)
    b = sub.add_parser("build", help="build binaries into the cache (no-op when cached)")
    b.add_argument("--force", action="store_true", help="rebuild even when cached")
    sub.add_parser("bin-dir", help="print the binary directory")
    for verb in ("up", "down", "env", "status"):
        p = sub.add_parser(verb)
        p.add_argument("dir", type=Path)
    up = sub.choices["up"]
    up.add_argument("--timeout", type=float, default=120, help="readiness timeout (s)")
    args = parser.parse_args(argv)
    try:
        if args.verb == "build":
            print(build(force=args.force))
        elif args.verb == "bin-dir":
            print(bin_dir())
        elif args.verb == "up":
            t0 = time.monotonic()
            info, _ = start(args.dir, timeout=args.timeout)
            print(
                f"control-plane: up in {time.monotonic() - t0:.1f}s at {info.server}; "
                f"kubeconfig {info.kubeconfig}",
                file=sys.stderr,
            )
            print(f"export KUBECONFIG={info.kubeconfig}")
        elif args.verb == "down":
            stop(args.dir)
        elif args.verb == "env":
            info = PlaneInfo.load(args.dir.resolve())
            print(f"export KUBECONFIG={info.kubeconfig}")
            print(f'export PATH="{info.bin_dir}:$PATH"')
        elif args.verb == "status":
            return _cmd_status(args.dir.resolve())
    except ControlPlaneError as err:
        print(f"control-plane: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
