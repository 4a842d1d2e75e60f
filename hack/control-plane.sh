#!/usr/bin/env bash
# Local Kubernetes control plane for the e2e tests (etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler, kwok), built from Go modules.
#
#   hack/control-plane.sh build            build/cache the binaries (fast no-op when cached)
#   hack/control-plane.sh up DIR           start a plane in DIR (kubeconfig: DIR/kubeconfig)
#   hack/control-plane.sh down DIR         stop it (by pid: TERM, then KILL)
#   hack/control-plane.sh env DIR          print `export KUBECONFIG=...` and PATH
#   hack/control-plane.sh status DIR       show processes and /readyz
#
# The logic lives in hack/control-plane/controlplane.py (standard library only), which the
# pytest fixture also imports.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec python3 "$here/control-plane/controlplane.py" "$@"
