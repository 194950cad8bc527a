#!/usr/bin/env bash
# test/demo-fresh.sh: how long make demo takes on a fresh clone with empty Go
# module and build caches (make bench runs it). The clone is of HEAD; the
# Debian packages the demo installs are those of this machine (installed
# already, or installed by the run and counted in its time). Prints one
# line for the benchmark report:
#   demo-fresh: make demo took N s (packages installed: yes|no)
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d /tmp/vmnic-demo-fresh.XXXXXX)
cleanup() {
  # The module cache is read-only unless written with -modcacherw.
  chmod -R u+w "$tmp" 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT
git clone -q . "$tmp/src"
installed=yes
for p in qemu-system-x86 linux-image-amd64 busybox-static nftables; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || installed=no
done
start=$(date +%s)
(cd "$tmp/src" && GOMODCACHE=$tmp/mod GOCACHE=$tmp/cache GOFLAGS=-modcacherw make demo) >"$tmp/demo.log" 2>&1 || {
  tail -40 "$tmp/demo.log" >&2
  echo "demo-fresh: make demo failed" >&2
  exit 1
}
secs=$(($(date +%s) - start))
grep -E '^(deps|demo):|built and started' "$tmp/demo.log" || true
echo "demo-fresh: make demo took $secs s (packages installed: $installed)"
