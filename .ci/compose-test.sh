#!/usr/bin/env bash
# End-to-end test of docker-compose.yml with Compose v2 (`docker compose`, as users type it) on a
# real Docker engine, with no container registry: local base image, host-built wheels. Meters'
# lines always go to the published port, i.e. through the load balancer (service lb, HAProxy).
#  1. `docker compose up -d --build`, real lines to the published port: every valid reading in
#     the database in the volume, power values, `wattflow tap` inside the network, a PNG in a
#     host folder owned by another user (written as that user); the dashboard through its port
#     published on 127.0.0.1: its page, the newest values, its history and CSV export are the
#     stored readings; `docker compose restart storage` while lines flow loses nothing and
#     stores nothing twice (and the dashboard, on the volume read-only, counts every reading); `stop` ends every container by
#     SIGTERM (none killed); `down -v` leaves no container, volume or network.
#  2. `docker compose --profile demo up -d --scale storage=2 --scale ingest=2` (SQLite) with a
#     plots folder that does not exist (Docker creates it, as root): simulated readings reach the
#     database, a chart appears and the dashboard shows every meter fresh; one storage replica writes and one stands by (`wattflow
#     status` roles); a burst from several connections (a tenth of its lines invalid) spreads
#     over both ingest replicas, the writer is killed (`docker kill`) mid-burst and the standby
#     takes over: every valid line exactly once, every invalid one rejected once (and once in
#     the dashboard's history);
#     `--profile demo stop` ends every other container by SIGTERM; `down -v` leaves nothing.
#  3. `docker compose --profile postgres up -d --scale storage=3 --scale ingest=2`: storage and
#     power on the postgres service; a burst, the work spread over the three storage replicas
#     (each one's share in `wattflow status --json` > 0), one of them killed mid-burst: every
#     valid line exactly once in PostgreSQL (and in the dashboard's history: it reads PostgreSQL
#     too), every invalid one rejected once; after `stop`,
#     storage refuses to start without the postgres service (exit 78: the project's database is
#     PostgreSQL); `down -v` leaves nothing.
# Prints how long each step took; asserts outcomes, never timings (deadlines only).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
PROJECT="wfci$$"
# the published port: below Linux's ephemeral range (32768-60999), where an outgoing connection
# may hold a port for a while (one did: "bind: address already in use" at `up`); the first free one
free_port() {  # the first port from $1 on that is free on every address
  python3 - "$1" <<'PY'
import socket, sys
for port in range(int(sys.argv[1]), 32768):
    try:
        socket.create_server(("0.0.0.0", port)).close()
        print(port)
        break
    except OSError:
        pass
PY
}
PORT="${WATTFLOW_TEST_PORT:-$(free_port 24544)}"
# the dashboard's, published on the host's loopback as by default (WATTFLOW_DASHBOARD_PUBLISH)
DASH_PORT="${WATTFLOW_TEST_DASHBOARD_PORT:-$(free_port $(( PORT + 1 )))}"
BASE_IMAGE="${WATTFLOW_BASE_IMAGE:-wattflow-base:bookworm}"
TMP="$(mktemp -d)"
PLOTS="$TMP/plots-owned"    # phase 1: exists, owned by uid 4321, mode 0700
DEMO_PLOTS="$TMP/plots-new" # phase 2: does not exist before `up`
LOG="$TMP/compose.log"
# lines are stamped from two days ago on, 0.1 s apart (storage's retention keeps 30 days; the
# simulator stamps the time now); offsets in ticks: phase 1 up to 600,000, bursts 300,000-900,000
BASE_US=$(( ($(date +%s) - 2 * 86400) * 1000000 ))
PROFILES=(--profile demo --profile postgres)   # for logs and clean-up: every service
PHASES="${WATTFLOW_COMPOSE_PHASES:-1 2 3}"      # (to run some alone, by hand)
BUILD=--build                                   # the first `up` builds the images
phase() { case " $PHASES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
started=$(date +%s)

say() { echo "compose-test: $*"; }
fail() {  # to stderr: also seen when called inside $(...) or with stdout redirected
  say "FAIL: $*" >&2; tail -40 "$LOG" >&2 2>/dev/null || true
  dc "${PROFILES[@]}" logs --tail=40 >&2 || true; exit 1
}
dc() { docker compose -p "$PROJECT" "$@"; }
now() { date +%s%N; }
since() { local ms=$(( ($(now) - $1) / 1000000 )); printf '%d.%d' $(( ms / 1000 )) $(( ms % 1000 / 100 )); }

export WATTFLOW_BASE_IMAGE="$BASE_IMAGE" WATTFLOW_INGEST_PUBLISH="$PORT" WATTFLOW_PLOTS_DIR="$PLOTS"
export WATTFLOW_DASHBOARD_PUBLISH="127.0.0.1:$DASH_PORT"
export WATTFLOW_PIP_INSTALL_ARGS="--no-index --find-links /wheels"
unset WATTFLOW_STORAGE_URL   # the project's own choice (docker/compose-db) is under test

cleanup() {
  dc "${PROFILES[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
  rm -rf "$TMP"
}
trap cleanup EXIT

bash .ci/docker-setup.sh || fail "no Docker engine or no Compose v2 (see above)"

say "building wheels on the host (no index is reachable from inside a build)"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip wheel --quiet --wheel-dir wheels "setuptools>=77" wheel \
  $(.venv/bin/python -c "import tomllib; print(' '.join(tomllib.load(open('pyproject.toml','rb'))['project']['dependencies']))") \
  || fail "pip wheel failed"

running() {  # ids of the running containers of service $1
  docker ps -q --filter "label=com.docker.compose.project=$PROJECT" \
    --filter "label=com.docker.compose.service=$1" --filter status=running
}

# (180 s: at a load average of 40 on two cores a probe, a Python start, can take most of its
# 30 s timeout; storage after `restart` was still "starting" at 120 s once)
wait_healthy() {  # every container of the services named (default: the seven always there)
  local svcs=("$@") deadline=$(( $(date +%s) + 180 ))
  [ ${#svcs[@]} -gt 0 ] || svcs=(broker lb ingest storage power plotter dashboard)
  while :; do
    local unhealthy="" svc id ids state
    for svc in "${svcs[@]}"; do
      ids=$(dc ps -q "$svc")
      [ -n "$ids" ] || unhealthy="$unhealthy $svc:none"
      for id in $ids; do
        state=$(docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}' "$id" 2>/dev/null || echo missing)
        [ "$state" = healthy ] || unhealthy="$unhealthy $svc(${id:0:12}):$state"
      done
    done
    [ -z "$unhealthy" ] && return 0
    [ "$(date +%s)" -lt "$deadline" ] || fail "services not healthy within 180 s:$unhealthy; load average $(cut -d' ' -f1-3 /proc/loadavg); $(dc "${PROFILES[@]}" ps -a)"
    sleep 1
  done
}

QUERY=db   # how wait_count asks: db (SQLite in the volume) or pg (the postgres service)
db() {  # run SQL against the SQLite database in the volume, inside a running storage container
  local id
  id=$(running storage | head -1)
  [ -n "$id" ] || { echo "no storage container runs" >&2; return 1; }
  docker exec "$id" python -c "import sqlite3,sys; c=sqlite3.connect('file:/data/wattflow.db?mode=ro', uri=True, timeout=10); print(c.execute(sys.argv[1]).fetchone()[0])" "$1"
}
pg() {  # run SQL against the postgres service's database
  dc exec -T postgres psql -X -q -t -A -v ON_ERROR_STOP=1 -U wattflow -d wattflow -c "$1"
}

# Send lines from the host to the published port: $1 connections x $2 ticks (1 V + 4 A lines per
# tick), time offset $3 (ticks), $4 s between ticks; with $5 (a file name): until that file
# exists instead, $2 ticks at most; with $6 = N > 0: one invalid line (an unknown meter) every N
# ticks besides. Prints the number of valid lines sent (with $6: "VALID INVALID").
send() {
  python3 - "$PORT" "$1" "$2" "$3" "${4:-0}" "${5:-}" "${6:-0}" "$BASE_US" <<'PY'
import os, socket, sys, threading, time
port, conns, ticks, offset, pace = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
until, invalid_every, base_us = sys.argv[6], int(sys.argv[7]), int(sys.argv[8])
ranges = {"10.0.0.1": (0, 110), "10.0.0.2": (0, 0.5), "10.0.0.3": (0.2, 1), "10.0.0.4": (1, 5), "10.0.0.5": (3, 10)}
sent, bad = [0] * conns, [0] * conns
def stamp(us):
    return time.strftime("%Y.%m.%d %H:%M:%S", time.gmtime(us // 1_000_000)) + ".%06d" % (us % 1_000_000)
def run(c):
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        for k in range(ticks):
            if until and os.path.exists(until):
                break
            t = base_us + (offset + c * ticks + k) * 100_000  # 0.1 s apart
            lines = b"".join(("%s\t%s\t%s\n" % (m, stamp(t), (lo + hi) / 2)).encode() for m, (lo, hi) in ranges.items())
            if invalid_every and k % invalid_every == 0:
                lines += ("10.0.0.99\t%s\t1.0\n" % stamp(t)).encode()  # unknown_meter
                bad[c] += 1
            s.sendall(lines)
            sent[c] += 5
            if pace:
                time.sleep(pace)
threads = [threading.Thread(target=run, args=(c,)) for c in range(conns)]
[t.start() for t in threads]; [t.join() for t in threads]
print(sum(sent), sum(bad)) if invalid_every else print(sum(sent))
PY
}

wait_count() {  # wait until `SQL` returns at least $2 (up to $3 s); prints it
  local deadline=$(( $(date +%s) + $3 )) got=0
  while :; do
    got=$($QUERY "$1" 2>"$TMP/query.err") || got=0
    [ "$got" -ge "$2" ] 2>/dev/null && { echo "$got"; return 0; }
    [ "$(date +%s)" -lt "$deadline" ] || fail "waited $3 s for '$1' >= $2, have $got $(tail -2 "$TMP/query.err")"
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

status_json() {  # `wattflow status --json` from inside the network, into $TMP/status.json
  local id
  id=$(running storage | head -1)
  [ -n "$id" ] || return 1
  docker exec "$id" wattflow status --json --wait 3 >"$TMP/status.json" 2>/dev/null || true
  [ -s "$TMP/status.json" ]
}

# Ask status.json (python3 on the host): $1 is an expression over `st` (the JSON), `svc(name)`
# (that service's instances: src -> stats) and `share` (src -> %); prints its value.
status_eval() {
  python3 - "$TMP/status.json" "$1" <<'PY'
import json, sys
st = json.load(open(sys.argv[1]))
share = st.get("shares", {})
def svc(name):
    return {src: s for src, s in st["services"].items() if s.get("service") == name}
print(eval(sys.argv[2]))
PY
}

wait_status() {  # wait until status_eval "$1" prints True (up to $2 s); $3 says what for
  local deadline=$(( $(date +%s) + $2 ))
  until status_json && [ "$(status_eval "$1" 2>/dev/null)" = True ]; do
    [ "$(date +%s)" -lt "$deadline" ] || fail "waited $2 s for $3; status: $(head -c 3000 "$TMP/status.json" 2>/dev/null)"
    sleep 1
  done
}

lb_stats() {  # the balancer's view of the ingest replicas: "slot status connections" per line
  local id
  id=$(running lb | head -1)
  docker exec "$id" bash -c "exec 3<>/dev/tcp/127.0.0.1/8405 && printf 'GET /stats;csv HTTP/1.0\r\n\r\n' >&3 && cat <&3" \
    | awk -F, '$1 == "ingest" && $2 ~ /^ingest[0-9]+$/ && $18 !~ /MAINT/ {print $2, $18, $8}'
}

wait_lb_up() {  # wait until the balancer has $1 ingest replicas up (up to 60 s)
  local deadline=$(( $(date +%s) + 60 ))
  until [ "$(lb_stats | grep -c ' UP ')" -eq "$1" ]; do
    [ "$(date +%s)" -lt "$deadline" ] || fail "the balancer does not have $1 ingest replicas up: $(lb_stats)"
    sleep 1
  done
}

container_of() {  # the container of a status instance id: storage-<hostname>-<pid>-<run>
  local host
  host=$(status_eval "'$1'.split('-')[1]")
  local id
  for id in $(docker ps -q --filter "label=com.docker.compose.project=$PROJECT"); do
    if [ "$(docker inspect -f '{{.Config.Hostname}}' "$id")" = "$host" ]; then echo "$id"; fi
  done
}

# The dashboard, from the host through its published port (127.0.0.1:$DASH_PORT). dash_eval
# PATH EXPR: GET PATH, then print EXPR over `j` (the JSON answer), `body` (its text), `status`
# and `ctype` (its Content-Type); fails (status 1, the reason on stderr) if it cannot connect.
dash_eval() {
  python3 - "$DASH_PORT" "$1" "$2" <<'PY'
import json, sys, urllib.error, urllib.request
port, path, expr = sys.argv[1], sys.argv[2], sys.argv[3]
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as r:
        status, ctype, body = r.status, r.headers.get("Content-Type", ""), r.read().decode()
except urllib.error.HTTPError as e:  # an answer all the same (503 before the database exists)
    status, ctype, body = e.code, e.headers.get("Content-Type", ""), e.read().decode(errors="replace")
try:
    j = json.loads(body)
except ValueError:
    j = None
print(eval(expr))
PY
}

wait_dash() {  # wait until dash_eval "$1" "$2" prints True (up to $3 s); $4 says what for
  local deadline=$(( $(date +%s) + $3 ))
  until [ "$(dash_eval "$1" "$2" 2>"$TMP/dash.err")" = True ]; do
    [ "$(date +%s)" -lt "$deadline" ] || fail "waited $3 s for the dashboard ($1) to show $4; it answers: $(dash_eval "$1" "status, body[:1500]" 2>&1 | head -c 2000)"
    sleep 1
  done
}

# the readings the dashboard's history counts from $1 to $2 (µs; every meter), as the page asks
METERS_Q="meter=10.0.0.1&meter=10.0.0.2&meter=10.0.0.3&meter=10.0.0.4&meter=10.0.0.5"
history_q() { echo "/api/history?$METERS_Q&from=@$(( $1 / 1000000 ))&to=@$(( $2 / 1000000 ))"; }
HISTORY_N="j and sum(sum(s['n']) for s in j['series'].values())"

KILLED=""   # containers killed on purpose (exit 137 expected of them)
stopped_by_sigterm() {  # every container of the project exited by itself on its stop signal
  local name code bad=""
  while read -r name code; do
    case "$name:$code" in
      *:0) ;;
      *simulator*:143) ;;  # no SIGTERM handler (yet): the default action ends it at once, via the init
      *) case " $KILLED " in *" $name "*) ;; *) bad="$bad $name=$code" ;; esac ;;
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

stop_and_down() {  # $@: profile flags; times both, checks SIGTERM exits and that nothing is left
  local t
  t=$(now)
  dc "$@" stop >/dev/null 2>&1 || fail "docker compose $* stop failed"
  say "docker compose${*:+ $*} stop took $(since "$t") s"
  stopped_by_sigterm
  say "PASS: every container stopped by itself on its stop signal${KILLED:+ (but the one killed:$KILLED)}"
  t=$(now)
  dc "$@" down -v --remove-orphans >/dev/null 2>&1 || fail "docker compose $* down -v failed"
  say "docker compose${*:+ $*} down -v took $(since "$t") s"
  nothing_left
  KILLED=""
  say "PASS: nothing left after${*:+ $*} down -v ($(( $(date +%s) - started )) s so far)"
}

# A burst through the balancer (to two ingest replicas) from $1 connections (a tenth of the ticks with an invalid line
# besides), with storage replica $2 (a status instance id) killed once $3 readings are in (of the
# burst, counted by `$QUERY`); then every valid line once, every invalid one rejected once.
# $4: the offset of the burst's stamps (ticks).
burst_with_kill() {
  local conns=$1 victim=$2 at=$3 offset=$4 id before rejected_before stop="$TMP/stop-burst-$4"
  local t0 t1
  t0=$(( BASE_US + offset * 100000 ))
  t1=$(( BASE_US + (offset + conns * 100000) * 100000 ))
  local in_burst="ts_us >= $t0 AND ts_us < $t1"
  rejected_before=$($QUERY "SELECT count(*) FROM rejected") || fail "cannot read the rejected table"
  rm -f "$stop"   # an earlier burst of the same offset (phase 2's, before phase 3's) left it
  send "$conns" 100000 "$offset" 0.01 "$stop" 10 >"$TMP/burst.txt" &
  local sender=$!
  wait_count "SELECT count(*) FROM readings WHERE $in_burst" "$at" 90 >/dev/null
  id=$(container_of "$victim") || true
  [ -n "$id" ] || fail "no container for $victim"
  KILLED="$KILLED $(docker inspect -f '{{.Name}}' "$id" | tr -d /)"
  docker kill "$id" >/dev/null || fail "docker kill $id failed"
  local mid
  mid=$(wait_count "SELECT count(*) FROM readings WHERE $in_burst" 1 10)
  say "killed $victim (container ${id:0:12}) with $mid readings of the burst in; lines keep coming"
  wait_count "SELECT count(*) FROM readings WHERE $in_burst" $(( mid + 2000 )) 90 >/dev/null
  touch "$stop"
  wait "$sender" || fail "the burst's sender failed"
  read -r valid invalid <"$TMP/burst.txt"
  local got
  got=$(wait_count "SELECT count(*) FROM readings WHERE $in_burst" "$valid" 120)
  # ingest holds nothing unacked: what is in the database is all there will be
  wait_status "len(svc('ingest')) == 2 and sum(s['gauges'].get('unacked_lines', 1) for s in svc('ingest').values()) == 0" 60 \
    "both ingest replicas to hold no unacked line"
  got=$($QUERY "SELECT count(*) FROM readings WHERE $in_burst") || fail "cannot count readings"
  [ "$got" -eq "$valid" ] || fail "expected $valid readings of the burst, found $got (duplicates?)"
  local distinct
  distinct=$($QUERY "SELECT count(*) FROM (SELECT DISTINCT meter_id, ts_us FROM readings WHERE $in_burst) d") \
    || fail "cannot count distinct readings"
  [ "$distinct" -eq "$valid" ] || fail "$valid readings but only $distinct distinct (meter, time)"
  rejected=$($QUERY "SELECT count(*) FROM rejected") || fail "cannot count rejected lines"
  rejected=$(( rejected - rejected_before ))
  [ "$rejected" -eq "$invalid" ] || fail "expected $invalid rejected lines, found $rejected"
  say "PASS: $valid valid lines of the burst from $conns connections each stored exactly once, $invalid invalid ones rejected once, a storage replica killed mid-burst"
}

dash_burst() {  # the dashboard's history of the last burst ($1 connections, offset $2): $valid readings
  local from=$(( BASE_US + $2 * 100000 )) to=$(( BASE_US + ($2 + $1 * 100000) * 100000 ))
  wait_dash "$(history_q "$from" "$to")" "$HISTORY_N == $valid" 30 "the burst's $valid readings"
  say "PASS: the dashboard's history counts the burst's $valid readings"
}

# ---- 1. the default set-up ---------------------------------------------------------------------
if phase 1; then
install -d -o 4321 -g 4321 -m 0700 "$PLOTS"   # someone else's folder: the plotter must write as its owner
say "docker compose up -d $BUILD"
t=$(now)
dc --progress plain up -d $BUILD >"$LOG" 2>&1 || fail "docker compose up failed"
say "up -d $BUILD returned after $(since "$t") s"
BUILD=""

wait_healthy
say "all seven services healthy ($(( $(date +%s) - started )) s so far):"
dc ps

sent=$(send 5 200 0) || fail "sending lines to 127.0.0.1:$PORT failed"
say "sent $sent lines from 5 connections (through lb)"
got=$(wait_count "SELECT count(*) FROM readings" "$sent" 90)
[ "$got" -eq "$sent" ] || fail "expected $sent readings, found $got"
say "PASS: all $sent readings are in the database in the volume"

power=$(wait_count "SELECT count(*) FROM power" 1 60)
watts=$(db "SELECT round(watts, 6) FROM power_view WHERE circuit = '10.0.0.4' LIMIT 1")
[ "$watts" = "165.0" ] || fail "power for circuit 10.0.0.4 should be 55 V x 3 A = 165 W, got $watts"
say "PASS: $power power points stored (55 V x 3 A = $watts W)"
# the dashboard from the host, through its published port: its page, then what is stored
t=$(now)
published=$(dc port dashboard 8080) || fail "docker compose port dashboard 8080 failed"
[ "$published" = "127.0.0.1:$DASH_PORT" ] || fail "the dashboard is published on $published, not 127.0.0.1:$DASH_PORT"
wait_dash / "status == 200 and ctype.startswith('text/html') and '<title>wattflow</title>' in body" 60 "its page"
wait_dash /api/now "status == 200 and j['meters']['10.0.0.1']['value'] == 55.0 and round(j['circuits']['10.0.0.4']['watts'], 6) == 165.0" 60 \
  "the newest reading (55 V) and power (165 W)"
phase1_to=$(( BASE_US + 101 * 1000000 ))   # the first $sent lines' stamps, and a second more
shown=$(dash_eval "$(history_q "$BASE_US" "$phase1_to")" "$HISTORY_N") || fail "the dashboard's history did not answer"
[ "$shown" = "$sent" ] || fail "the dashboard's history counts $shown readings of the first $sent lines"
rows=$(dash_eval "/api/export?from=@$(( BASE_US / 1000000 ))&to=@$(( phase1_to / 1000000 ))&format=csv" \
  "status == 200 and len(body.splitlines()) - 1") || fail "the dashboard's export did not answer"
[ "$rows" = "$sent" ] || fail "the dashboard's CSV export has $rows rows of the first $sent readings"
say "PASS: dashboard at 127.0.0.1:$DASH_PORT: its page, 55 V and 165 W now, $shown readings in its history and its CSV export ($(since "$t") s)"
# the tap may take seconds to start on a busy machine: lines flow until it has printed one
dc exec -T storage timeout 90 wattflow tap power --count 1 --timeout 85 >"$TMP/tap.txt" 2>/dev/null &
tap=$!
send 1 100000 100000 0.01 "$TMP/tap-done" >"$TMP/tap-sent.txt" &
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

# every line sent so far stored (once) before the count the restart check starts from: once,
# at a load average of 15, that check found 570 readings more than it expected, most likely
# the tap's lines still on their way when it counted
tap_sent=$(cat "$TMP/tap-sent.txt" 2>/dev/null) || true
[ -n "$tap_sent" ] || fail "the sender during the tap failed"
say "$(( sent + tap_sent - $(db "SELECT count(*) FROM readings") )) lines were still on their way to the database after the tap"
before=$(wait_count "SELECT count(*) FROM readings" $(( sent + tap_sent )) 120)
[ "$before" -eq $(( sent + tap_sent )) ] || fail "expected $(( sent + tap_sent )) readings before the restart, found $before (duplicates?)"
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
# the dashboard (the volume read-only) reads on across the restart: every reading, in its
# history over the whole run (two days: 5-minute intervals, from the rollups)
wait_dash "$(history_q "$BASE_US" "$(( $(date +%s) * 1000000 ))")" "$HISTORY_N == $got" 60 "all $got readings"
say "PASS: the dashboard's history counts all $got readings after storage's restart"
stop_and_down
fi

# ---- 2. the demo, scaled, on SQLite ------------------------------------------------------------
if phase 2; then
# as the README starts it, into a plots folder that Docker has to create
export WATTFLOW_PLOTS_DIR="$DEMO_PLOTS"
say "docker compose --profile demo up -d $BUILD --scale storage=2 --scale ingest=2 (plots folder $DEMO_PLOTS does not exist yet)"
t=$(now)
dc --profile demo up -d $BUILD --scale storage=2 --scale ingest=2 >>"$LOG" 2>&1 || fail "docker compose --profile demo up failed"
BUILD=""
say "--profile demo up -d returned after $(since "$t") s"
wait_png "$DEMO_PLOTS/power.png" 90
say "PASS: chart $DEMO_PLOTS/power.png $(since "$t") s after up (folder and chart owned by $(stat -c %u:%g "$DEMO_PLOTS/power.png"), as Docker made the folder)"
got=$(wait_count "SELECT count(*) FROM readings" 100 60)
say "PASS: simulated meters (through lb): $got readings stored"
wait_dash /api/now "status == 200 and not any(m['stale'] for m in j['meters'].values()) and j['total_w'] > 0" 60 \
  "every meter fresh (the simulator's readings) and a total power"
say "PASS: the dashboard shows every simulated meter fresh, total $(dash_eval /api/now "round(j['total_w'], 1)") W"
# the simulator stops here: the burst's check waits for ingest to hold nothing unacked
dc --profile demo stop simulator >/dev/null 2>&1 || fail "docker compose --profile demo stop simulator failed"
wait_healthy   # all up (a process still starting has no SIGTERM handler yet)
wait_status "sorted(s['gauges'].get('role') for s in svc('storage').values()) == ['standby', 'writer']" 60 \
  "one storage replica writing and one standing by"
writer=$(status_eval "next(src for src, s in svc('storage').items() if s['gauges'].get('role') == 'writer')")
say "PASS: SQLite: storage roles writer ($writer) and standby"
wait_lb_up 2
burst_with_kill 6 "$writer" 3000 300000
dash_burst 6 300000
wait_status "len(svc('ingest')) == 2 and all(share.get(src, 0) > 0 for src in svc('ingest'))" 30 \
  "both ingest replicas to have a share of the lines"
say "PASS: the balancer spread the connections: ingest shares $(status_eval "sorted(share[s] for s in svc('ingest'))") %; lb (slot status connections): $(lb_stats | paste -sd ';')"
wait_status "[s['gauges'].get('role') for s in svc('storage').values()] == ['writer']" 30 \
  "the standby to have taken over as the writer"
say "PASS: the standby took over: one storage replica, the writer"
stop_and_down --profile demo
fi

# ---- 3. PostgreSQL, three storage replicas -----------------------------------------------------
if phase 3; then
export WATTFLOW_PLOTS_DIR="$PLOTS"
# --build: the postgres image is built here (cached after the first time; the others are)
say "docker compose --profile postgres up -d --build --scale storage=3 --scale ingest=2"
t=$(now)
dc --progress plain --profile postgres up -d --build --scale storage=3 --scale ingest=2 >>"$LOG" 2>&1 \
  || fail "docker compose --profile postgres up failed"
say "--profile postgres up -d --build returned after $(since "$t") s"
wait_healthy broker lb ingest storage power plotter dashboard postgres
say "all eight services healthy ($(( $(date +%s) - started )) s so far)"
QUERY=pg
for id in $(running storage); do
  chosen=$(docker exec "$id" cat /data/database)
  [ "$chosen" = postgresql ] || fail "the project's database should be postgresql, is '$chosen'"
  ! docker exec "$id" test -e /data/wattflow.db || fail "a SQLite file was made beside PostgreSQL"
done
wait_status "len(svc('storage')) == 3 and all(s['gauges'].get('role') == 'writer' for s in svc('storage').values())" 60 \
  "three storage replicas, every one a writer"
say "PASS: PostgreSQL: three storage replicas, all writers"
wait_lb_up 2
# a first burst: the work spreads over the three replicas (each one's share > 0)
send 6 200 0 0.005 >/dev/null || fail "sending lines failed"
wait_status "len(svc('storage')) == 3 and all(share.get(src, 0) > 0 for src in svc('storage'))" 60 \
  "every storage replica to have a share of the work"
say "PASS: the work is spread: storage shares $(status_eval "sorted(share[s] for s in svc('storage'))") %"
victim=$(status_eval "sorted(svc('storage'))[0]")
burst_with_kill 6 "$victim" 3000 300000
dash_burst 6 300000
power=$(wait_count "SELECT count(*) FROM power" 1 60)
say "PASS: power reads PostgreSQL: $power power points stored"
t=$(now)
dc --profile postgres stop >/dev/null 2>&1 || fail "docker compose --profile postgres stop failed"
say "docker compose --profile postgres stop took $(since "$t") s"
stopped_by_sigterm
say "PASS: every container stopped by itself on its stop signal (but the one killed:$KILLED)"
set +e
dc run --rm --no-deps -T storage compose-db true >"$TMP/refused.txt" 2>&1
code=$?
set -e
[ "$code" = 78 ] && grep -q "database is PostgreSQL" "$TMP/refused.txt" \
  || fail "storage without the postgres service should stop with 78 and say why, got $code: $(cat "$TMP/refused.txt")"
say "PASS: without the postgres service storage will not start: $(grep -m1 'database is PostgreSQL' "$TMP/refused.txt")"
stop_and_down --profile postgres
fi
say "PASS: all done in $(( $(date +%s) - started )) s"
