#!/usr/bin/env bash
# End-to-end test of docker-compose.yml on a real Docker engine, with no container registry:
# local base image, host-built wheels, `docker-compose up`, real lines to the published port,
# then: every valid reading in the database in the volume, power values, a PNG on the host;
# `docker-compose restart storage` while lines flow loses nothing; `down -v` leaves nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
PROJECT="wfci$$"
PORT="${WATTFLOW_TEST_PORT:-44544}"
BASE_IMAGE="${WATTFLOW_BASE_IMAGE:-wattflow-base:bookworm}"
PLOTS="$(mktemp -d)"
started=$(date +%s)

say() { echo "compose-test: $*"; }
fail() { say "FAIL: $*"; dc logs --tail=40 >&2 || true; exit 1; }
dc() { docker-compose -p "$PROJECT" "$@"; }

export WATTFLOW_BASE_IMAGE="$BASE_IMAGE" WATTFLOW_INGEST_PUBLISH="$PORT" WATTFLOW_PLOTS_DIR="$PLOTS"
export WATTFLOW_PIP_INSTALL_ARGS="--no-index --find-links /wheels"

cleanup() {
  dc down -v --remove-orphans >/dev/null 2>&1 || true
  rm -rf "$PLOTS"
}
trap cleanup EXIT

bash .ci/docker-setup.sh || fail "no Docker engine (see above)"

say "building wheels on the host (no index is reachable from inside a build)"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip wheel --quiet --wheel-dir wheels "setuptools>=77" wheel \
  $(.venv/bin/python -c "import tomllib; print(' '.join(tomllib.load(open('pyproject.toml','rb'))['project']['dependencies']))") \
  || fail "pip wheel failed"

say "building the image"
docker build --quiet -t wattflow:latest --build-arg BASE_IMAGE="$BASE_IMAGE" \
  --build-arg PIP_INSTALL_ARGS="$WATTFLOW_PIP_INSTALL_ARGS" . >/dev/null || fail "docker build failed"

install -d -o 10001 -g 10001 "$PLOTS"   # the plotter writes as uid 10001 (the default)
say "docker-compose up -d"
dc up -d --no-build || fail "docker-compose up failed"

wait_healthy() {
  local deadline=$(( $(date +%s) + 120 ))
  while :; do
    local unhealthy=0
    for svc in broker ingest storage power plotter; do
      id=$(dc ps -q "$svc")
      state=$(docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}' "$id" 2>/dev/null || echo missing)
      [ "$state" = healthy ] || unhealthy=1
    done
    [ $unhealthy = 0 ] && return 0
    [ "$(date +%s)" -lt "$deadline" ] || fail "services not healthy within 120 s: $(dc ps)"
    sleep 1
  done
}
wait_healthy
say "all five services healthy ($(( $(date +%s) - started )) s so far):"
dc ps

db() {  # run SQL against the database in the volume, inside the storage container
  dc exec -T storage python -c "import sqlite3,sys; c=sqlite3.connect('file:/data/wattflow.db?mode=ro', uri=True); print(c.execute(sys.argv[1]).fetchone()[0])" "$1"
}

# Send lines from the host: $1 connections x $2 ticks (1 V + 4 A lines per tick), time offset $3
send() {
  python3 - "$PORT" "$1" "$2" "$3" "${4:-0}" <<'PY'
import socket, sys, threading, time
port, conns, ticks, offset, pace = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
ranges = {"10.0.0.1": (0, 110), "10.0.0.2": (0, 0.5), "10.0.0.3": (0.2, 1), "10.0.0.4": (1, 5), "10.0.0.5": (3, 10)}
def stamp(us):
    return time.strftime("%Y.%m.%d %H:%M:%S", time.gmtime(us // 1_000_000)) + ".%06d" % (us % 1_000_000)
def run(c):
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        for k in range(ticks):
            t = 1_714_000_000_000_000 + (offset + c * ticks + k) * 100_000  # 0.1 s apart
            s.sendall(b"".join(("%s\t%s\t%s\n" % (m, stamp(t), (lo + hi) / 2)).encode() for m, (lo, hi) in ranges.items()))
            if pace:
                time.sleep(pace)
threads = [threading.Thread(target=run, args=(c,)) for c in range(conns)]
[t.start() for t in threads]; [t.join() for t in threads]
print(conns * ticks * 5)
PY
}

wait_count() {  # wait until `SQL` returns at least $2 (up to $3 s)
  local deadline=$(( $(date +%s) + $3 )) got=0
  while :; do
    got=$(db "$1" 2>/dev/null || echo 0)
    [ "$got" -ge "$2" ] && { echo "$got"; return 0; }
    [ "$(date +%s)" -lt "$deadline" ] || fail "waited $3 s for '$1' >= $2, have $got"
    sleep 1
  done
}

sent=$(send 5 200 0) || fail "sending lines to 127.0.0.1:$PORT failed"
say "sent $sent lines from 5 connections"
got=$(wait_count "SELECT count(*) FROM readings" "$sent" 90)
[ "$got" -eq "$sent" ] || fail "expected $sent readings, found $got"
say "PASS: all $sent readings are in the database in the volume"

power=$(wait_count "SELECT count(*) FROM power" 1 60)
watts=$(db "SELECT round(watts, 6) FROM power_view WHERE circuit = '10.0.0.4' LIMIT 1")
[ "$watts" = "165.0" ] || fail "power for circuit 10.0.0.4 should be 55 V x 3 A = 165 W, got $watts"
say "PASS: $power power points stored (55 V x 3 A = $watts W)"
tapped=$(dc exec -T storage timeout 30 wattflow tap power --count 1 --timeout 25 2>/dev/null & send 1 600 100000 0.01 >/dev/null; wait) || true
echo "$tapped" | grep -q '"topic": "power"' || fail "wattflow tap power printed nothing: $tapped"
say "PASS: wattflow tap power inside the network prints power messages"

deadline=$(( $(date +%s) + 60 ))
until [ -s "$PLOTS/power.png" ] && head -c 8 "$PLOTS/power.png" | grep -q PNG; do
  [ "$(date +%s)" -lt "$deadline" ] || fail "no PNG in the host plots folder $PLOTS"
  sleep 1
done
say "PASS: chart $PLOTS/power.png ($(stat -c %s "$PLOTS/power.png") bytes) on the host"

before=$(db "SELECT count(*) FROM readings")
send 4 300 200000 0.01 >"$PLOTS/sent.txt" &
sender=$!
sleep 1   # let lines flow before the restart
say "docker-compose restart storage (while lines flow)"
dc restart storage >/dev/null || fail "restart failed"
wait "$sender" || fail "sender failed during the restart"
more=$(cat "$PLOTS/sent.txt")
got=$(wait_count "SELECT count(*) FROM readings" $(( before + more )) 120)
[ "$got" -eq $(( before + more )) ] || fail "after restart: expected $(( before + more )) readings, found $got (duplicates?)"
say "PASS: restart of storage while $more lines flowed: all stored exactly once"

say "docker-compose down -v"
dc down -v --remove-orphans >/dev/null
left=$(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT")
[ -z "$left" ] || fail "containers left after down: $left"
vols=$(docker volume ls -q --filter "label=com.docker.compose.project=$PROJECT")
[ -z "$vols" ] || fail "volumes left after down -v: $vols"
say "PASS: nothing left running ($(( $(date +%s) - started )) s in all)"
