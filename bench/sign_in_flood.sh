#!/usr/bin/env bash
# The server under a flood of console sign-ins with made-up emails (which no per-account lockout
# slows): each sign-in runs argon2 (19 MiB, tens of milliseconds), so the server bounds how many
# run and wait (`server::passwords`) and tells the rest it is busy. Prints the answers, the
# server's peak RSS and its threads afterwards, and whether the peak stayed under the target.
#   bench/sign_in_flood.sh [SIGN_INS] [SOURCES]    (defaults 250, 1)
# SOURCES > 1 spreads the sign-ins over that many loopback addresses (127.0.1.x), as from many
# machines: one machine holds at most a few places in the line, many share all of it.
# BENCH_SERVER: another server binary (e.g. a copy built before a change, for before/after).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-250}
SOURCES=${2:-1}
TARGET_KIB=$((128 * 1024))
command -v curl >/dev/null || { apt-get update -qq && apt-get install -y -qq curl >/dev/null; }
cargo build --release --locked --bin pbx-remote-server -j2 >&2
S=${BENCH_SERVER:-target/release/pbx-remote-server}
T=$(mktemp -d /tmp/pbx-flood.XXXXXX)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
URL="http://127.0.0.1:$PORT"
"$S" run --data-dir "$T/data" --listen 127.0.0.1:0 --public-listen 127.0.0.1:0 \
  --console-listen "127.0.0.1:$PORT" --console-url "$URL" > "$T/out" 2> "$T/err" & PID=$!
trap 'kill $PID 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$T"' EXIT
for _ in $(seq 100); do curl -s -o /dev/null "$URL/login" && break; sleep 0.1; done
before=$(awk '/VmRSS/ {print $2}' "/proc/$PID/status")
start=$(date +%s.%N)
export URL SOURCES
seq "$N" | xargs -P "$N" -I{} sh -c 'from=127.0.0.1; [ "$SOURCES" -gt 1 ] && from=127.0.1.$(( {} % SOURCES + 1 ))
  curl -s -o /dev/null -w "%{http_code}\n" --interface "$from" -H "origin: $URL" \
    -H "sec-fetch-site: same-origin" --data "email=nobody{}@example.com&password=not-it" "$URL/login"' > "$T/codes"
secs=$(echo "$(date +%s.%N) - $start" | bc)
peak=$(awk '/VmHWM/ {print $2}' "/proc/$PID/status")
threads=$(ls "/proc/$PID/task" | wc -l)
echo "$N sign-ins at once from $SOURCES source(s) in ${secs% *} s; answers: $(sort "$T/codes" | uniq -c | awk '{printf "%s×%s ", $1, $2}')"
echo "server RSS before ${before} KiB, peak ${peak} KiB; threads afterwards ${threads}"
verdict=met; [ "$peak" -le "$TARGET_KIB" ] || verdict=MISSED
printf '  peak RSS KiB under the flood %10s  (target ≤ %s): %s\n' "$peak" "$TARGET_KIB" "$verdict"
