#!/usr/bin/env bash
# The mesh on one machine: a control plane fed by deploy/examples/mesh/,
# the model's sidecar (llama-0) in front of the bundled mock model server,
# a chat app's sidecar (chat-0) and a gateway (edge-0). Each proxy gets its
# certificate (for a join token) and its config from the control plane;
# requests go gateway -> mutual TLS -> llama-0 -> model, and chat-0 ->
# mutual TLS -> llama-0 -> model. Then a route is changed and every proxy
# acknowledges it. Keeps running until Ctrl-C; with --once, stops after.
#
# INFERMESH_BIN=DIR uses the binaries in DIR instead of building them.
set -euo pipefail
cd "$(dirname "$0")/.."

once=false
[[ "${1:-}" == "--once" ]] && once=true

if [[ -n "${INFERMESH_BIN:-}" ]]; then
  bin=$INFERMESH_BIN
else
  cargo build --quiet --bin infermesh-proxy --bin infermesh-control-plane --bin infermesh-bench
  bin=target/debug
fi
work=$(mktemp -d "${TMPDIR:-/tmp}/infermesh-mesh.XXXXXX")
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }
cp=$bin/infermesh-control-plane

# The CA, and a join token for each workload: the only secrets a proxy gets.
"$cp" ca init --trust-domain cluster.local --out "$work/ca" >/dev/null
for who in models/llama apps/chat edge/gateway; do
  "$cp" token create --tokens "$work/tokens.yaml" --namespace "${who%/*}" \
    --service-account "${who#*/}" --out "$work/${who#*/}.token" >/dev/null
done
mkdir "$work/config"
cp deploy/examples/mesh/*.yaml "$work/config/"

"$bin/infermesh-bench" serve --listen 127.0.0.1:9000 --model mock-llm --tokens 8 >/dev/null &
pids+=($!)
"$cp" serve --ca "$work/ca" --tokens "$work/tokens.yaml" --config-dir "$work/config" \
  --listen 127.0.0.1:15012 --admin 127.0.0.1:15014 >"$work/control-plane.log" 2>&1 &
pids+=($!)

# proxy NAME HEALTH-PORT ARGS...: one proxy of the mesh, its log in $work.
proxy() {
  local name=$1 health=$2
  shift 2
  "$bin/infermesh-proxy" "$@" --node "$name" --control-plane 127.0.0.1:15012 \
    --trust-bundle "$work/ca/root-cert.pem" --health-address "127.0.0.1:$health" \
    >"$work/$name.log" 2>&1 &
  pids+=($!)
}
proxy llama-0 15120 sidecar --label app=llama --credential "$work/llama.token" \
  --admin-address 127.0.0.1:15100 --inbound-address 127.0.0.1:15106 --outbound-address 127.0.0.1:15101
proxy chat-0 15220 sidecar --label app=chat --credential "$work/chat.token" \
  --admin-address 127.0.0.1:15200 --inbound-address 127.0.0.1:15206 --outbound-address 127.0.0.1:15201
proxy edge-0 15020 gateway --credential "$work/gateway.token" --admin-address 127.0.0.1:15000

for health in 15120 15220 15020; do
  for _ in $(seq 100); do
    curl -fs "http://127.0.0.1:$health/ready" >/dev/null 2>&1 && break
    sleep 0.1
  done
  if ! curl -fs "http://127.0.0.1:$health/ready" >/dev/null; then
    echo "a proxy did not become ready; logs:" >&2
    tail -n 20 "$work"/*.log >&2
    exit 1
  fi
done

chat='{"model":"mock-llm","messages":[{"role":"user","content":"hi"}]}'

step "curl -s localhost:8080/v1/chat/completions   # gateway -> mTLS -> llama-0 -> model"
curl -fsS http://127.0.0.1:8080/v1/chat/completions -H 'content-type: application/json' -d "$chat"
echo

step "curl -s -H 'host: llama.models' localhost:15201/v1/chat/completions   # what the chat app sends to its sidecar"
curl -fsS http://127.0.0.1:15201/v1/chat/completions -H 'host: llama.models' \
  -H 'content-type: application/json' -d "$chat"
echo

step infermesh-control-plane status
"$cp" status --admin 127.0.0.1:15014

step "curl -s localhost:15014/debug/config?proxy=chat-0   # what chat-0 was sent"
curl -fsS 'http://127.0.0.1:15014/debug/config?proxy=chat-0' | grep -E '"(kind|name|version)"' | head -n 8

models=$work/config/models.yaml
wait_for() { for _ in $(seq 100); do eval "$1" && return 0; sleep 0.1; done; return 1; }

step "sed -i s/responseHeaders/responseHeadres/ config/models.yaml   # a typo: refused, where it is; nothing is pushed"
sed -i 's/responseHeaders: 120s/responseHeadres: 90s/' "$models"
wait_for 'grep -q "config change refused" "$work/control-plane.log"'
grep -A2 'config change refused' "$work/control-plane.log" | tail -n 1

step "sed -i s/responseHeadres: 90s/responseHeaders: 90s/ config/models.yaml   # fixed: the proxies that hold the route get it"
before=$("$cp" status --admin 127.0.0.1:15014)
sed -i 's/responseHeadres: 90s/responseHeaders: 90s/' "$models"
wait_for '[[ "$("$cp" status --admin 127.0.0.1:15014)" != "$before" ]] && ! "$cp" status --admin 127.0.0.1:15014 | grep -q STALE'
"$cp" status --admin 127.0.0.1:15014
echo "(edge-0 keeps its version: the gateway sends to llama.models directly, and holds no copy of that route)"

if $once; then exit 0; fi
printf '\nThe gateway listens on 127.0.0.1:8080, chat-0 takes the app'"'"'s calls on 127.0.0.1:15201;\nthe control plane'"'"'s admin is 127.0.0.1:15014; logs are in %s. Ctrl-C stops it all.\n' "$work"
wait
