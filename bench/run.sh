#!/usr/bin/env bash
# Loopback benchmark: the PBX portal (nginx) reached directly, through the whole system
# (front → QUIC tunnel → session gate with a logged-in cookie → agent → nginx), the same over
# the TCP transport ("tunnel-tcp": a second agent with [tunnel] transport = "tcp"), through two
# stock nginx proxies linked by TLS ("nginx2", the yardstick for throughput), and through
# rathole with its TLS transport (what users would pick instead), and bore (a plain TCP tunnel
# without encryption: the floor a tunnel without crypto reaches), interleaved round by round so
# all see the same noise. Ends with each target and whether it was met.
# Prints bulk MB/s, small-request rate and p99 (c=32), c=1 latency, a 256-connection burst
# p99 (8 wrk threads; through the tunnel as 8 logged-in visits), the agent's RSS idle / under load / after, the stripped agent size, and ratios to direct.
#   bench/run.sh [ROUNDS] [SECONDS]     (defaults: 3 rounds, 5 s per wrk run)
# rathole and bore are installed when missing (`cargo install rathole`, unlocked: its locked
# dependencies no longer build with current Rust; `cargo install --locked bore-cli`); only if
# that fails is a column left out, and the run says so.
# BENCH_AGENT_ENV / BENCH_SERVER_ENV: "NAME=value …" set for the agent / server only (e.g.
# TOKIO_WORKER_THREADS=1), to compare runtime settings without a rebuild. BENCH_AGENT_WRAP: a
# command the agent runs under (e.g. "heaptrack -o /tmp/agent"; RSS figures are then the wrapper's).
# BENCH_AGENT / BENCH_SERVER: another agent / server binary to run (e.g. a copy built before a
# change, for before/after).
# BENCH_SERVER_ARGS: more arguments for the server's `run` (e.g. "--data-threads 2").
# BENCH_PERF=cpu|strace|allocs|small|bulk|burst measures instead of benchmarking: CPU seconds,
# datagrams, TCP connections opened and context switches per request (downloads, small requests at c=32 and in the
# burst, uploads), how idle the
# machine was, and streams opened per request at c=32 and in the burst; system calls per request; heap allocations per
# request in agent and server (heaptrack); perf profiles under small requests or bulk.
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
need bc bc
need_cargo() { # BIN CRATE [cargo install flags...]
  command -v "$1" >/dev/null && return 0
  echo "installing $2 for its column (once)" >&2
  cargo install -j2 "${@:3}" "$2" >&2 || echo "warning: cannot install $2: its column is left out" >&2
}
need_cargo rathole rathole
need_cargo bore bore-cli --locked

cargo build --release --locked --bins -j2 >&2
S=${BENCH_SERVER:-target/release/pbx-remote-server}
A=${BENCH_AGENT:-target/release/pbx-remote-agent}

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
  # /upload reads and discards a request body of any size (BENCH_PERF=cpu's upload).
  server { listen 127.0.0.1:$NGINX_PORT; root $T/www; location = /upload { client_max_body_size 0; return 204; } }
}
NGX
nginx -p "$T/nginx" -c "$T/nginx/nginx.conf" & NGINX_MASTER=$!; PIDS+=($!)

# BENCH_PERF=allocs: agent and server run under heaptrack, which counts every allocation.
if [ "${BENCH_PERF:-}" = allocs ]; then
  need heaptrack heaptrack
  BENCH_AGENT_WRAP="heaptrack -o $T/agent-heap"; BENCH_SERVER_WRAP="heaptrack -o $T/server-heap"
fi
env ${BENCH_SERVER_ENV:-} ${BENCH_SERVER_WRAP:-} "$S" run --data-dir "$T/data" --listen 127.0.0.1:0 --public-listen 127.0.0.1:0 ${BENCH_SERVER_ARGS:-} > "$T/server.out" 2> "$T/server.err" & SERVER_WRAP_PID=$!; PIDS+=($!)
for _ in $(seq 100); do grep -q "tunnel=" "$T/server.out" && break; sleep 0.1; done
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
[tunnel]
transport = "quic"
[paths]
state_dir = "$T/agent-state"
status_file = "$T/status.json"
assertion_pubkey = "$T/assertion.pub"
CFG
# BENCH_PERF=cpu also reads the agents' metrics (streams opened per request).
if [ "${BENCH_PERF:-}" = cpu ]; then
  METRICS_PORT=$(free_port); METRICS_TCP_PORT=$(free_port)
  printf '[metrics]\nlisten = "127.0.0.1:%s"\n' "$METRICS_PORT" >> "$T/agent.toml"
fi
# The agent runs with the environment its systemd unit gives it, as users get it.
UNIT_ENV=$(sed -n 's/^Environment=//p' systemd/pbx-remote-agent.service | tr '\n' ' ')
echo "agent environment: ${UNIT_ENV}${BENCH_AGENT_ENV:-}" >&2
env $UNIT_ENV ${BENCH_AGENT_ENV:-} ${BENCH_AGENT_WRAP:-} "$A" run -c "$T/agent.toml" 2> "$T/agent.err" & AGENT_PID=$!; PIDS+=($AGENT_PID)
state() { "$A" status --json -c "$T/agent.toml" 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["state"])'; }
for _ in $(seq 100); do [ "$(state)" = connected ] && break; sleep 0.1; done
[ "$(state)" = connected ] || { echo "agent did not connect"; cat "$T/agent.err"; exit 1; }
# The same agent forced onto the TCP transport, as a second device of the same server.
DEV2_JSON=$("$S" device add --name BenchTcp --data-dir "$T/data" --json)
DEVICE_TCP=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["device_id"])' "$DEV2_JSON")
CODE2=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["auth_code"])' "$DEV2_JSON")
sed -e "s|$T/agent-state|$T/agent-tcp-state|; s|$T/status.json|$T/status-tcp.json|; s|$T/assertion.pub|$T/assertion-tcp.pub|" \
  -e "s|auth_code = \"$CODE\"|auth_code = \"$CODE2\"|; s|BENCH1|BENCH2|; s|02:00:00:00:00:09|02:00:00:00:00:0a|" \
  -e 's|transport = "quic"|transport = "tcp"|' -e "s|127.0.0.1:${METRICS_PORT:-none}\"|127.0.0.1:${METRICS_TCP_PORT:-none}\"|" \
  "$T/agent.toml" > "$T/agent-tcp.toml"
env $UNIT_ENV ${BENCH_AGENT_ENV:-} "$A" run -c "$T/agent-tcp.toml" 2> "$T/agent-tcp.err" & AGENT_TCP_PID=$!; PIDS+=($AGENT_TCP_PID)
state_tcp() { "$A" status --json -c "$T/agent-tcp.toml" 2>/dev/null | python3 -c 'import json,sys; s=json.load(sys.stdin); print(s["state"], s.get("transport"))'; }
for _ in $(seq 100); do [ "$(state_tcp)" = "connected tcp" ] && break; sleep 0.1; done
[ "$(state_tcp)" = "connected tcp" ] || { echo "the TCP agent did not connect: $(state_tcp)"; cat "$T/agent-tcp.err"; exit 1; }

HOST="$DEVICE.localhost"
HOST_TCP="$DEVICE_TCP.localhost"
# Through the whole door: confirm a visit (grant cookie), then log in (session cookie).
login_cookie() { # JAR [DEVICE] → "cm_visit=…; pbxra_sid=…"
  local jar=$1 dev=${2:-$DEVICE} visit host
  host="$dev.localhost"
  visit=$("$S" visit "$dev" --as bench --data-dir "$T/data" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["url"])')
  curl -s -o /dev/null --resolve "$host:$PUBLIC_PORT:127.0.0.1" -c "$jar" -X POST "${visit%%\?*}"
  curl -s -o /dev/null --resolve "$host:$PUBLIC_PORT:127.0.0.1" -b "$jar" -c "$jar" \
    -H "Origin: http://$host:$PUBLIC_PORT" --data "username=bench&password=$BENCH_PW&next=%2F" \
    "http://$host:$PUBLIC_PORT/__remote/login"
  awk '$6 ~ /cm_visit|pbxra_sid/ {printf "%s%s=%s", (n++ ? "; " : ""), $6, $7}' "$jar"
}
COOKIE=$(login_cookie "$T/jar")
COOKIE_TCP=$(login_cookie "$T/jar-tcp" "$DEVICE_TCP")
# The burst comes from 8 visits (wrk threads), as from 8 browsers: one visit may hold at most
# 60 streams, and 256 connections of one visit would mostly measure its 429 answers.
BURST_THREADS=8
burst_script() { # DEVICE SUFFIX → $T/burst$SUFFIX.lua
  {
    echo "local cookies = {"
    for i in $(seq "$BURST_THREADS"); do printf '  "%s",\n' "$(login_cookie "$T/jar$2$i" "$1")"; done
    echo "}"
    echo 'local n = 0'
    echo 'function setup(thread) n = n + 1; thread:set("cookie", cookies[n]) end'
    echo 'function init(args) wrk.headers["Cookie"] = cookie end'
  } > "$T/burst$2.lua"
}
burst_script "$DEVICE" ""
burst_script "$DEVICE_TCP" "-tcp"
case "$COOKIE" in *pbxra_sid*) ;; *) echo "login failed: $COOKIE"; exit 1;; esac
code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$NGINX_PORT/small.html")
[ "$code" = 200 ] || { echo "nginx answered $code directly"; exit 1; }
code=$(curl -s -o "$T/resp" -w '%{http_code}' --resolve "$HOST:$PUBLIC_PORT:127.0.0.1" -H "Cookie: $COOKIE" "http://$HOST:$PUBLIC_PORT/small.html")
[ "$code" = 200 ] || { echo "gated request answered $code (cookies: ${COOKIE//=*;/=…;})"; cat "$T/resp"; cat "$T/jar"; exit 1; }

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$AGENT_PID/status"; }
RSS_IDLE=$(rss_kib)
# BENCH_SMAPS=FILE: keep the idle agent's memory map (where the idle RSS lives).
[ -n "${BENCH_SMAPS:-}" ] && cp "/proc/$AGENT_PID/smaps" "$BENCH_SMAPS"

wait_up() { # URL → succeeds once it answers 200 (within 10 s)
  local _
  for _ in $(seq 100); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "$1")" = 200 ] && return 0
    sleep 0.1
  done
  return 1
}

# A certificate for the encrypted hops of rathole and the nginx yardstick.
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=bench-ca" \
  -keyout "$T/ca.key" -out "$T/ca.pem" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" -keyout "$T/rh.key" -out "$T/rh.csr" 2>/dev/null
printf 'subjectAltName=DNS:localhost\n' > "$T/ext"
openssl x509 -req -in "$T/rh.csr" -CA "$T/ca.pem" -CAkey "$T/ca.key" -CAcreateserial \
  -days 2 -extfile "$T/ext" -out "$T/rh.pem" 2>/dev/null

# The yardstick ("nginx2"): the same topology as the tunnel built from the standard reverse
# proxy, with nothing of the door in it: a front nginx (2 workers) → TLS over TCP, kept
# connections → an agent-side nginx (2 workers) → the portal nginx. It shows what two
# encrypted proxy hops cost on this machine, with no session gate, visit check or QUIC.
NG_FRONT=$(free_port); NG_AGENT=$(free_port)
for hop in front agent; do
  mkdir -p "$T/ng-$hop"
  if [ $hop = front ]; then
    listen="listen 127.0.0.1:$NG_FRONT;"; upstream="server 127.0.0.1:$NG_AGENT;"; scheme=https
  else
    listen="listen 127.0.0.1:$NG_AGENT ssl; ssl_certificate $T/rh.pem; ssl_certificate_key $T/rh.key;"
    upstream="server 127.0.0.1:$NGINX_PORT;"; scheme=http
  fi
  cat > "$T/ng-$hop/nginx.conf" <<NGX
worker_processes 2;
daemon off;
pid $T/ng-$hop/nginx.pid;
error_log $T/ng-$hop/error.log;
events { worker_connections 2048; }
http {
  access_log off;
  keepalive_requests 100000;
  client_max_body_size 0;
  upstream next { $upstream keepalive 256; keepalive_requests 100000; }
  server {
    $listen
    location / {
      proxy_pass $scheme://next;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_ssl_session_reuse on;
    }
  }
}
NGX
  nginx -p "$T/ng-$hop" -c "$T/ng-$hop/nginx.conf" & PIDS+=($!)
  declare "NG_MASTER_$hop=$!"
done
wait_up "http://127.0.0.1:$NG_FRONT/small.html" || { echo "the nginx yardstick did not come up"; cat "$T"/ng-*/error.log; exit 1; }

# rathole with its TLS transport, forwarding a port to the same nginx.
RATHOLE=$(command -v rathole || true)
if [ -n "$RATHOLE" ]; then
  RH_CTRL=$(free_port); RH_PORT=$(free_port)
  openssl pkcs12 -export -out "$T/rh.pfx" -inkey "$T/rh.key" -in "$T/rh.pem" -passout pass:bench 2>/dev/null
  cat > "$T/rh-server.toml" <<RHS
[server]
bind_addr = "127.0.0.1:$RH_CTRL"
[server.transport]
type = "tls"
[server.transport.tls]
pkcs12 = "$T/rh.pfx"
pkcs12_password = "bench"
[server.services.portal]
token = "bench-token"
bind_addr = "127.0.0.1:$RH_PORT"
RHS
  cat > "$T/rh-client.toml" <<RHC
[client]
remote_addr = "localhost:$RH_CTRL"
[client.transport]
type = "tls"
[client.transport.tls]
trusted_root = "$T/ca.pem"
hostname = "localhost"
[client.services.portal]
token = "bench-token"
local_addr = "127.0.0.1:$NGINX_PORT"
RHC
  "$RATHOLE" -s "$T/rh-server.toml" > "$T/rh-server.log" 2>&1 & PIDS+=($!)
  "$RATHOLE" -c "$T/rh-client.toml" > "$T/rh-client.log" 2>&1 & PIDS+=($!)
  wait_up "http://127.0.0.1:$RH_PORT/small.html" || { echo "rathole did not come up"; cat "$T"/rh-*.log; exit 1; }
fi

# bore: a plain TCP tunnel (no encryption) to the same nginx. Its control port is fixed (7835).
BORE=$(command -v bore || true)
if [ -n "$BORE" ]; then
  BORE_PORT=$(free_port)
  "$BORE" server --bind-addr 127.0.0.1 --min-port "$BORE_PORT" --max-port "$BORE_PORT" > "$T/bore-server.log" 2>&1 & PIDS+=($!)
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/7835) 2>/dev/null && break; sleep 0.1; done
  "$BORE" local "$NGINX_PORT" --local-host 127.0.0.1 --to 127.0.0.1 --port "$BORE_PORT" > "$T/bore-client.log" 2>&1 & PIDS+=($!)
  wait_up "http://127.0.0.1:$BORE_PORT/small.html" || { echo "bore did not come up"; cat "$T"/bore-*.log; exit 1; }
fi

bulk() { # URL [extra curl args] → MB/s
  local url=$1; shift
  curl -s -o /dev/null -w '%{speed_download}' "$@" "$url" | awk '{printf "%.1f", $1/1048576}'
}
wrk_run() { # CONNS URL [wrk args...] → "rps p50_ms p99_ms"
  local c=$1 url=$2 t; shift 2
  t=$(( c < 2 ? c : 2 )); [ "$c" -ge 256 ] && t=$BURST_THREADS
  wrk -t"$t" -c"$c" -d"${SECS}s" --latency "$@" "$url" | awk -v c="$c" -v u="$url" '
    function ms(v) { if (v ~ /us$/) return v/1000; if (v ~ /ms$/) return v+0; if (v ~ /s$/) return v*1000; return v }
    /Requests\/sec/ {rps=$2} /^ +50%/ {p50=ms($2)} /^ +99%/ {p99=ms($2)}
    /Non-2xx/ {bad=$NF} /Socket errors/ {errs=$0}
    END {
      # Failed answers are fast and would flatter the figures: say so.
      if (bad > 0) printf "  warning: c=%s %s: %s non-2xx answers\n", c, u, bad > "/dev/stderr"
      if (errs != "") printf "  warning: c=%s %s: %s\n", c, u, errs > "/dev/stderr"
      printf "%.0f %.2f %.2f", rps, p50, p99
    }'
}

DIRECT="http://127.0.0.1:$NGINX_PORT"
TUN="http://127.0.0.1:$PUBLIC_PORT"
TH=(-H "Host: $HOST:$PUBLIC_PORT" -H "Cookie: $COOKIE")
TC_ARGS=(--resolve "$HOST:$PUBLIC_PORT:127.0.0.1" -H "Cookie: $COOKIE" -H "Host: $HOST:$PUBLIC_PORT")
TH_TCP=(-H "Host: $HOST_TCP:$PUBLIC_PORT" -H "Cookie: $COOKIE_TCP")
TC_TCP=(--resolve "$HOST_TCP:$PUBLIC_PORT:127.0.0.1" -H "Cookie: $COOKIE_TCP" -H "Host: $HOST_TCP:$PUBLIC_PORT")
RH="http://127.0.0.1:${RH_PORT:-0}"
TARGETS=(direct tunnel tunnel-tcp nginx2); [ -n "$RATHOLE" ] && TARGETS+=(rathole); [ -n "$BORE" ] && TARGETS+=(bore)
[ -n "${BENCH_TARGETS:-}" ] && read -r -a TARGETS <<<"$BENCH_TARGETS"   # e.g. "tunnel" alone
url_of() { case $1 in direct) echo "$DIRECT";; tunnel|tunnel-tcp) echo "$TUN";; rathole) echo "$RH";; bore) echo "http://127.0.0.1:$BORE_PORT";; nginx2) echo "http://127.0.0.1:$NG_FRONT";; esac; }
# The headers (wrk) and curl arguments that take a request through the door to each agent.
door() { # TARGET → sets extra, curl_extra, burst
  extra=(); curl_extra=(); burst=()
  case $1 in
    tunnel) extra=("${TH[@]}"); curl_extra=("${TC_ARGS[@]}"); burst=(-H "Host: $HOST:$PUBLIC_PORT" -s "$T/burst.lua");;
    tunnel-tcp) extra=("${TH_TCP[@]}"); curl_extra=("${TC_TCP[@]}"); burst=(-H "Host: $HOST_TCP:$PUBLIC_PORT" -s "$T/burst-tcp.lua");;
  esac
}
RSS_LOAD=$RSS_IDLE
udp_out() { awk '/^Udp:/ { n++; if (n == 2) print $5 }' /proc/net/snmp; }   # OutDatagrams (a GSO batch counts once)
tcp_opens() { awk '/^Tcp:/ { n++; if (n == 2) print $6 }' /proc/net/snmp; }   # ActiveOpens: connect() calls, machine-wide
cpu_ticks() { # PID... → summed utime+stime clock ticks
  local sum=0 p; for p in "$@"; do sum=$((sum + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done; echo "$sum"
}
idle_ticks() { awk '/^cpu / {print $5 + $6}' /proc/stat; }   # the machine's idle + iowait ticks, all cores
switches() { # PID... → context switches of all their threads (voluntary + not)
  cat $(for p in "$@"; do echo /proc/"$p"/task/*/status; done) 2>/dev/null | awk '/ctxt_switches/ {s += $2} END {print s + 0}'
}
# The server process, for the measuring modes below.
SERVER_PID=$SERVER_WRAP_PID   # env execs the server; under a wrapper, the server is its child
[ -n "${BENCH_SERVER_WRAP:-}" ] && SERVER_PID=$(pgrep -P "$SERVER_WRAP_PID" -n || echo "$SERVER_WRAP_PID")
if [ "${BENCH_PERF:-}" = cpu ]; then
  # Where the CPU goes: each process's CPU seconds for the same work, direct and through the
  # tunnel (the client's share is the elapsed time × 2 cores minus the rest, roughly).
  # For the nginx2 yardstick, "agent" and "server" are its agent-side and front nginx.
  workers() { pgrep -P "$1" | tr '\n' ' '; }
  NGINX_PIDS=$(workers "$NGINX_MASTER")
  HZ=$(getconf CLK_TCK)
  # Streams the server opened and requests the agent answered, from an agent's metrics.
  streams_requests() { # PORT → "streams requests"
    curl -s "http://127.0.0.1:$1/metrics" | awk '/^pbxra_tunnel_streams_total / {s = $2} /^pbxra_requests_total/ {r += $2} END {print s + 0, r + 0}'
  }
  for t in tunnel tunnel-tcp; do
    # A visitor connection keeps its stream while the tunnel has room: at c=32 a stream serves
    # many requests; in the 256-connection burst the tunnel is full and most requests open one.
    u=$(url_of "$t"); door "$t"; port=$METRICS_PORT; [ "$t" = tunnel-tcp ] && port=$METRICS_TCP_PORT
    for c in 32 256; do
      read -r s0 r0 <<<"$(streams_requests "$port")"
      if [ "$c" = 32 ]; then wrk_run 32 "$u/small.html" "${extra[@]}" >/dev/null; else wrk_run 256 "$u/small.html" "${burst[@]}" >/dev/null; fi
      read -r s1 r1 <<<"$(streams_requests "$port")"
      awk -v t="$t" -v c="$c" -v s=$((s1 - s0)) -v r=$((r1 - r0)) 'BEGIN { printf "%-10s c=%-3s %7d requests, %6d streams opened: %.3f per request\n", t, c, r, s, (r ? s / r : 0) }'
    done
  done
  for t in direct tunnel tunnel-tcp nginx2; do
    u=$(url_of "$t"); door "$t"
    AP=$AGENT_PID; SP=$SERVER_PID
    [ "$t" = tunnel-tcp ] && AP=$AGENT_TCP_PID
    [ "$t" = nginx2 ] && { AP=$(workers "$NG_MASTER_agent"); SP=$(workers "$NG_MASTER_front"); }
    for work in bulk small burst upload; do
      i0=$(idle_ticks); a0=$(cpu_ticks $AP); s0=$(cpu_ticks $SP); as0=$(switches $AP); ss0=$(switches $SP); n0=$(cpu_ticks $NGINX_PIDS); d0=$(udp_out); o0=$(tcp_opens); w0=$(date +%s.%N)
      if [ $work = bulk ]; then
        out="$(bulk "$u/big.bin" "${curl_extra[@]}") MB/s"; work_n=1
      elif [ $work = upload ]; then
        # The same 256 MiB the other way: a POST the portal reads and discards.
        host=$(printf '%s\n' "${curl_extra[@]}" | sed -n 's/^Host: //p')
        out="$(curl -s -o /dev/null -w '%{http_code} %{speed_upload}' -X POST --data-binary @"$T/www/big.bin" \
          ${host:+-H "Origin: http://$host"} "${curl_extra[@]}" "$u/upload" | awk '$1 != 204 { print "  warning: upload answered " $1 > "/dev/stderr" } {printf "%.1f", $2/1048576}') MB/s"; work_n=1
      elif [ $work = burst ]; then
        # The 256-connection burst (through the tunnel as 8 visits), as in the benchmark.
        read -r rps _ _ <<<"$(wrk_run 256 "$u/small.html" "${burst[@]}")"; out="$rps req/s"
        work_n=$(awk -v r="$rps" -v s="$SECS" 'BEGIN { printf "%d", r * s }')
      else
        read -r rps _ _ <<<"$(wrk_run 32 "$u/small.html" "${extra[@]}")"; out="$rps req/s"
        work_n=$(awk -v r="$rps" -v s="$SECS" 'BEGIN { printf "%d", r * s }')
      fi
      w1=$(date +%s.%N); idle=$(( $(idle_ticks) - i0 ))
      d=$(( $(udp_out) - d0 )); opens=$(( $(tcp_opens) - o0 )); as=$(( $(switches $AP) - as0 )); ss=$(( $(switches $SP) - ss0 )); a=$(( $(cpu_ticks $AP) - a0 )); s=$(( $(cpu_ticks $SP) - s0 )); n=$(( $(cpu_ticks $NGINX_PIDS) - n0 ))
      awk -v t="$t" -v w="$work" -v o="$out" -v a="$a" -v s="$s" -v n="$n" -v hz="$HZ" -v e="$(echo "$w1 - $w0" | bc)" \
        -v d="$d" -v opens="$opens" -v k="$work_n" -v as="$as" -v ss="$ss" -v idle="$idle" -v cores="$(nproc)" \
        'BEGIN { printf "%-6s %-5s %-14s elapsed %5.2fs  cpu s: agent %5.2f server %5.2f nginx %5.2f, machine idle %3.0f%%  %sUDP datagrams %.1f, TCP connections opened %.3f, switches agent %.1f server %.1f\n", t, w, o, e, a/hz, s/hz, n/hz, 100 * idle / hz / e / cores, (k > 1 ? "per request: " : ""), d/k, opens/k, as/k, ss/k }'
    done
  done
  exit 0
fi
if [ "${BENCH_PERF:-}" = strace ]; then
  # System calls per tunnel request: strace counts the agent's and the server's calls during
  # one c=32 run (strace slows both down; the counts per request are what matter).
  need strace strace
  strace -c -f -p "$AGENT_PID" -o "$T/agent.strace" & P1=$!
  strace -c -f -p "$SERVER_PID" -o "$T/server.strace" & P2=$!
  sleep 1
  read -r rps _ _ <<<"$(wrk_run 32 "$TUN/small.html" "${TH[@]}")"
  kill -INT "$P1" "$P2"; wait "$P1" "$P2" 2>/dev/null || true
  reqs=$(awk -v r="$rps" -v s="$SECS" 'BEGIN { printf "%d", r * s }')
  for who in agent server; do
    echo "== $who: calls per request over $reqs requests"
    awk -v n="$reqs" '$1 ~ /^[0-9.]+$/ && NF >= 5 { calls = $4; errs = (NF == 6 ? $5 : 0); printf "  %-16s %7.2f  (errors %.2f)\n", $NF, calls / n, errs / n }' "$T/$who.strace" | sort -k2 -gr | head -12
  done
  exit 0
fi
if [ "${BENCH_PERF:-}" = allocs ]; then
  # Heap allocations per tunnel request in agent and server: one c=32 run under heaptrack,
  # then both are stopped so heaptrack writes its totals (startup and login add a few
  # thousand, well under 1 % of a run's). Unlike CPU time, the count ignores the noise.
  reqs=$(wrk -t2 -c32 -d"${SECS}s" "${TH[@]}" "$TUN/small.html" | awk '/requests in/ {print $1}')
  pkill -TERM -P "$AGENT_PID" -x "$(basename "$A" | cut -c1-15)" || true
  pkill -TERM -P "$SERVER_WRAP_PID" -x "$(basename "$S" | cut -c1-15)" || true
  wait "$AGENT_PID" "$SERVER_WRAP_PID" 2>/dev/null || true
  for who in agent server; do
    heaptrack_print "$T/$who"-heap*.zst -F "$T/$who.stacks" --flamegraph-cost-type allocations > "$T/$who.heap" 2>/dev/null || true
    [ -n "${BENCH_PERF_KEEP:-}" ] && cp "$T/$who.stacks" "$BENCH_PERF_KEEP.$who.stacks"
    total=$(awk '/^calls to allocation functions:/ {print $5}' "$T/$who.heap")
    echo "$who: $total allocations over $reqs requests: $(awk -v a="$total" -v r="$reqs" 'BEGIN { printf "%.1f", a / r }') per request"
    echo "== where (innermost pbx_remote frame → what it called), per request"
    python3 - "$T/$who.stacks" "$reqs" <<'PY'
import collections, re, sys
calls = collections.Counter()
for line in open(sys.argv[1]):
    stack, _, n = line.rstrip().rpartition(" ")
    frames = [re.sub(r"::h[0-9a-f]{16}$", "", f) for f in stack.split(";")]
    for old, new in (("$u7b$", "{"), ("$u7d$", "}"), ("$LT$", "<"), ("$GT$", ">"), ("$u20$", " "),
                     ("$C$", ","), ("$RF$", "&"), ("..", "::")):
        frames = [f.replace(old, new) for f in frames]
    ours = [i for i, f in enumerate(frames) if "pbx_remote" in f]
    if ours:
        i = ours[-1]
        key = frames[i] + ("  →  " + frames[i + 1] if i + 1 < len(frames) else "")
    else:
        key = next((f for f in reversed(frames) if re.match(r"<?(quinn|hyper|tokio)", f)), frames[-1])
    calls[key[:150]] += int(n)
for key, n in calls.most_common(15):
    print(f"  {n / int(sys.argv[2]):6.2f}  {key}")
PY
  done
  exit 0
fi
if [ -n "${BENCH_PERF:-}" ]; then
  # Profile agent and server under the small-request load (BENCH_PERF=bulk: under bulk
  # downloads; BENCH_PERF=burst: under the 256-connection burst) instead of benchmarking. BENCH_PERF_G: perf's call-graph option (default -g;
  # "--call-graph dwarf" unwinds the release build, which has no frame pointers).
  echo "profiling agent $AGENT_PID, server $SERVER_PID" >&2
  perf record -F 999 ${BENCH_PERF_G:--g} -p "$AGENT_PID" -o "$T/agent.perf" -- sleep 6 >/dev/null 2>&1 & P1=$!
  perf record -F 999 ${BENCH_PERF_G:--g} -p "$SERVER_PID" -o "$T/server.perf" -- sleep 6 >/dev/null 2>&1 & P2=$!
  if [ "$BENCH_PERF" = bulk ]; then
    end=$((SECONDS + 6)); while [ $SECONDS -lt $end ]; do bulk "$TUN/big.bin" "${TC_ARGS[@]}" >/dev/null; done
  elif [ "$BENCH_PERF" = burst ]; then
    door tunnel; wrk_run 256 "$TUN/small.html" "${burst[@]}" >/dev/null
  else
    wrk_run 32 "$TUN/small.html" "${TH[@]}" >/dev/null
  fi
  wait "$P1" "$P2"
  for who in agent server; do
    echo "== $who: top self time"
    perf report -i "$T/$who.perf" --no-children --stdio --sort dso,symbol 2>&1 | grep -E '^ +[0-9]' | head -30 || true
    [ -n "${BENCH_PERF_KEEP:-}" ] && cp "$T/$who.perf" "$BENCH_PERF_KEEP.$who.perf"
  done
  exit 0
fi
declare -A R
add() { R[$1]="${R[$1]:-} $2"; }   # add KEY VALUE: collects one value per round
latest() { echo ${R[$1]:-} | awk '{print $NF}'; }   # latest KEY: the value last added
watch_rss() { # samples the agent's RSS while a load runs; prints the peak
  local peak=0 now
  while [ -e "$T/loading" ]; do now=$(rss_kib); [ "$now" -gt "$peak" ] && peak=$now; sleep 0.05; done
  echo "$peak"
}
skip() { case " ${BENCH_SKIP:-} " in *" $1 "*) return 0;; esac; return 1; }   # BENCH_SKIP="bulk burst"
for r in $(seq "$ROUNDS"); do
  for t in "${TARGETS[@]}"; do
    u=$(url_of "$t"); door "$t"
    touch "$T/loading"; watch_rss > "$T/peak" & W=$!
    skip bulk || for _ in 1 2 3; do add "$t.bulk" "$(bulk "$u/big.bin" "${curl_extra[@]}")"; done
    read -r rps p50 p99 <<<"$(wrk_run 32 "$u/small.html" "${extra[@]}")"
    add "$t.rps" "$rps"; add "$t.p99" "$p99"
    read -r _ p50 _ <<<"$(wrk_run 1 "$u/small.html" "${extra[@]}")"; add "$t.c1" "$p50"
    if ! skip burst; then
      read -r brps _ p99 <<<"$(wrk_run 256 "$u/small.html" "${burst[@]}")"; add "$t.burst" "$p99"; add "$t.brps" "$brps"
    fi
    rm -f "$T/loading"; wait "$W"
    if [ "$t" = tunnel ]; then peak=$(cat "$T/peak"); [ "$peak" -gt "$RSS_LOAD" ] && RSS_LOAD=$peak; fi
  done
  line="round $r:"
  for t in "${TARGETS[@]}"; do
    line="$line $t[bulk $(latest "$t.bulk") rps $(latest "$t.rps") p99 $(latest "$t.p99") burst $(latest "$t.burst") at $(latest "$t.brps") req/s]"
  done
  echo "$line" >&2
done
sleep 2
RSS_AFTER=$(rss_kib)

median() { printf '%s\n' $@ | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f×", a/b; else print "-" }'; }

echo
echo "pbx-remote bench: $ROUNDS interleaved rounds, wrk ${SECS}s, ${BIG_MB} MiB bulk, loopback, release build"
OTHERS=(); for t in tunnel-tcp nginx2 rathole bore; do [[ " ${TARGETS[*]} " = *" $t "* ]] && OTHERS+=("$t"); done
printf '%-24s %10s %10s %8s' "metric" "direct" "tunnel" "ratio"
for t in "${OTHERS[@]}"; do printf ' %10s %8s' "$t" "ratio"; done
echo
for m in "bulk MB/s:bulk" "small req/s c=32:rps" "p99 ms c=32:p99" "p50 ms c=1:c1" "burst p99 ms c=256:burst" "burst req/s c=256:brps"; do
  label=${m%%:*}; key=${m##*:}
  d=$(median ${R[direct.$key]:-}); tn=$(median ${R[tunnel.$key]:-})
  printf '%-24s %10s %10s %8s' "$label" "$d" "$tn" "$(ratio "$tn" "$d")"
  for t in "${OTHERS[@]}"; do o=$(median ${R[$t.$key]:-}); printf ' %10s %8s' "$o" "$(ratio "$o" "$d")"; done
  echo
done
# The tunnel against two TLS-linked nginx proxies in the same topology, paired sample by
# sample within each round, then the median: what the door, QUIC and the session gate cost
# beyond two encrypted proxy hops on the same machine at the same moment.
vs_nginx2() { # KEY [TARGET [BASE]] → median ratio TARGET (tunnel)/BASE (nginx2) (empty without both)
  local rs=() tv nv i
  read -r -a tv <<<"${R[${2:-tunnel}.$1]:-}"; read -r -a nv <<<"${R[${3:-nginx2}.$1]:-}"
  for i in "${!tv[@]}"; do [ -n "${nv[$i]:-}" ] && rs+=("$(awk -v a="${tv[$i]}" -v b="${nv[$i]}" 'BEGIN { if (b > 0) printf "%.3f", a/b }')"); done
  [ ${#rs[@]} -gt 0 ] && echo "$(median "${rs[@]}") ${rs[*]}"
}
echo
strip -o "$T/agent.stripped" "$A"
STRIPPED=$(stat -c %s "$T/agent.stripped")
echo "agent RSS: idle ${RSS_IDLE} KiB, peak under load (incl. the c=256 burst) ${RSS_LOAD} KiB, after ${RSS_AFTER} KiB"
echo "agent binary: $(stat -c %s "$A") bytes as built, $STRIPPED bytes stripped ($(awk -v b="$STRIPPED" 'BEGIN{printf "%.2f", b/1048576}') MiB)"
# Targets (issue 6, re-baselined in session 11 for bulk and small requests; see README).
verdict() { # LABEL VALUE OP LIMIT → "LABEL VALUE (target OP LIMIT): met|MISSED"
  local ok; ok=$(awk -v v="$2" -v l="$4" -v op="$3" 'BEGIN { if (v == "") print "not measured"; else if ((op == "≥" && v >= l) || (op == "≤" && v <= l)) print "met"; else print "MISSED" }')
  printf '  %-34s %12s  (target %s %s): %s\n' "$1" "$2" "$3" "$4" "$ok"
}
echo "targets:"
read -r bulk_vs bulk_rounds <<<"$(vs_nginx2 bulk)" || true
read -r rps_vs rps_rounds <<<"$(vs_nginx2 rps)" || true
verdict "bulk, tunnel / nginx2" "${bulk_vs:-}" "≥" 1.0
verdict "small req/s, tunnel / nginx2" "${rps_vs:-}" "≥" 0.8
verdict "p99 ms c=32" "$(median ${R[tunnel.p99]:-})" "≤" 4
verdict "burst p99 ms c=256" "$(median ${R[tunnel.burst]:-})" "≤" 50
verdict "idle RSS KiB" "$RSS_IDLE" "≤" 8192
peak=$RSS_LOAD; skip burst && peak=""   # without the burst there is no burst peak to judge
verdict "peak RSS KiB (burst)" "$peak" "≤" 24576
verdict "stripped agent bytes" "$STRIPPED" "≤" 6291456
echo "  (per-sample ratios to nginx2: bulk ${bulk_rounds:-none}; small ${rps_rounds:-none})"
# The TCP transport against the same targets as the QUIC tunnel.
read -r tbulk_vs tbulk_rounds <<<"$(vs_nginx2 bulk tunnel-tcp)" || true
read -r trps_vs trps_rounds <<<"$(vs_nginx2 rps tunnel-tcp)" || true
echo "targets, TCP transport:"
verdict "bulk, tunnel-tcp / nginx2" "${tbulk_vs:-}" "≥" 1.0
verdict "small req/s, tunnel-tcp / nginx2" "${trps_vs:-}" "≥" 0.8
verdict "p99 ms c=32 (tcp)" "$(median ${R[tunnel-tcp.p99]:-})" "≤" 4
verdict "burst p99 ms c=256 (tcp)" "$(median ${R[tunnel-tcp.burst]:-})" "≤" 50
echo "  (per-sample ratios to nginx2: bulk ${tbulk_rounds:-none}; small ${trps_rounds:-none})"
# Issue 23's targets, for both transports: against nginx2 and rathole with TLS, paired by round.
for t in tunnel tunnel-tcp; do
  [[ " ${TARGETS[*]} " = *" $t "* ]] || continue
  echo "targets of issue 23, $t:"
  verdict "small req/s, $t / nginx2" "$(vs_nginx2 rps "$t" | cut -d' ' -f1)" "≥" 1.0
  verdict "small req/s, $t / rathole-tls" "$(vs_nginx2 rps "$t" rathole | cut -d' ' -f1)" "≥" 1.1
  verdict "bulk, $t / nginx2" "$(vs_nginx2 bulk "$t" | cut -d' ' -f1)" "≥" 1.1
  verdict "bulk, $t / rathole-tls" "$(vs_nginx2 bulk "$t" rathole | cut -d' ' -f1)" "≥" 1.2
  verdict "p99 ms c=32 ($t)" "$(median ${R[$t.p99]:-})" "≤" 3
  verdict "burst p99 ms c=256 ($t)" "$(median ${R[$t.burst]:-})" "≤" 25
  # The latency targets are absolute; on a shared 2-core machine the yardstick's own tail moves
  # with the machine, so each run also says where the tunnel stands against it.
  echo "  (against nginx2 in this run: p99 $(vs_nginx2 p99 "$t" | cut -d' ' -f1)×, burst p99 $(vs_nginx2 burst "$t" | cut -d' ' -f1)×; direct nginx's own p99 $(median ${R[direct.p99]:-}) ms)"
done
[ -n "$BORE" ] && echo "  (bore, no encryption, the floor: small $(vs_nginx2 rps bore | cut -d' ' -f1)× nginx2, bulk $(vs_nginx2 bulk bore | cut -d' ' -f1)× nginx2)"
echo "the first targets, kept for comparison: bulk ≥ 0.30× direct (here $(ratio "$(median ${R[tunnel.bulk]:-})" "$(median ${R[direct.bulk]:-})"), nginx2 $(ratio "$(median ${R[nginx2.bulk]:-})" "$(median ${R[direct.bulk]:-})")), small ≥ 0.55× direct (here $(ratio "$(median ${R[tunnel.rps]:-})" "$(median ${R[direct.rps]:-})"), nginx2 $(ratio "$(median ${R[nginx2.rps]:-})" "$(median ${R[direct.rps]:-})"))"
