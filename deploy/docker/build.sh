#!/usr/bin/env bash
# Builds infermesh's three images with the local Docker engine and no
# registry: the binaries are built here (statically linked), their files
# assembled (rootfs.sh, with this machine's iptables), and each image made
# `FROM scratch`. Prints the images' names.
#
#   deploy/docker/build.sh [TAG]     # default: the workspace version
#
# makes infermesh-proxy:TAG, infermesh-control-plane:TAG and
# infermesh-bench:TAG. Needs cargo, docker, objcopy and iptables (its
# binaries are copied into the proxy's image).
set -euo pipefail
cd "$(dirname "$0")/../.."
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
tag=${1:-$version}
context=$(mktemp -d "${TMPDIR:-/tmp}/infermesh-image.XXXXXX")
trap 'rm -rf "$context"' EXIT
deploy/docker/rootfs.sh "$context" "$(deploy/docker/binaries.sh)"
cp deploy/docker/Dockerfile.scratch "$context/Dockerfile"
for image in proxy control-plane bench; do
  docker build --quiet --target "$image" \
    --label "org.opencontainers.image.version=$version" \
    -t "infermesh-$image:$tag" "$context" >&2
  echo "infermesh-$image:$tag"
done
