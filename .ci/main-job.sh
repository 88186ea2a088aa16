#!/usr/bin/env bash
# CI: the README's main command, as a user runs it. Twice (first run, then a run on the data the
# first left): `./run-stack --simulate` in a process group of its own, wait (with a deadline)
# until the database holds readings and power and plots/power.png is a valid PNG drawn after
# power arrived, then SIGINT to its process group as Ctrl-C in a terminal would; fail unless it
# exits 0 within the deadline.
set -euo pipefail
cd "$(dirname "$0")/.."
LOG="$(mktemp)"
say() { echo "main-job: $*"; }
fail() { say "FAIL: $*"; tail -60 "$LOG" >&2; [ -n "${pid:-}" ] && kill -KILL -- "-$pid" 2>/dev/null; exit 1; }

count() {  # rows in a table of data/wattflow.db (0 while it does not exist)
  .venv/bin/python - "$1" <<'PY' 2>/dev/null || echo 0
import sqlite3, sys
c = sqlite3.connect("file:data/wattflow.db?mode=ro", uri=True, timeout=5)
print(c.execute(f"SELECT count(*) FROM {sys.argv[1]}").fetchone()[0])
PY
}

png_ok() {  # a whole PNG, modified after $1 (seconds since 1970)
  .venv/bin/python - "$1" <<'PY'
import os, sys, zlib
p = "plots/power.png"
data = open(p, "rb").read()
assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[-12:-8] == b"\0\0\0\0" and data[-8:-4] == b"IEND"
pos, idat = 8, b""
while pos < len(data):  # every chunk's CRC, and the image data inflates
    n = int.from_bytes(data[pos:pos + 4], "big")
    kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
    assert zlib.crc32(kind + body) == int.from_bytes(data[pos + 8 + n:pos + 12 + n], "big")
    idat += body if kind == b"IDAT" else b""
    pos += 12 + n
zlib.decompress(idat)
assert os.stat(p).st_mtime > float(sys.argv[1])
PY
}

run_once() {
  local before_r before_p since deadline code
  before_r=$(count readings); before_p=$(count power)
  setsid ./run-stack --simulate >"$LOG" 2>&1 &
  pid=$!
  deadline=$(( $(date +%s) + 300 ))  # the first run also makes .venv
  until [ "$(count readings)" -gt "$before_r" ] && [ "$(count power)" -gt "$before_p" ]; do
    kill -0 "$pid" 2>/dev/null || fail "./run-stack --simulate exited early"
    [ "$(date +%s)" -lt "$deadline" ] || fail "no new readings and power in data/wattflow.db within the deadline"
    sleep 1
  done
  since=$(date +%s)
  deadline=$(( since + 30 ))
  until png_ok "$since" 2>/dev/null; do
    [ "$(date +%s)" -lt "$deadline" ] || fail "plots/power.png not redrawn as a valid PNG within 30 s of power arriving"
    sleep 1
  done
  say "readings $(count readings), power $(count power), plots/power.png $(stat -c %s plots/power.png) bytes"
  kill -INT -- "-$pid"  # Ctrl-C: SIGINT to the foreground process group
  deadline=$(( $(date +%s) + 60 ))
  while kill -0 "$pid" 2>/dev/null; do
    [ "$(date +%s)" -lt "$deadline" ] || fail "./run-stack did not stop within 60 s of Ctrl-C"
    sleep 0.2
  done
  code=0; wait "$pid" || code=$?
  [ "$code" = 0 ] || fail "./run-stack exited $code after Ctrl-C"
  grep -q "all stopped" "$LOG" || fail "no 'all stopped' in the log"
  pid=
}

started=$(date +%s)
run_once
say "PASS: first run ($(( $(date +%s) - started )) s so far)"
run_once
say "PASS: second run on the same data ($(( $(date +%s) - started )) s in all)"
./run-stack --help >/dev/null || fail "./run-stack --help failed"
say "PASS: ./run-stack --help"
rm -f "$LOG"
