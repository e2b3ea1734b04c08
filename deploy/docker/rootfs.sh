#!/usr/bin/env bash
# Assembles the files of infermesh's three images in DIR from the
# statically linked binaries in BIN (built with `-C target-feature=+crt-static`):
#
#   DIR/base            /etc/passwd and /etc/group naming uid 1337, /tmp
#   DIR/proxy           infermesh-proxy, and what `infermesh-proxy init`
#                       runs: iptables (nft and legacy backends), its
#                       extension modules and the shared libraries they
#                       load, from this machine's Debian packages
#   DIR/control-plane   infermesh-control-plane
#   DIR/bench           infermesh-bench (the mock model server, the load
#                       generator)
#   DIR/state           /var/lib/infermesh/{ca,workload}, which the
#                       Dockerfiles copy owned by uid 1337: Docker gives a
#                       new named volume the ownership of the image's
#                       directory, so the CA and credentials can be written
#                       there as 1337
#
# Both Dockerfiles copy these into empty images.
#
#   deploy/docker/rootfs.sh DIR BIN
set -euo pipefail
dir=${1:?usage: rootfs.sh DIR BIN}
bin=${2:?usage: rootfs.sh DIR BIN}
binaries=(infermesh-proxy infermesh-control-plane infermesh-bench)

for b in "${binaries[@]}"; do
  # ldd says "not a dynamic executable" of a static binary, and
  # "statically linked" of a static PIE.
  if ! ldd "$bin/$b" 2>&1 | grep -q -e 'not a dynamic executable' -e 'statically linked'; then
    echo "rootfs.sh: $bin/$b is not statically linked (build it with RUSTFLAGS='-C target-feature=+crt-static' and --target)" >&2
    exit 1
  fi
done

rm -rf "$dir/base" "$dir/state" "$dir/proxy" "$dir/control-plane" "$dir/bench"
mkdir -p "$dir/base/etc" "$dir/base/tmp" "$dir/state/ca" "$dir/state/workload"
chmod 1777 "$dir/base/tmp"
# The proxy's fixed user (init's --proxy-uid exempts it from interception).
cat >"$dir/base/etc/passwd" <<'PASSWD'
root:x:0:0:root:/:/sbin/nologin
infermesh:x:1337:1337:infermesh:/:/sbin/nologin
PASSWD
cat >"$dir/base/etc/group" <<'GROUP'
root:x:0:
infermesh:x:1337:
GROUP

for b in "${binaries[@]}"; do
  image=$dir/${b#infermesh-}
  mkdir -p "$image/usr/local/bin"
  # Line tables stay in the build for backtraces; images ship symbols only.
  objcopy --strip-debug "$bin/$b" "$image/usr/local/bin/$b"
done

# iptables in the proxy's image: the multi-call binaries under their usual
# names; `iptables` (what init calls) is nft, Debian's default, and init's
# `--iptables iptables-legacy` picks the other.
proxy=$dir/proxy
mkdir -p "$proxy/usr/sbin"
iptables_files=()
for multi in xtables-nft-multi xtables-legacy-multi; do
  src=$(command -v "$multi" || true)
  [[ -n $src ]] || { echo "rootfs.sh: $multi not found (apt-get install iptables)" >&2; exit 1; }
  cp "$src" "$proxy/usr/sbin/$multi"
  iptables_files+=("$src")
done
for name in iptables iptables-save iptables-restore; do
  ln -s xtables-nft-multi "$proxy/usr/sbin/$name"
done
for name in iptables-legacy iptables-legacy-save iptables-legacy-restore; do
  ln -s xtables-legacy-multi "$proxy/usr/sbin/$name"
done
# The extension modules (tcp, owner, REDIRECT, ...) are looked for where
# iptables was built to (XTABLES_LIBDIR, /usr/lib/<triple>/xtables on
# Debian): the real path, not one through the host's /lib -> usr/lib link,
# which the image does not have.
xtables=$(readlink -f "$(dirname "$(ldd "$(command -v xtables-nft-multi)" | awk '/libxtables/ {print $3}')")/xtables")
mkdir -p "$proxy$xtables"
cp "$xtables"/*.so "$proxy$xtables/"
iptables_files+=("$xtables"/*.so)
# The shared libraries (and the dynamic loader) all of them load.
# (ldd prints "name => /path (address)" per library, "/path (address)"
# for the loader, and "file:" above each file's list.)
ldd "${iptables_files[@]}" 2>/dev/null |
  awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// && $2 ~ /^\(0x/ {print $1}' |
  sort -u | while read -r lib; do
  mkdir -p "$proxy$(dirname "$lib")"
  cp -L "$lib" "$proxy$lib"
done

for part in base proxy control-plane bench; do
  echo "rootfs.sh: $part $(du -sh "$dir/$part" | cut -f1)" >&2
done
