#!/usr/bin/env bash
# Builds and runs the operator image (the Dockerfile) without a Docker daemon or a
# container registry, with Debian's buildah and podman (hack/install-deps.sh installs them).
#
#   hack/image.sh build [TAG]     build the working tree; TAG defaults to
#                                 ghcr.io/maestro-dev/maestro:<version in pyproject.toml>
#   hack/image.sh base            only make sure the base image is there
#   hack/image.sh podman ARGS...  podman with this script's storage and settings
#                                 (e.g. `hack/image.sh podman run --rm TAG --help`)
#
# The Dockerfile starts FROM python:3.11-slim-bookworm. When that image cannot be pulled
# (no registry here), a stand-in is made by mmdebstrap: Debian bookworm minbase with
# python3 (3.11), python3-venv, python-is-python3, ca-certificates, netbase and tzdata,
# imported under the same name, so the unchanged Dockerfile builds with --pull=never. The
# stand-in's root filesystem is cached as a tarball under $MAESTRO_CACHE_DIR (default
# ~/.cache/maestro), next to the image storage, so only the first build pays for it. A
# real python:3.11-slim-bookworm already in that storage (e.g. `hack/image.sh podman pull
# docker.io/library/python:3.11-slim-bookworm` on a machine with a registry) is used as is.
# `build` always says which of the two it used.
#
# Everything host-specific lives in generated config files under the cache, pointed at by
# CONTAINERS_CONF / CONTAINERS_STORAGE_CONF, so the system's container setup is untouched:
#   - runtime runc: crun fails on this host's hybrid cgroups;
#   - cgroupfs and a file events log: there is no systemd;
#   - lower default ulimits: runc may not raise rlimits to the host's values;
#   - storage (overlay) in the cache, so it survives between runs.
set -euo pipefail
# runc lives in sbin, which a non-login PATH may lack.
export PATH="$PATH:/usr/sbin:/sbin"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

BASE=docker.io/library/python:3.11-slim-bookworm
STANDIN_PACKAGES=python3,python3-venv,python-is-python3,ca-certificates,netbase,tzdata
STANDIN_LABEL=dev.maestro.standin

cache="${MAESTRO_CACHE_DIR:-$HOME/.cache/maestro}/image"
if [ "$(id -u)" -eq 0 ]; then
  runroot=/run/maestro-containers # runtime state belongs on tmpfs: a reboot clears it
else
  runroot="${XDG_RUNTIME_DIR:-/tmp}/maestro-containers"
fi
mkdir -p "$cache"

# Written only when changed, and atomically: a podman of a concurrent test session may be
# reading them.
write_if_changed() {
  local path="$1" text
  text="$(cat)"
  if [ "$(cat "$path" 2>/dev/null)" != "$text" ]; then
    printf '%s\n' "$text" >"$path.$$"
    mv "$path.$$" "$path"
  fi
}
write_if_changed "$cache/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=16384:16384", "nproc=4096:4096"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
write_if_changed "$cache/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$cache/storage"
runroot = "$runroot"
EOF
export CONTAINERS_CONF="$cache/containers.conf"
export CONTAINERS_STORAGE_CONF="$cache/storage.conf"

say() { echo "image.sh: $*" >&2; }

# Prints the base's provenance: "stand-in <recipe>" or "registry".
base_kind() {
  local recipe
  recipe="$(podman image inspect --format "{{index .Labels \"$STANDIN_LABEL\"}}" "$BASE" 2>/dev/null)" || return 1
  if [ -n "$recipe" ] && [ "$recipe" != "<no value>" ]; then
    echo "stand-in $recipe"
  else
    echo registry
  fi
}

# The package sources of the stand-in: $MAESTRO_DEBIAN_MIRROR, else the bookworm,
# bookworm-updates and bookworm-security sources this host's apt uses (so the stand-in
# gets the same updates the host gets), as sources.list lines.
debian_sources() {
  if [ -n "${MAESTRO_DEBIAN_MIRROR:-}" ]; then
    echo "deb $MAESTRO_DEBIAN_MIRROR bookworm main"
    return
  fi
  apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 'Created-By: Packages' 2>/dev/null |
    awk '$2 ~ /^bookworm(-updates|-security)?$/ { print "deb " $1 " " $2 " main" }' | sort -u
}

make_standin_tarball() {
  local tarball="$1" sources
  mapfile -t sources < <(debian_sources)
  if [ "${#sources[@]}" -eq 0 ]; then
    say "no Debian bookworm source in this host's apt configuration: set MAESTRO_DEBIAN_MIRROR"
    return 1
  fi
  say "mmdebstrap bookworm minbase + $STANDIN_PACKAGES (once; cached) from: ${sources[*]}"
  # mmdebstrap, not debootstrap: it installs with apt in one pass and takes dpkg options.
  # force-unsafe-io skips dpkg's fsync per file, which is most of the time on a busy disk
  # (65 s instead of 106 s here; a crash mid-way only loses this throw-away tree). No
  # Recommends, and /usr merged by mmdebstrap's hook rather than the usrmerge package
  # (which pulls in perl): the same packages as debootstrap's minbase. Docs and man pages
  # are left out as in the official slim image; mmdebstrap removes apt's lists and caches.
  mmdebstrap --variant=minbase --format=tar --include="$STANDIN_PACKAGES" \
    --aptopt='APT::Install-Recommends "false"' \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --dpkgopt=force-unsafe-io \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    bookworm "$tarball.tmp" "${sources[@]}" >"$cache/mmdebstrap.log" 2>&1 || {
    tail -n 30 "$cache/mmdebstrap.log" >&2
    rm -f "$tarball.tmp"
    return 1
  }
  mv "$tarball.tmp" "$tarball"
  # Stand-ins of older recipes are dead weight now.
  find "$cache" -maxdepth 1 -name 'standin-*.tar' ! -path "$tarball" -delete
}

# Names the stand-in's recipe: the packages and the code that makes it, so any change to
# either makes a new stand-in instead of reusing a stale one.
standin_recipe() {
  echo "bookworm-minbase-$({
    echo "$STANDIN_PACKAGES"
    declare -f make_standin_tarball
  } | sha256sum | cut -c1-12)"
}

ensure_base() {
  local kind recipe tarball
  recipe="$(standin_recipe)"
  tarball="$cache/standin-$recipe.tar"
  if kind="$(base_kind)" && { [ "$kind" = registry ] || [ "$kind" = "stand-in $recipe" ]; }; then
    return 0
  fi
  [ -f "$tarball" ] || make_standin_tarball "$tarball"
  say "importing the stand-in $tarball as $BASE"
  podman import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change "LABEL $STANDIN_LABEL=$recipe" \
    --change 'CMD ["python3"]' \
    --quiet "$tarball" "$BASE" >/dev/null
}

describe_base() {
  local kind id python
  kind="$(base_kind)"
  id="$(podman image inspect --format '{{.Id}}' "$BASE" | cut -c1-12)"
  python="$(podman run --rm --network none "$BASE" python --version 2>&1)"
  case "$kind" in
  registry) echo "the real $BASE from a registry (id $id, $python)" ;;
  *) echo "a STAND-IN for $BASE made by mmdebstrap from Debian packages (recipe ${kind#stand-in }, id $id, $python; the official image has a newer 3.11 under /usr/local)" ;;
  esac
}

build() {
  local version tag revision created old start seconds size
  version="$(python3 -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' "$repo/pyproject.toml")"
  tag="${1:-ghcr.io/maestro-dev/maestro:$version}"
  revision="$(git -C "$repo" rev-parse HEAD 2>/dev/null || echo unknown)"
  if [ -n "$(git -C "$repo" status --porcelain 2>/dev/null)" ]; then
    revision="$revision-dirty"
  fi
  old="$(podman image inspect --format '{{.Id}}' "$tag" 2>/dev/null || true)"
  start=$SECONDS
  ensure_base
  say "base: $(describe_base)"
  # --network host: RUN steps reach PyPI without a bridge or NAT rules on the host.
  # The host's CA bundle is mounted for the build only (pip in the stand-in trusts the
  # system bundle; a TLS-intercepting network needs the host's), so it never ships.
  # --layers: dependency layers are reused while only the source changes.
  # The labels go in twice: as build args (what the Dockerfile declares) and as --label,
  # because buildah 1.28 reuses a cached LABEL step even when its build args changed,
  # while --label is applied to the final image on every build.
  created="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  buildah bud --layers --pull=never --network host \
    -v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro \
    --build-arg "VERSION=$version" \
    --build-arg "REVISION=$revision" \
    --build-arg "CREATED=$created" \
    --label "org.opencontainers.image.version=$version" \
    --label "org.opencontainers.image.revision=$revision" \
    --label "org.opencontainers.image.created=$created" \
    -f "$repo/Dockerfile" -t "$tag" "$repo" >"$cache/build.log" 2>&1 || {
    tail -n 40 "$cache/build.log" >&2
    say "build failed; full log: $cache/build.log"
    return 1
  }
  seconds=$((SECONDS - start))
  # The image this tag named before is now unnamed: drop it, or every source change would
  # leave a copy of the virtualenv in the cache (fails harmlessly while a container uses it;
  # the build's layer cache is kept).
  if [ -n "$old" ] && [ "$old" != "$(podman image inspect --format '{{.Id}}' "$tag")" ]; then
    podman rmi "$old" >/dev/null 2>&1 || true
  fi
  size="$(podman image inspect --format '{{.Size}}' "$tag")"
  say "built $tag in ${seconds}s, $((size / 1000000)) MB (log: $cache/build.log)"
  echo "$tag"
}

cmd="${1:-build}"
shift || true
# One builder at a time per cache: two mmdebstraps or imports would race.
lock() {
  exec 9>"$cache/.lock"
  flock 9
}
case "$cmd" in
build)
  lock
  build "$@"
  ;;
base)
  lock
  ensure_base
  say "base: $(describe_base)"
  ;;
podman) exec podman "$@" ;;
*)
  echo "usage: $0 build [TAG] | base | podman ARGS..." >&2
  exit 2
  ;;
esac
