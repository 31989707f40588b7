#!/usr/bin/env bash
# Loopback benchmark: the PBX portal (nginx) reached directly vs. through the whole system
# (front → QUIC tunnel → session gate with a logged-in cookie → agent → nginx), interleaved
# round by round so both see the same noise.
# Prints bulk MB/s, small-request rate and latency, the agent's RSS, and ratios to direct.
#   bench/run.sh [ROUNDS] [SECONDS]     (defaults: 3 rounds, 5 s per wrk run)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
SECS=${2:-5}
BIG_MB=256

need() { command -v "$1" >/dev/null || { apt-get update -qq && apt-get install -y -qq "$2" >/dev/null; }; }
need nginx nginx-light
need wrk wrk
need curl curl
need python3 python3

cargo build --release --locked --bins -j2 >&2
S=target/release/pbx-remote-server
A=target/release/pbx-remote-agent

T=$(mktemp -d /tmp/pbx-bench.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$T"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

mkdir -p "$T/www" "$T/nginx"
head -c 1024 /dev/urandom | base64 > "$T/www/small.html"
head -c $((BIG_MB * 1024 * 1024)) /dev/urandom > "$T/www/big.bin"
chmod 755 "$T" "$T/www"; chmod 644 "$T/www/"*   # nginx workers run as www-data
NGINX_PORT=$(free_port)
cat > "$T/nginx/nginx.conf" <<NGX
worker_processes 1;
daemon off;
pid $T/nginx/nginx.pid;
error_log $T/nginx/error.log;
events { worker_connections 1024; }
http {
  access_log off;
  sendfile on;
  keepalive_requests 100000;
  server { listen 127.0.0.1:$NGINX_PORT; root $T/www; }
}
NGX
nginx -p "$T/nginx" -c "$T/nginx/nginx.conf" & PIDS+=($!)

"$S" run --data-dir "$T/data" --listen 127.0.0.1:0 --public-listen 127.0.0.1:0 > "$T/server.out" 2> "$T/server.err" & PIDS+=($!)
for _ in $(seq 100); do [ -s "$T/server.out" ] && break; sleep 0.1; done
TUNNEL=$(sed -nE 's/.*tunnel=([^ ]+).*/\1/p' "$T/server.out")
PUBLIC=$(sed -nE 's/.*public=([^ ]+).*/\1/p' "$T/server.out")
PUBLIC_PORT=${PUBLIC##*:}
DEV_JSON=$("$S" device add --name Bench --data-dir "$T/data" --json)
DEVICE=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["device_id"])' "$DEV_JSON")
CODE=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["auth_code"])' "$DEV_JSON")
PIN=$("$S" fingerprint --data-dir "$T/data" | tail -1)
BENCH_PW="Bench-Passw0rd-1"
HASH=$(printf '%s\n' "$BENCH_PW" | "$A" hash-password | tail -1)
cat > "$T/agent.toml" <<CFG
[server]
enabled = true
address = "$TUNNEL"
pin_sha256 = "$PIN"
[activation]
method = "auth_code"
auth_code = "$CODE"
[pbx]
edition = "software"
firmware = "83.19.0.110"
model = "Bench"
serial = "BENCH1"
mac = "02:00:00:00:00:09"
portal_url = "http://127.0.0.1:$NGINX_PORT"
[remote_access.account]
enabled = true
username = "bench"
password_hash = "$HASH"
[paths]
state_dir = "$T/agent-state"
status_file = "$T/status.json"
assertion_pubkey = "$T/assertion.pub"
CFG
"$A" run -c "$T/agent.toml" 2> "$T/agent.err" & AGENT_PID=$!; PIDS+=($AGENT_PID)
state() { "$A" status --json -c "$T/agent.toml" 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["state"])'; }
for _ in $(seq 100); do [ "$(state)" = connected ] && break; sleep 0.1; done
[ "$(state)" = connected ] || { echo "agent did not connect"; cat "$T/agent.err"; exit 1; }

HOST="$DEVICE.localhost"
VISIT=$("$S" visit "$DEVICE" --as bench --data-dir "$T/data" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["url"])')
# Through the whole door: confirm the visit (grant cookie), then log in (session cookie).
curl -s -o /dev/null --resolve "$HOST:$PUBLIC_PORT:127.0.0.1" -c "$T/jar" -X POST "${VISIT%%\?*}"
curl -s -o /dev/null --resolve "$HOST:$PUBLIC_PORT:127.0.0.1" -b "$T/jar" -c "$T/jar" \
  -H "Origin: http://$HOST:$PUBLIC_PORT" --data "username=bench&password=$BENCH_PW&next=%2F" \
  "http://$HOST:$PUBLIC_PORT/__remote/login"
COOKIE=$(awk '$6 ~ /cm_visit|pbxra_sid/ {printf "%s%s=%s", (n++ ? "; " : ""), $6, $7}' "$T/jar")
case "$COOKIE" in *pbxra_sid*) ;; *) echo "login failed: $COOKIE"; exit 1;; esac
code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$NGINX_PORT/small.html")
[ "$code" = 200 ] || { echo "nginx answered $code directly"; exit 1; }
code=$(curl -s -o "$T/resp" -w '%{http_code}' --resolve "$HOST:$PUBLIC_PORT:127.0.0.1" -H "Cookie: $COOKIE" "http://$HOST:$PUBLIC_PORT/small.html")
[ "$code" = 200 ] || { echo "gated request answered $code (cookies: ${COOKIE//=*;/=…;})"; cat "$T/resp"; cat "$T/jar"; exit 1; }

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$AGENT_PID/status"; }
RSS_IDLE=$(rss_kib)

bulk() { # URL [extra curl args] → MB/s
  local url=$1; shift
  curl -s -o /dev/null -w '%{speed_download}' "$@" "$url" | awk '{printf "%.1f", $1/1048576}'
}
wrk_run() { # URL [headers...] → "rps p50_ms p99_ms"
  local url=$1; shift
  wrk -t2 -c32 -d"${SECS}s" --latency "$@" "$url" | awk '
    function ms(v) { if (v ~ /us$/) return v/1000; if (v ~ /ms$/) return v+0; if (v ~ /s$/) return v*1000; return v }
    /Requests\/sec/ {rps=$2} /^ +50%/ {p50=ms($2)} /^ +99%/ {p99=ms($2)}
    END {printf "%.0f %.2f %.2f", rps, p50, p99}'
}
c1() { # URL [headers...] → c=1 mean latency ms
  local url=$1; shift
  wrk -t1 -c1 -d"${SECS}s" --latency "$@" "$url" | awk '
    function ms(v) { if (v ~ /us$/) return v/1000; if (v ~ /ms$/) return v+0; if (v ~ /s$/) return v*1000; return v }
    /^ +50%/ {printf "%.3f", ms($2)}'
}

DIRECT="http://127.0.0.1:$NGINX_PORT"
TUN="http://127.0.0.1:$PUBLIC_PORT"
TH=(-H "Host: $HOST:$PUBLIC_PORT" -H "Cookie: $COOKIE")
RSS_PEAK=$RSS_IDLE
declare -a DB TB DR TR D50 T50 D99 T99 DC TC
for r in $(seq "$ROUNDS"); do
  DB+=("$(bulk "$DIRECT/big.bin")")
  TB+=("$(bulk "$TUN/big.bin" --resolve "$HOST:$PUBLIC_PORT:127.0.0.1" -H "Cookie: $COOKIE" -H "Host: $HOST:$PUBLIC_PORT")")
  read -r rps p50 p99 <<<"$(wrk_run "$DIRECT/small.html")"; DR+=("$rps"); D50+=("$p50"); D99+=("$p99")
  read -r rps p50 p99 <<<"$(wrk_run "$TUN/small.html" "${TH[@]}")"; TR+=("$rps"); T50+=("$p50"); T99+=("$p99")
  now=$(rss_kib); [ "$now" -gt "$RSS_PEAK" ] && RSS_PEAK=$now
  DC+=("$(c1 "$DIRECT/small.html")")
  TC+=("$(c1 "$TUN/small.html" "${TH[@]}")")
  echo "round $r: bulk ${DB[-1]} vs ${TB[-1]} MB/s; small ${DR[-1]} vs ${TR[-1]} req/s; p99 ${D99[-1]} vs ${T99[-1]} ms; c=1 ${DC[-1]} vs ${TC[-1]} ms" >&2
done
RSS_AFTER=$(rss_kib)

median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a/b; else print "-" }'; }
row() { printf '%-28s %12s %12s %8s\n' "$1" "$2" "$3" "$4"; }

echo
echo "pbx-remote bench: $ROUNDS interleaved rounds, wrk ${SECS}s, 32 connections, ${BIG_MB} MiB bulk, loopback, release build"
row "metric" "direct" "tunnel" "ratio"
m1=$(median "${DB[@]}"); m2=$(median "${TB[@]}"); row "bulk MB/s" "$m1" "$m2" "$(ratio "$m2" "$m1")"
m1=$(median "${DR[@]}"); m2=$(median "${TR[@]}"); row "small req/s (c=32)" "$m1" "$m2" "$(ratio "$m2" "$m1")"
m1=$(median "${D50[@]}"); m2=$(median "${T50[@]}"); row "p50 ms (c=32)" "$m1" "$m2" "$(ratio "$m2" "$m1")"
m1=$(median "${D99[@]}"); m2=$(median "${T99[@]}"); row "p99 ms (c=32)" "$m1" "$m2" "$(ratio "$m2" "$m1")"
m1=$(median "${DC[@]}"); m2=$(median "${TC[@]}"); row "p50 ms (c=1)" "$m1" "$m2" "$(ratio "$m2" "$m1")"
echo
echo "agent RSS: idle ${RSS_IDLE} KiB, peak seen ${RSS_PEAK} KiB, after ${RSS_AFTER} KiB"
echo "agent binary: $(stat -c %s "$A") bytes (release, not stripped)"
