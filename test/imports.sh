#!/usr/bin/env bash
# Checks that vmnic's packages import one way: cmd -> daemon -> plugins ->
# pkg, and that no mode's package imports another's (the registry, package
# plugins, imports them all). Prints each import
# that goes the wrong way and fails if there is one.
set -euo pipefail
cd "$(dirname "$0")/.."
go list -f '{{.ImportPath}} {{join .Imports " "}}' ./cmd/... ./daemon/... ./plugins/... ./pkg/... | awk '
BEGIN { rank["pkg"] = 0; rank["plugins"] = 1; rank["daemon"] = 2; rank["cmd"] = 3; bad = 0 }
{
  src = $1; sub("^github.com/vmnic/vmnic/", "", src); split(src, s, "/")
  for (i = 2; i <= NF; i++) {
    if ($i !~ /^github.com\/vmnic\/vmnic\//) continue
    dst = $i; sub("^github.com/vmnic/vmnic/", "", dst); split(dst, d, "/")
    # plugins (the registry, s[2] empty) may import every mode; a mode no other.
    if (rank[d[1]] > rank[s[1]] || (s[1] == "plugins" && d[1] == "plugins" && s[2] != "" && s[2] != d[2])) {
      print "imports.sh: " src " imports " dst " (cmd -> daemon -> plugins -> pkg)"; bad = 1
    }
  }
}
END { exit bad }'
echo "imports.sh: cmd -> daemon -> plugins -> pkg holds"
