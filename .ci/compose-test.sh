#!/usr/bin/env bash
# End-to-end test of docker-compose.yml with Compose v2 (`docker compose`, as users type it) on a
# real Docker engine, with no container registry: local base image, host-built wheels.
#  1. `docker compose up -d --build`, real lines to the published port: every valid reading in
#     the database in the volume, power values, `wattflow tap` inside the network, a PNG in a
#     host folder owned by another user (written as that user); `docker compose restart storage`
#     while lines flow loses nothing and stores nothing twice; `stop` ends every container by
#     SIGTERM (none killed); `down -v` leaves no container, volume or network.
#  2. `docker compose --profile demo up -d` with a plots folder that does not exist (Docker
#     creates it, as root): simulated readings reach the database and a chart appears;
#     `docker compose --profile demo stop` ends every container by SIGTERM; `--profile demo
#     down -v` leaves nothing.
# Prints how long each step took; asserts outcomes, never timings (deadlines only).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
PROJECT="wfci$$"
PORT="${WATTFLOW_TEST_PORT:-44544}"
BASE_IMAGE="${WATTFLOW_BASE_IMAGE:-wattflow-base:bookworm}"
TMP="$(mktemp -d)"
PLOTS="$TMP/plots-owned"    # phase 1: exists, owned by uid 4321, mode 0700
DEMO_PLOTS="$TMP/plots-new" # phase 2: does not exist before `up`
LOG="$TMP/compose.log"
started=$(date +%s)

say() { echo "compose-test: $*"; }
fail() { say "FAIL: $*"; tail -40 "$LOG" >&2 2>/dev/null || true; dc --profile demo logs --tail=40 >&2 || true; exit 1; }
dc() { docker compose -p "$PROJECT" "$@"; }
now() { date +%s%N; }
since() { local ms=$(( ($(now) - $1) / 1000000 )); printf '%d.%d' $(( ms / 1000 )) $(( ms % 1000 / 100 )); }

export WATTFLOW_BASE_IMAGE="$BASE_IMAGE" WATTFLOW_INGEST_PUBLISH="$PORT" WATTFLOW_PLOTS_DIR="$PLOTS"
export WATTFLOW_PIP_INSTALL_ARGS="--no-index --find-links /wheels"

cleanup() {
  dc --profile demo down -v --remove-orphans >/dev/null 2>&1 || true
  rm -rf "$TMP"
}
trap cleanup EXIT

bash .ci/docker-setup.sh || fail "no Docker engine or no Compose v2 (see above)"

say "building wheels on the host (no index is reachable from inside a build)"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip wheel --quiet --wheel-dir wheels "setuptools>=77" wheel \
  $(.venv/bin/python -c "import tomllib; print(' '.join(tomllib.load(open('pyproject.toml','rb'))['project']['dependencies']))") \
  || fail "pip wheel failed"

install -d -o 4321 -g 4321 -m 0700 "$PLOTS"   # someone else's folder: the plotter must write as its owner
say "docker compose up -d --build"
t=$(now)
dc --progress plain up -d --build >"$LOG" 2>&1 || fail "docker compose up failed"
say "up -d --build returned after $(since "$t") s"

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

# Send lines from the host: $1 connections x $2 ticks (1 V + 4 A lines per tick), time offset $3,
# $4 s between ticks; with $5 (a file name): until that file exists instead, $2 ticks at most.
# Prints the number of lines sent.
send() {
  python3 - "$PORT" "$1" "$2" "$3" "${4:-0}" "${5:-}" <<'PY'
import os, socket, sys, threading, time
port, conns, ticks, offset, pace = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
until = sys.argv[6]
ranges = {"10.0.0.1": (0, 110), "10.0.0.2": (0, 0.5), "10.0.0.3": (0.2, 1), "10.0.0.4": (1, 5), "10.0.0.5": (3, 10)}
sent = [0] * conns
def stamp(us):
    return time.strftime("%Y.%m.%d %H:%M:%S", time.gmtime(us // 1_000_000)) + ".%06d" % (us % 1_000_000)
def run(c):
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        for k in range(ticks):
            if until and os.path.exists(until):
                break
            t = 1_714_000_000_000_000 + (offset + c * ticks + k) * 100_000  # 0.1 s apart
            s.sendall(b"".join(("%s\t%s\t%s\n" % (m, stamp(t), (lo + hi) / 2)).encode() for m, (lo, hi) in ranges.items()))
            sent[c] += 5
            if pace:
                time.sleep(pace)
threads = [threading.Thread(target=run, args=(c,)) for c in range(conns)]
[t.start() for t in threads]; [t.join() for t in threads]
print(sum(sent))
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

wait_png() {  # wait until $1 is a PNG (up to $2 s)
  local deadline=$(( $(date +%s) + $2 ))
  until [ -s "$1" ] && head -c 8 "$1" | grep -q PNG; do
    [ "$(date +%s)" -lt "$deadline" ] || fail "no PNG at $1 within $2 s"
    sleep 0.2
  done
}

stopped_by_sigterm() {  # every container of the project exited by itself on SIGTERM, none was killed
  local name code bad=""
  while read -r name code; do
    case "$name:$code" in
      *:0) ;;
      *simulator*:143) ;;  # no SIGTERM handler (yet): the default action ends it at once, via the init
      *) bad="$bad $name=$code" ;;
    esac
  done < <(docker ps -a --filter "label=com.docker.compose.project=$PROJECT" --format '{{.Names}} {{.Status}}' \
           | sed -E 's/^([^ ]+) Exited \(([0-9]+)\).*/\1 \2/')
  [ -z "$bad" ] || fail "containers that did not exit 0 on SIGTERM (137 = killed after the grace period):$bad"
}

nothing_left() {
  local left
  left=$(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT")
  [ -z "$left" ] || fail "containers left after down: $left"
  left=$(docker volume ls -q --filter "label=com.docker.compose.project=$PROJECT")
  [ -z "$left" ] || fail "volumes left after down -v: $left"
  left=$(docker network ls -q --filter "label=com.docker.compose.project=$PROJECT")
  [ -z "$left" ] || fail "networks left after down: $left"
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
# the tap may take seconds to start on a busy machine: lines flow until it has printed one
dc exec -T storage timeout 90 wattflow tap power --count 1 --timeout 85 >"$TMP/tap.txt" 2>/dev/null &
tap=$!
send 1 100000 100000 0.01 "$TMP/tap-done" >/dev/null &
tap_sender=$!
wait "$tap" || true
touch "$TMP/tap-done"
wait "$tap_sender" || true
grep -q '"topic": "power"' "$TMP/tap.txt" || fail "wattflow tap power printed nothing: $(cat "$TMP/tap.txt")"
say "PASS: wattflow tap power inside the network prints power messages"

wait_png "$PLOTS/power.png" 60
owner=$(stat -c %u:%g "$PLOTS/power.png")
[ "$owner" = 4321:4321 ] || fail "chart written as $owner, not as the folder's owner 4321:4321"
say "PASS: chart $PLOTS/power.png ($(stat -c %s "$PLOTS/power.png") bytes) on the host, owned by the folder's owner $owner"

before=$(db "SELECT count(*) FROM readings")
send 4 100000 200000 0.01 "$TMP/stop-sending" >"$TMP/sent.txt" &   # until told to stop
sender=$!
wait_count "SELECT count(*) FROM readings" $(( before + 100 )) 60 >/dev/null   # lines flow
say "docker compose restart storage (while lines flow)"
t=$(now)
dc restart storage >/dev/null 2>&1 || fail "restart failed"
say "restart storage took $(since "$t") s"
wait_healthy                                   # the new storage process is up and storing
mid=$(db "SELECT count(*) FROM readings")
wait_count "SELECT count(*) FROM readings" $(( mid + 100 )) 60 >/dev/null   # and lines still flow
touch "$TMP/stop-sending"
wait "$sender" || fail "sender failed during the restart"
more=$(cat "$TMP/sent.txt")
got=$(wait_count "SELECT count(*) FROM readings" $(( before + more )) 120)
[ "$got" -eq $(( before + more )) ] || fail "after restart: expected $(( before + more )) readings, found $got (duplicates?)"
say "PASS: restart of storage while $more lines flowed: all stored exactly once"

t=$(now)
dc stop >/dev/null 2>&1 || fail "docker compose stop failed"
say "docker compose stop took $(since "$t") s"
stopped_by_sigterm
say "PASS: every container stopped by itself on SIGTERM"
t=$(now)
dc down -v --remove-orphans >/dev/null 2>&1 || fail "docker compose down -v failed"
say "docker compose down -v took $(since "$t") s"
nothing_left
say "PASS: nothing left after down -v ($(( $(date +%s) - started )) s so far)"

# Phase 2: the demo, as the README starts it, into a plots folder that Docker has to create.
export WATTFLOW_PLOTS_DIR="$DEMO_PLOTS"
say "docker compose --profile demo up -d (plots folder $DEMO_PLOTS does not exist yet)"
t=$(now)
dc --profile demo up -d >>"$LOG" 2>&1 || fail "docker compose --profile demo up failed"
say "--profile demo up -d returned after $(since "$t") s"
wait_png "$DEMO_PLOTS/power.png" 60
say "PASS: chart $DEMO_PLOTS/power.png $(since "$t") s after up (folder and chart owned by $(stat -c %u:%g "$DEMO_PLOTS/power.png"), as Docker made the folder)"
got=$(wait_count "SELECT count(*) FROM readings" 100 60)
say "PASS: simulated meters: $got readings stored"
wait_healthy   # all up (a process still starting has no SIGTERM handler yet)
t=$(now)
dc --profile demo stop >/dev/null 2>&1 || fail "docker compose --profile demo stop failed"
say "docker compose --profile demo stop took $(since "$t") s"
stopped_by_sigterm
say "PASS: every container of the demo stopped by itself on SIGTERM"
t=$(now)
dc --profile demo down -v >/dev/null 2>&1 || fail "docker compose --profile demo down -v failed"
say "docker compose --profile demo down -v took $(since "$t") s"
nothing_left
say "PASS: nothing left after --profile demo down -v ($(( $(date +%s) - started )) s in all)"
