#!/usr/bin/env bash
# Builds the three binaries statically linked (glibc with crt-static: no
# shared library, no NSS; names are resolved by infermesh-dns, not libc)
# and prints the directory they are in. Its own target directory, so it
# never waits on (or invalidates) a `cargo build` or `cargo test` running
# beside it.
#
#   deploy/docker/binaries.sh        # -> target/image/<triple>/release
set -euo pipefail
cd "$(dirname "$0")/../.."
triple=$(uname -m)-unknown-linux-gnu
# --target keeps the static flag off build scripts and proc macros, which
# must stay dynamic.
CARGO_TARGET_DIR=target/image RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --release --locked --quiet --target "$triple" \
  -p infermesh-proxy -p infermesh-control-plane -p infermesh-bench >&2
echo "target/image/$triple/release"
