#!/usr/bin/env bash
# Installs what vmnic's demo and test suite need on a Debian machine, as root:
# Debian packages (only those missing) and the tool binaries built from
# test/tools/go.mod into the git-ignored .tools/ folder. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

# test/deps.sh [demo]: "demo" installs only what make demo uses (the Debian
# packages of its guest and namespaces) and builds no tool binary: the demo
# builds the shim, vmnicd and two reference plugins itself.
what=${1:-all}
pkgs=(
  nftables        # nft, to read rulesets back in tests
  iproute2 iputils-ping
  qemu-system-x86 # the real guest (TCG, no KVM needed)
  linux-image-amd64 busybox-static xz-utils # guest kernel, its modules, the guest userland
  procps cpio # cpio checks the guest initramfs writer
  isc-dhcp-client # a second real DHCP client for pkg/dhcp tests
)
if [[ $what != demo ]]; then
  pkgs+=(
    openvswitch-switch # private userspace-datapath OVS instances in tests (no kernel module needed)
    passt # the passt mode's live-migration test runs KubeVirt's user-mode network back end
    runc buildah # the real node's containers (containerd runs Debian's runc) and its images (make image)
    iptables # flanneld's masquerade rules, inside the real node's namespace
    ipset # Calico's Felix lists IP sets at its start, in nftables mode too
    clang-19 # the Cilium agent compiles its BPF programs on the node
    syslinux syslinux-common mtools # the examples' containerDisk: a FAT disk that SYSLINUX boots
    mmdebstrap e2fsprogs # the node VM's root filesystem (test/nodevm/rootfs.sh)
  )
fi
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "deps: installing ${missing[*]}"
  start=$(date +%s)
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  echo "deps: installed in $(($(date +%s) - start))s"
fi

if ! command -v go >/dev/null; then
  echo "deps: Go is required (go 1.26); put it on PATH" >&2
  exit 1
fi

if [[ $what == demo ]]; then
  echo "deps: ready for the demo"
  exit 0
fi

# Tool binaries from test/tools/go.mod (kubevirt-oracle from test/kubevirt)
# into .tools/bin, rebuilt only when their module changes (kube-apiserver
# takes ~10 min cold on 2 cores, the real node's tools ~5 min more).
bash test/tools/build.sh cnitool etcd kube-apiserver helm spiderpool-agent spiderpool-controller spiderpool coordinator golangci-lint kubevirt-oracle >/dev/null
# The real node (test/node): kubelet and the controllers beside
# kube-apiserver, containerd, crictl, Flannel and the plugins it delegates to,
# Multus thick, macvlan (test/virt's passt underlay).
bash test/tools/build.sh kube-controller-manager kube-scheduler kubelet containerd containerd-shim-runc-v2 ctr crictl \
  flanneld flannel bridge host-local loopback portmap macvlan multus-daemon multus-shim >/dev/null
# Calico and Cilium as a node's primary (calico-node, cilium-agent and their
# CNI plugins) and kube-proxy beside them, each from a module of its own
# (~10 min cold).
bash test/tools/build.sh calico-node calico cilium-agent cilium-cni kube-proxy >/dev/null
# Real KubeVirt (test/virt): KubeVirt v1.8.2's components from its Go
# module (test/tools/kubevirt) and their images, the launcher's on a Debian
# trixie root filesystem (libvirt 11.3, QEMU 10.0, passt 2025), built once.
bash test/tools/kubevirt/images.sh >/dev/null
# The node VM (test/nodevm): Debian's kernel with ipvlan, openvswitch and
# 8021q, on a root filesystem from Debian's packages, built once (~70 s).
bash test/nodevm/rootfs.sh >/dev/null
echo "deps: ready"
