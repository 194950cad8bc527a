#!/usr/bin/env bash
# Builds tool binaries from this module (test/tools/go.mod) into the
# repository's git-ignored .tools/bin (or $TOOLS_BIN) and prints their paths,
# one a line, on stdout.
#
#   test/tools/build.sh kube-apiserver etcd
#
# NAME is one of the short names below or a full package path of this module.
# Spiderpool (spiderpool-agent, spiderpool-controller, the spiderpool,
# coordinator and ifacer plugins) builds from its own module,
# test/tools/spiderpool: its Kubernetes 0.29 libraries cannot share this
# module's 1.36 ones. The CNI reference plugins and cnitool build from
# test/tools/cni, small enough for make demo on a fresh machine.
# kubevirt-oracle (KubeVirt's own code answering vmnic's tests) builds from
# test/kubevirt, pinned to KubeVirt's 0.34. ovs-cni (the bridge-mode peer
# in the benchmarks) builds from test/tools/ovscni as .tools/bin/ovs-cni.
# The real node (test/node) adds containerd, its runc shim, ctr and crictl
# (test/tools/containerd), kubelet, kube-controller-manager and
# kube-scheduler (this module, beside kube-apiserver), flanneld
# (test/tools/flannel), the flannel CNI plugin (test/tools/flannelcni) and
# Multus thick (test/tools/multus); with Calico as the primary, calico-node
# and the calico CNI plugin (test/tools/calico: Calico pins Kubernetes
# 1.33's libraries), with Cilium cilium-agent and cilium-cni
# (test/tools/cilium), and kube-proxy for both (test/tools/kubeproxy, at
# kubelet's release).
# KubeVirt v1.8.2's components (virt-operator, virt-api, virt-controller,
# virt-handler, virt-launcher, virt-launcher-monitor, virt-chroot,
# virt-exportproxy, synchronization-controller, virtctl and the helpers of
# the launcher image) build from test/tools/kubevirt, with the version
# KubeVirt's own build stamps into them; test/tools/kubevirt/images.sh packs
# them into images.
# A binary is rebuilt only when it is missing or its stamp file
# (.tools/bin/.stamp/NAME) records another hash of its module's go.mod, go.sum
# (and for test/kubevirt its sources), the Go version and the build flags, so
# a warm machine takes well under a second. Builds run one at a time (flock), also across concurrent callers:
# kube-apiserver alone takes ~8-10 min cold on 2 cores.
set -euo pipefail

tools_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$tools_dir/../.." && pwd)
out=${TOOLS_BIN:-$root/.tools/bin}

if (($# == 0)); then
  echo "usage: $0 NAME..." >&2
  echo "  names: kube-apiserver etcd helm cnitool golangci-lint ptp bridge loopback macvlan host-local portmap spiderpool-agent spiderpool-controller spiderpool coordinator ifacer kubevirt-oracle ovs-cni" >&2
  echo "         kubelet kube-controller-manager kube-scheduler kube-proxy calico-node calico cilium-agent cilium-cni containerd containerd-shim-runc-v2 ctr crictl flanneld flannel multus-daemon multus-shim," >&2
  echo "         virt-operator virt-api virt-controller virt-handler virt-launcher virt-launcher-monitor virt-chroot virt-exportproxy" >&2
  echo "         synchronization-controller virtctl virt-tail virt-probe virt-freezer libvirt-hook-client, or a package path" >&2
  exit 2
fi

# pkg_of NAME prints the package path for a short name.
pkg_of() {
  case $1 in
    kube-apiserver | kubelet | kube-controller-manager | kube-scheduler | kube-proxy) echo "k8s.io/kubernetes/cmd/$1" ;;
    calico-node) echo github.com/projectcalico/calico/node/cmd/calico-node ;;
    calico) echo github.com/projectcalico/calico/cni-plugin/cmd/calico ;;
    cilium-agent) echo github.com/cilium/cilium/daemon ;;
    cilium-cni) echo github.com/cilium/cilium/plugins/cilium-cni ;;
    etcd) echo go.etcd.io/etcd/server/v3 ;;
    helm) echo helm.sh/helm/v3/cmd/helm ;;
    cnitool) echo github.com/containernetworking/cni/cnitool ;;
    golangci-lint) echo github.com/golangci/golangci-lint/v2/cmd/golangci-lint ;;
    ptp | bridge | loopback | macvlan) echo "github.com/containernetworking/plugins/plugins/main/$1" ;;
    host-local) echo "github.com/containernetworking/plugins/plugins/ipam/$1" ;;
    portmap | flannel) echo "github.com/containernetworking/plugins/plugins/meta/$1" ;;
    containerd | containerd-shim-runc-v2 | ctr) echo "github.com/containerd/containerd/v2/cmd/$1" ;;
    crictl) echo sigs.k8s.io/cri-tools/cmd/crictl ;;
    flanneld) echo github.com/flannel-io/flannel ;;
    multus-daemon | multus-shim) echo "gopkg.in/k8snetworkplumbingwg/multus-cni.v4/cmd/$1" ;;
    spiderpool-agent | spiderpool-controller | spiderpool | coordinator | ifacer) echo "github.com/spidernet-io/spiderpool/cmd/$1" ;;
    kubevirt-oracle) echo github.com/vmnic/vmnic/test/kubevirt/cmd/kubevirt-oracle ;;
    ovs-cni) echo github.com/k8snetworkplumbingwg/ovs-cni/cmd/plugin ;;
    virt-operator | virt-api | virt-controller | virt-handler | virt-launcher | virt-launcher-monitor | virt-chroot | \
      virt-exportproxy | synchronization-controller | virtctl | virt-tail | virt-probe | virt-freezer)
      echo "kubevirt.io/kubevirt/cmd/$1"
      ;;
    libvirt-hook-client) echo kubevirt.io/kubevirt/cmd/virt-launcher/libvirt-hook-client ;;
    */*) echo "$1" ;;
    *)
      echo "build.sh: unknown tool $1" >&2
      return 1
      ;;
  esac
}

# moddir_of PKG prints the directory of the module that builds PKG.
moddir_of() {
  case $1 in
    github.com/spidernet-io/spiderpool/*) echo "$tools_dir/spiderpool" ;;
    github.com/projectcalico/calico/*) echo "$tools_dir/calico" ;;
    github.com/cilium/cilium/*) echo "$tools_dir/cilium" ;;
    k8s.io/kubernetes/cmd/kube-proxy) echo "$tools_dir/kubeproxy" ;;
    github.com/vmnic/vmnic/test/kubevirt/*) echo "$root/test/kubevirt" ;;
    github.com/containernetworking/plugins/plugins/meta/flannel) echo "$tools_dir/flannelcni" ;;
    github.com/containernetworking/*) echo "$tools_dir/cni" ;;
    github.com/containerd/* | sigs.k8s.io/cri-tools/*) echo "$tools_dir/containerd" ;;
    github.com/flannel-io/flannel*) echo "$tools_dir/flannel" ;;
    gopkg.in/k8snetworkplumbingwg/multus-cni.v4/*) echo "$tools_dir/multus" ;;
    github.com/k8snetworkplumbingwg/ovs-cni/*) echo "$tools_dir/ovscni" ;;
    kubevirt.io/kubevirt/*) echo "$tools_dir/kubevirt" ;;
    *) echo "$tools_dir" ;;
  esac
}

# bin_of PKG prints the binary name go build would give PKG (etcd for the
# etcd server module, not "v3").
bin_of() {
  case $1 in
    go.etcd.io/etcd/server/v3) echo etcd ;;
    github.com/k8snetworkplumbingwg/ovs-cni/cmd/plugin) echo ovs-cni ;;
    github.com/flannel-io/flannel) echo flanneld ;;
    github.com/cilium/cilium/daemon) echo cilium-agent ;;
    *)
      local b=${1##*/}
      if [[ $b =~ ^v[0-9]+$ ]]; then
        b=${1%/*}
        b=${b##*/}
      fi
      echo "$b"
      ;;
  esac
}

# ldflags_of PKG prints extra -ldflags for PKG. kube-apiserver gets its
# release version (as the upstream build sets it), so /version reports it.
# helm gets its version and, as its Makefile does, the Kubernetes version
# of its client-go as the default .Capabilities.KubeVersion of
# "helm template" (1.20 otherwise).
ldflags_of() {
  case $1 in
    helm.sh/helm/v3/cmd/helm)
      local hv kv
      hv=$(cd "$tools_dir" && go list -m -f '{{.Version}}' helm.sh/helm/v3)
      kv=$(cd "$tools_dir" && go list -m -f '{{if .Replace}}{{.Replace.Version}}{{else}}{{.Version}}{{end}}' k8s.io/client-go)
      kv=${kv#v0.}
      local p=helm.sh/helm/v3
      echo "-X $p/internal/version.version=$hv -X $p/internal/version.gitTreeState=clean -X $p/pkg/chartutil.k8sVersionMajor=1 -X $p/pkg/chartutil.k8sVersionMinor=${kv%%.*} -X $p/pkg/lint/rules.k8sVersionMajor=1 -X $p/pkg/lint/rules.k8sVersionMinor=${kv%%.*}"
      ;;
    github.com/k8snetworkplumbingwg/ovs-cni/cmd/plugin)
      # ovs-cni keeps its netconf cache in /var/lib/cni/ovs-cni/cache (and
      # reads the older /tmp/ovscache): a test must not touch the host's, so
      # both point into this checkout's .tools/ovs-cni (the benchmarks
      # clear it).
      local u=github.com/k8snetworkplumbingwg/ovs-cni/pkg/utils
      echo "-X $u.DefaultCacheDir=$root/.tools/ovs-cni/cache -X $u.OldDefaultCacheDir=$root/.tools/ovs-cni/oldcache"
      ;;
    github.com/containerd/containerd/v2/cmd/*)
      echo "-X github.com/containerd/containerd/v2/version.Version=$(cd "$tools_dir/containerd" && go list -m -f '{{.Version}}' github.com/containerd/containerd/v2)"
      ;;
    sigs.k8s.io/cri-tools/cmd/crictl)
      echo "-X sigs.k8s.io/cri-tools/pkg/version.Version=$(cd "$tools_dir/containerd" && go list -m -f '{{.Version}}' sigs.k8s.io/cri-tools)"
      ;;
    github.com/flannel-io/flannel)
      echo "-X github.com/flannel-io/flannel/pkg/version.Version=$(cd "$tools_dir/flannel" && go list -m -f '{{.Version}}' github.com/flannel-io/flannel)"
      ;;
    github.com/cilium/cilium/*)
      # What Cilium's Makefile.defs stamps (the agent logs it, cilium-cni
      # reports it).
      echo "-X github.com/cilium/cilium/pkg/version.ciliumVersion=$(cd "$tools_dir/cilium" && go list -m -f '{{.Version}}' github.com/cilium/cilium | sed 's/^v//')"
      ;;
    github.com/projectcalico/calico/*)
      # What Calico's build stamps (felix and calico-node -v report it).
      local p=github.com/projectcalico/calico/pkg/buildinfo
      echo "-X $p.Version=v3.31.0 -X $p.GitRevision=$(cd "$tools_dir/calico" && go list -m -f '{{.Version}}' github.com/projectcalico/calico)"
      ;;
    kubevirt.io/kubevirt/cmd/*)
      # What KubeVirt's build stamps (version_x_defs): virt-operator
      # compares its own version with the install strategy's.
      local v p=kubevirt.io/client-go/version
      v=$(cd "$tools_dir/kubevirt" && go list -m -f '{{.Version}}' kubevirt.io/kubevirt)
      echo "-X $p.gitVersion=$v -X $p.gitTreeState=clean -X $p.gitCommit=$v -X $p.buildDate=2026-01-01T00:00:00Z"
      ;;
    k8s.io/kubernetes/cmd/*)
      local v
      v=$(cd "$tools_dir" && go list -m -f '{{.Version}}' k8s.io/kubernetes)
      local mm=${v#v}
      local major=${mm%%.*} rest=${mm#*.}
      local minor=${rest%%.*}
      local p=k8s.io/component-base/version
      echo "-X $p.gitVersion=$v -X $p.gitMajor=$major -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
      ;;
  esac
}

# Terminated (a test timing out, ^C): stop go build, which stops the
# compilers it runs on SIGINT, and leave no half-written binary behind.
gopid= tmp=
on_signal() {
  if [[ -n $gopid ]]; then
    kill -INT "$gopid" 2>/dev/null || true
    wait "$gopid" 2>/dev/null || true
  fi
  [[ -z $tmp ]] || rm -f "$tmp"
  exit 143
}
trap on_signal TERM INT

mkdir -p "$out/.stamp"
exec 9>"$out/.build.lock"
if command -v flock >/dev/null; then
  flock 9
fi

# mod_hash_of DIR prints the hash of the module's go.mod and go.sum and, for
# test/kubevirt, test/tools/flannel (its tencentvpc stand-in) and
# test/tools/kubevirt (its libnbd stand-in), whose code
# is this repository's own, of its Go sources and nested go.mod files too:
# editing them rebuilds the binary.
mod_hash_of() {
  {
    cat "$1/go.mod" "$1/go.sum"
    if [[ $1 == "$root/test/kubevirt" || $1 == "$tools_dir/flannel" || $1 == "$tools_dir/kubevirt" ]]; then
      (cd "$1" && find . -type f \( -name '*.go' -o -name go.mod \) -print0 | LC_ALL=C sort -z | xargs -0 sha256sum)
    fi
  } | sha256sum | cut -d' ' -f1
}
go_version=$(go env GOVERSION)

# cgo_of PKG prints 1 for the tools that need cgo: flanneld, whose udp
# backend is C (it links it whatever the backend); virt-handler, whose node
# labeller reads constants from linux/kvm.h (linked static, as it runs in an
# image of its own); virt-launcher, which drives libvirt through its C
# library. Everything else is static.
cgo_of() {
  case $1 in
    github.com/flannel-io/flannel | kubevirt.io/kubevirt/cmd/virt-handler | kubevirt.io/kubevirt/cmd/virt-launcher) echo 1 ;;
    *) echo 0 ;;
  esac
}

# tags_of PKG prints its build tags. virt-launcher loads libvirt with
# dlopen (libvirt.org/go/libvirt's libvirt_dlopen), so it needs no
# libvirt-dev here and uses every call of the launcher image's libvirt
# (Debian trixie's 11.3). virt-handler is linked static: pure-Go name and
# user lookups.
tags_of() {
  case $1 in
    kubevirt.io/kubevirt/cmd/virt-launcher) echo libvirt_dlopen ;;
    kubevirt.io/kubevirt/cmd/virt-handler) echo netgo,osusergo ;;
    github.com/cilium/cilium/*) echo osusergo ;;
  esac
}

# extld_of PKG prints the external linker's flags, for the cgo tools that
# are linked static.
extld_of() {
  case $1 in
    kubevirt.io/kubevirt/cmd/virt-handler) echo "-linkmode external -extldflags -static" ;;
  esac
}

for name in "$@"; do
  pkg=$(pkg_of "$name")
  bin=$(bin_of "$pkg")
  mod_dir=$(moddir_of "$pkg")
  mod_hash=$(mod_hash_of "$mod_dir")
  target=$out/$bin
  stamp_file=$out/.stamp/$bin
  # Cheap part first: a warm check runs no go command besides "go env".
  cgo=$(cgo_of "$pkg")
  tags=$(tags_of "$pkg")
  base_stamp="pkg=$pkg mod=$mod_hash go=$go_version cgo=$cgo"
  [[ -z $tags ]] || base_stamp+=" tags=$tags"
  # ovs-cni's cache directory is baked in below: a checkout elsewhere rebuilds.
  [[ $pkg != github.com/k8snetworkplumbingwg/ovs-cni/* ]] || base_stamp+=" cache=$root/.tools/ovs-cni"
  if [[ -x $target && -f $stamp_file ]] && [[ $(head -n1 "$stamp_file") == "$base_stamp" ]]; then
    echo "$target"
    continue
  fi
  flags=$(ldflags_of "$pkg")
  extld=$(extld_of "$pkg")
  [[ -z $extld ]] || flags+="${flags:+ }$extld"
  echo "build.sh: building $bin ($pkg) ..." >&2
  start=$(date +%s)
  tmp=$(mktemp "$out/.$bin.XXXXXX")
  # One spiderpool dependency (github.com/tigera) is missing from the
  # checksum database; go.sum pins it.
  (cd "$mod_dir" && CGO_ENABLED=$cgo GONOSUMDB=${GONOSUMDB:+$GONOSUMDB,}github.com/tigera exec go build -tags "$tags" -ldflags "$flags" -o "$tmp" "$pkg") &
  gopid=$!
  if ! wait "$gopid"; then
    rm -f "$tmp"
    echo "build.sh: go build $pkg failed" >&2
    exit 1
  fi
  gopid=
  chmod 0755 "$tmp"
  # rename: a running copy of the old binary keeps working.
  mv -f "$tmp" "$target"
  printf '%s\nldflags=%s\nbuilt=%s seconds=%s\n' "$base_stamp" "$flags" "$(date -u +%FT%TZ)" "$(($(date +%s) - start))" >"$stamp_file"
  echo "build.sh: built $target in $(($(date +%s) - start))s" >&2
  echo "$target"
done
