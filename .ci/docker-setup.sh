#!/usr/bin/env bash
# Make sure a Docker engine answers and a local base image exists, with no container registry:
#  - installs docker.io, docker-compose (v1) and debootstrap from Debian's packages if missing
#  - starts dockerd (vfs storage driver) in the background if no engine answers
#  - builds the base image $WATTFLOW_BASE_IMAGE (default wattflow-base:bookworm) with
#    debootstrap, cached as a tarball in $WATTFLOW_CACHE (default /var/cache/wattflow)
# Fails with a message saying why when an engine cannot be had.
set -euo pipefail
BASE_IMAGE="${WATTFLOW_BASE_IMAGE:-wattflow-base:bookworm}"
CACHE="${WATTFLOW_CACHE:-/var/cache/wattflow}"
export DEBIAN_FRONTEND=noninteractive

fail() { echo "docker-setup: FAIL: $*" >&2; exit 1; }

need=()
command -v dockerd >/dev/null || need+=(docker.io)
command -v docker-compose >/dev/null || need+=(docker-compose)
command -v debootstrap >/dev/null || need+=(debootstrap)
if [ ${#need[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || fail "need root to install ${need[*]}"
  echo "docker-setup: installing ${need[*]}"
  apt-get update -qq || fail "apt-get update failed"
  apt-get install -y -qq "${need[@]}" >/dev/null || fail "apt-get install ${need[*]} failed"
fi

if ! docker info >/dev/null 2>&1; then
  [ "$(id -u)" = 0 ] || fail "no Docker engine answers and we are not root to start one"
  echo "docker-setup: starting dockerd (vfs storage driver)"
  mkdir -p "$CACHE"
  nohup dockerd --storage-driver=vfs >"$CACHE/dockerd.log" 2>&1 &
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && break
    sleep 1
  done
  docker info >/dev/null 2>&1 || fail "dockerd did not answer within 60 s: $(tail -5 "$CACHE/dockerd.log")"
fi
echo "docker-setup: engine $(docker version --format '{{.Server.Version}}') answers"

if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  mkdir -p "$CACHE"
  tarball="$CACHE/base-bookworm-v2.tar"
  if [ ! -s "$tarball" ]; then
    echo "docker-setup: building base root filesystem with debootstrap (about a minute)"
    root="$(mktemp -d)"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm \
      "$root" >"$CACHE/debootstrap.log" 2>&1 || fail "debootstrap failed: $(tail -5 "$CACHE/debootstrap.log")"
    chmod 755 "$root"   # mktemp made it 0700: the image's / must be open to non-root users
    tar -C "$root" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
    rm -rf "$root"
  fi
  docker import "$tarball" "$BASE_IMAGE" >/dev/null || fail "docker import failed"
fi
echo "docker-setup: base image $BASE_IMAGE ready"
