#!/usr/bin/env bash
# Checks that test/ starts vmnicd only the ways users do: the vmnicd binary,
# or daemon.Run with a daemon.Config (what the binary's main runs). A test
# that builds the daemon's Options, calls daemon.New, or makes its own
# KubeVirt facts source (kubevirt.NewCluster and the informers behind it)
# tests a daemon nobody runs: the informers of the shipped vmnicd once
# stopped at Ready while every test passed, because each test built its own.
# Prints each offending line and fails if there is one.
set -euo pipefail
cd "$(dirname "$0")/.."
bad=0
files=$(git ls-files 'test/*.go')
# The daemon and kubevirt packages only under their own names, so the
# patterns below see every use.
if grep -nE '^\s*[A-Za-z_][A-Za-z0-9_]*\s+"github.com/vmnic/vmnic/(daemon|pkg/kubevirt)"' $files; then
  echo "entrypoint.sh: import vmnic's daemon and kubevirt packages under their own names" >&2
  bad=1
fi
if grep -nE '\bdaemon\.(Options|New)\b|\bkubevirt\.(NewCluster|ClusterOptions|Cluster)\b' $files; then
  echo "entrypoint.sh: test/ builds a daemon or a facts source itself; start vmnicd with harness (daemon.Run) or its binary" >&2
  bad=1
fi
((bad == 0)) || exit 1
echo "entrypoint.sh: test/ starts vmnicd through its binary or daemon.Run only"
