#!/usr/bin/env bash
# Installs the Debian packages the test suite needs, non-interactively, and only what is
# missing: PostgreSQL (server binaries for the private test database) and openssl (the
# control plane's throw-away PKI). etcd is built from Go modules (see docs/testing.md), so
# Debian's etcd-server is not needed. Quick no-op when everything is present.
set -euo pipefail

missing=()
# The server, not just the client: initdb/pg_ctl live under /usr/lib/postgresql/*/bin.
compgen -G '/usr/lib/postgresql/*/bin/pg_ctl' >/dev/null || missing+=(postgresql)
command -v openssl >/dev/null || missing+=(openssl)
# Prometheus and promtool: the observability tests scrape the operator and test the alert rules.
command -v promtool >/dev/null || missing+=(prometheus)
# The operator image's build and run without a Docker daemon (hack/image.sh): buildah and
# podman on runc (crun fails on hybrid cgroups), mmdebstrap for the stand-in Python base.
for tool in buildah podman runc mmdebstrap; do
  PATH="$PATH:/usr/sbin:/sbin" command -v "$tool" >/dev/null || missing+=("$tool")
done
# Headless browser for the web UI tests (tests/e2e/test_server_ui.py; Playwright drives it).
[ -x /usr/bin/chromium ] || missing+=(chromium)

if [ "${#missing[@]}" -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  sudo=sudo
else
  sudo=
fi
echo "install-deps: installing ${missing[*]}" >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
