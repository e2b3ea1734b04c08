#!/usr/bin/env bash
# The whole test suite, on a fresh machine: installs what the tests need
# that Cargo does not bring, then runs every test of the workspace.
#
#   ./test.sh                          every test
#   ./test.sh -p infermesh-proxy       arguments go on to `cargo test`
#
# Installs, when missing (Debian or Ubuntu; as root, or with sudo):
#   prometheus (promtool and   checks the /metrics page, the rules and
#   the server)                the dashboard against real scrapes
#   haproxy, nginx-light       the peers `infermesh-bench compare` measures
#   curl, iproute2, iptables,  sidecars intercepting traffic in network
#   util-linux (setpriv)       namespaces, and the demo
#   kubernetes-client          `kubectl kustomize` renders deploy/kubernetes
#   (kubectl)                  (validated offline; no cluster is used)
#   docker-compose             the Compose mesh test (when Docker is here)
# and, from PyPI, the pinned Python clients the mock model server is
# tested against (benches/tests/python/requirements.txt).
#
# Run as root, the network-namespace tests must run; as another user they
# say on stderr that they are skipped. With a Docker engine (and
# docker-compose), the image is built and the Compose mesh tested in
# containers; without one, that test says it is skipped.
set -euo pipefail
cd "$(dirname "$0")"

as_root() {
  if [ "$(id -u)" -eq 0 ]; then
    "$@"
  elif command -v sudo >/dev/null; then
    sudo "$@"
  else
    echo "test.sh: installing $* needs root (or sudo)" >&2
    return 1
  fi
}

need=()
{ command -v promtool && command -v prometheus; } >/dev/null || need+=(prometheus)
command -v haproxy >/dev/null || need+=(haproxy)
command -v nginx >/dev/null || need+=(nginx-light)
command -v curl >/dev/null || need+=(curl)
command -v ip >/dev/null || need+=(iproute2)
command -v iptables-save >/dev/null || need+=(iptables)
command -v setpriv >/dev/null || need+=(util-linux)
command -v kubectl >/dev/null || need+=(kubernetes-client)
if command -v docker >/dev/null; then
  command -v docker-compose >/dev/null || need+=(docker-compose)
fi
if [ ${#need[@]} -gt 0 ]; then
  echo "test.sh: installing ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  as_root apt-get update -qq
  as_root apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

python3 -m pip install --quiet --disable-pip-version-check -r benches/tests/python/requirements.txt

if [ "$(id -u)" -eq 0 ]; then export INFERMESH_REQUIRE_NETNS=1; fi
# With a Docker engine that answers, the Compose topology test must run
# (tests/tests/compose.rs builds the image and brings the mesh up).
if docker info >/dev/null 2>&1; then export INFERMESH_REQUIRE_DOCKER=1; fi
exec cargo test --workspace --locked "$@"
