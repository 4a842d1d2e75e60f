#!/usr/bin/env bash
# Regenerates this module's go.mod/go.sum for a Kubernetes release, e.g.
#   hack/control-plane/k8s/bump.sh v1.34.12
# The replace list is derived from upstream's own go.mod (its `=> ./staging/src/k8s.io/`
# lines), so staging modules added or dropped by a release are picked up. Then update
# K8S_VERSION in hack/control-plane/controlplane.py and commit go.mod and go.sum.
set -euo pipefail
version="$1"
cd "$(dirname "${BASH_SOURCE[0]}")"
upstream="$(GOFLAGS=-mod=mod go mod download -json "k8s.io/kubernetes@${version}" |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["GoMod"])')"
staging="v0.${version#v1.}"
{
  echo "// Wrapper module: builds Kubernetes control-plane binaries from the Go module proxy."
  echo "// Regenerate with ./bump.sh <version>: the replace list comes from upstream's go.mod."
  echo "module maestro.dev/hack/control-plane/k8s"
  echo
  grep -E '^go ' "$upstream"
  echo
  grep -E '^godebug ' "$upstream" || true
  echo
  echo "require k8s.io/kubernetes ${version}"
  echo
  echo "replace ("
  grep -E '=> \./staging/src/k8s\.io/' "$upstream" | awk -v v="$staging" '{print "\t" $1 " => " $1 " " v}'
  echo ")"
} >go.mod
go mod tidy
