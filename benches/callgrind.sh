#!/usr/bin/env bash
# Instructions per request of one or more infermesh-proxy builds, counted
# by valgrind's callgrind: the same total for the same binary and load
# whatever else the machine is doing, so two builds compare exactly where
# a timed run on shared cores cannot.
#
#   benches/callgrind.sh target/release/infermesh-proxy [OTHER_BUILD...] [haproxy] [nginx]
#
# For each build: a gateway (one worker thread) in front of the bundled
# mock model server, run twice under callgrind, with SMALL and then LARGE
# OpenAI chat requests sent at a fixed rate (open loop, so each run sends
# exactly rate × time requests); the difference of the two totals, divided
# by the difference of the requests, is the cost of one request without
# start-up and shutdown. Prints one line per build. `haproxy` and `nginx`
# in place of a build count those proxies the same way (one thread, one
# worker, keep-alive to the mock, no access log): the user-space cost of a
# request next to infermesh's, which timed runs cannot separate from the
# kernel's share. ACCESS_LOG=json (or
# ecs, or human) runs the proxies with the access log on in that format,
# to standard output (a file), to count what the log costs; by default it
# is off. KEEP=DIR keeps each build's profile of the longer run in DIR
# (NAME.callgrind.out), for callgrind_annotate. Needs valgrind (Debian
# package `valgrind`) and infermesh-bench built next to the first build.
# Every run is bounded in time and every process started is stopped.
set -euo pipefail

[ $# -ge 1 ] || { sed -n '2,20p' "$0" >&2; exit 2; }
command -v valgrind >/dev/null || { echo "callgrind.sh: valgrind is not installed (apt install valgrind)" >&2; exit 1; }
bench="$(dirname "$1")/infermesh-bench"
[ -x "$bench" ] || { echo "callgrind.sh: $bench not found; build it with cargo build --release" >&2; exit 1; }
for proxy in "$@"; do
  case "$proxy" in
    haproxy|nginx) command -v "$proxy" >/dev/null || { echo "callgrind.sh: $proxy is not installed" >&2; exit 1; } ;;
  esac
done

RATE=${RATE:-100}            # requests per second; callgrind slows the proxy ~50x
ACCESS_LOG=${ACCESS_LOG:-}   # empty: access log off; json, ecs or human: on
case "$ACCESS_LOG" in
  "") log_flags=(--log-level "info,infermesh::access=off") ;;
  json|ecs|human) log_flags=(--log-format "$ACCESS_LOG" --log-level info) ;;
  *) echo "callgrind.sh: ACCESS_LOG must be json, ecs or human" >&2; exit 2 ;;
esac
KEEP=${KEEP:-}                # a directory to keep the longer runs' profiles in
SMALL=${SMALL:-3}            # seconds of load of the first run
LARGE=${LARGE:-13}           # seconds of load of the second run
work=$(mktemp -d)
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 600); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; echo "callgrind.sh: nothing listens on $1" >&2; return 1; }

mock=$(free_port)
"$bench" serve --listen "127.0.0.1:$mock" --model mock-llm >"$work/mock.log" 2>&1 &
pids+=($!)
wait_port "$mock"

# Instructions (Ir) callgrind counted for one run of `proxy` with `seconds`
# of load.
count() {
  local proxy=$1 seconds=$2 port admin health out
  port=$(free_port); admin=$(free_port); health=$(free_port)
  out="$work/callgrind.$seconds.out"
  case "$proxy" in
    haproxy)
      write_haproxy "$port"
      valgrind --tool=callgrind --callgrind-out-file="$out" \
        haproxy -db -f "$work/haproxy.cfg" >"$work/proxy.log" 2>&1 &
      ;;
    nginx)
      write_nginx "$port"
      valgrind --tool=callgrind --callgrind-out-file="$out" \
        nginx -c "$work/nginx.conf" -p "$work" >"$work/proxy.log" 2>&1 &
      ;;
    *)
      write_gateway "$port"
      valgrind --tool=callgrind --callgrind-out-file="$out" \
        "$proxy" --concurrency 1 "${log_flags[@]}" gateway --config "$work/gateway.yaml" \
        --admin-address "127.0.0.1:$admin" --health-address "127.0.0.1:$health" \
        --shutdown-grace-period 5s >"$work/proxy.log" 2>&1 &
      ;;
  esac
  local pid=$!
  pids+=("$pid")
  wait_port "$port"
  timeout $((seconds + 60)) "$bench" load "http://127.0.0.1:$port" --template openai-chat \
    --rate "$RATE" --connections 4 --duration "${seconds}s" --warmup 0s >"$work/load.log" 2>&1
  kill -TERM "$pid"
  wait "$pid" || true
  grep -E '^summary:' "$out" | awk '{print $2}'
}

# infermesh's gateway file: on `port`, in front of the mock.
write_gateway() {
  cat >"$work/gateway.yaml" <<EOF
apiVersion: infermesh.io/v1alpha1
kind: Listener
metadata: { name: public }
spec: { address: "127.0.0.1:$1" }
---
apiVersion: infermesh.io/v1alpha1
kind: Backend
metadata: { name: mock }
spec: { endpoints: [{ address: "127.0.0.1:$mock" }] }
---
apiVersion: infermesh.io/v1alpha1
kind: Route
metadata: { name: all }
spec: { rules: [{ backends: [{ name: mock }] }] }
EOF
}

# HAProxy's: one thread, keep-alive both ways, no log.
write_haproxy() {
  cat >"$work/haproxy.cfg" <<EOF
global
  nbthread 1
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  option http-keep-alive
frontend public
  bind 127.0.0.1:$1
  default_backend mock
backend mock
  server mock 127.0.0.1:$mock
EOF
}

# nginx's: one worker in the foreground process, upstream keep-alive, no
# access log, its files in the work directory.
write_nginx() {
  cat >"$work/nginx.conf" <<EOF
daemon off;
master_process off;
worker_processes 1;
pid $work/nginx.pid;
error_log $work/nginx.err;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $work/nginx-body;
  proxy_temp_path $work/nginx-proxy;
  fastcgi_temp_path $work/nginx-fastcgi;
  uwsgi_temp_path $work/nginx-uwsgi;
  scgi_temp_path $work/nginx-scgi;
  upstream mock { server 127.0.0.1:$mock; keepalive 64; }
  server {
    listen 127.0.0.1:$1;
    location / {
      proxy_pass http://mock;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }
  }
}
EOF
}

printf '%-50s %14s\n' "build" "instructions/request"
for proxy in "$@"; do
  small=$(count "$proxy" "$SMALL")
  large=$(count "$proxy" "$LARGE")
  if [ -n "$KEEP" ]; then mkdir -p "$KEEP" && cp "$work/callgrind.$LARGE.out" "$KEEP/$(basename "$proxy").callgrind.out"; fi
  requests=$((RATE * (LARGE - SMALL)))
  printf '%-50s %14d\n' "$proxy" $(((large - small) / requests))
done
