#!/usr/bin/env bash
# Brings up infermesh-proxy as a gateway (deploy/examples/gateway.yaml) in
# front of the bundled mock model server, and sends an OpenAI-style chat
# request (whole and streamed) and a KServe v2 inference request through it.
# Keeps both running until Ctrl-C; with --once, stops after the requests.
set -euo pipefail
cd "$(dirname "$0")/.."

once=false
[[ "${1:-}" == "--once" ]] && once=true

cargo build --quiet --bin infermesh-proxy --bin infermesh-bench
bin=target/debug
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

log=target/demo-gateway.log
"$bin/infermesh-bench" serve --listen 127.0.0.1:9000 --model mock-llm --tokens 8 --token-interval 150ms >/dev/null &
pids+=($!)
"$bin/infermesh-proxy" gateway --config deploy/examples/gateway.yaml \
  --admin-address 127.0.0.1:15000 --health-address 127.0.0.1:15020 >"$log" 2>&1 &
pids+=($!)

for _ in $(seq 100); do
  curl -fs http://127.0.0.1:15020/ready >/dev/null 2>&1 && break
  sleep 0.1
done
curl -fs http://127.0.0.1:15020/ready >/dev/null || { echo "the gateway did not become ready:" >&2; cat "$log" >&2; exit 1; }

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }

step curl -s localhost:8080/v1/chat/completions -d '{"model":"mock-llm","messages":[{"role":"user","content":"hi"}]}'
curl -fsS http://127.0.0.1:8080/v1/chat/completions -H 'content-type: application/json' \
  -d '{"model":"mock-llm","messages":[{"role":"user","content":"hi"}]}'
echo

step "curl -sN localhost:8080/v1/chat/completions -d '{..., \"stream\": true}'   # events arrive one by one"
curl -fsSN http://127.0.0.1:8080/v1/chat/completions -H 'content-type: application/json' \
  -d '{"model":"mock-llm","messages":[{"role":"user","content":"hi"}],"stream":true}'

step curl -s localhost:8080/v2/models/mock-llm/infer -d '{"inputs":[...]}'
curl -fsS http://127.0.0.1:8080/v2/models/mock-llm/infer -H 'content-type: application/json' \
  -d '{"inputs":[{"name":"x","shape":[3],"datatype":"FP32","data":[1,2,3]}]}'
echo

step curl -s localhost:8080/nowhere '   # the proxy answers its own errors'
curl -sS -D - http://127.0.0.1:8080/nowhere | grep -iE '^(HTTP|x-infermesh-error)|reason'

step curl -s localhost:15020/metrics '| grep infermesh_requests_total'
curl -fsS http://127.0.0.1:15020/metrics | grep '^infermesh_requests_total'

step "tail -n 4 $log   # the gateway's access log"
tail -n 4 "$log"

if $once; then exit 0; fi
printf '\nThe gateway listens on 127.0.0.1:8080 (admin 127.0.0.1:15000, metrics 127.0.0.1:15020);\nits log is in %s. Ctrl-C stops it.\n' "$log"
wait
