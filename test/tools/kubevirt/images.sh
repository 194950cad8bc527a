#!/usr/bin/env bash
# Builds the images of KubeVirt v1.8.2 for the tests that run the real
# KubeVirt, once per machine, into .tools/kubevirt/images/<hash>/ (a newer
# hash removes the older directories) and prints that directory. It holds one
# OCI archive per image and images.txt, one "REFERENCE ARCHIVE" a line.
#
#   test/tools/kubevirt/images.sh
#
# No registry is reachable, so every image is built here with buildah and
# tagged with the reference virt-operator computes from VIRT_OPERATOR_IMAGE
# and KUBEVIRT_VERSION: KubeVirt's own install strategy is asked for it
# (kubevirt-oracle images), so a tag that virt-operator would not pull
# cannot be built.
#
#   - virt-operator, virt-api, virt-controller, virt-exportproxy and
#     virt-synchronization-controller: their static binary in /usr/bin, an
#     /etc/passwd, user 1001, as KubeVirt's own images;
#   - virt-launcher: a Debian trixie root filesystem (mmdebstrap, the mirror
#     taken from this machine's apt sources at run time) with libvirt 11.3,
#     QEMU 10.0 and passt 2025 (with passt-repair), xorriso (the cloud-init
#     NoCloud ISO of a VM), KubeVirt's launcher binaries, its libvirt and
#     QEMU configuration, the qemu user and group 107, /var/run -> ../run and
#     the capability on virt-launcher-monitor, as KubeVirt's image has them. Debian ships libvirt's monolithic libvirtd
#     and no virtqemud: /usr/sbin/virtqemud is a wrapper that starts libvirtd
#     and links libvirtd's socket under virtqemud's name (see below);
#   - virt-handler: the same root filesystem (nft, iptables, ip, passt-repair,
#     qemu-img, which virt-handler runs) with virt-handler and virt-chroot.
#
# sidecar-shim is named by the install strategy but pulled only for VMIs
# with hook sidecars, which no test uses: it is not built.
#
# Needs root, buildah, mmdebstrap, gcc (the static container-disk binary)
# and setcap; test/deps.sh installs them.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
cd "$root"
here=test/tools/kubevirt

# The registry part of every reference; VIRT_OPERATOR_IMAGE is
# $registry/virt-operator:$version.
registry=vmnic.test/kubevirt
version=$(cd "$here" && go list -m -f '{{.Version}}' kubevirt.io/kubevirt)
src=$(cd "$here" && go list -m -f '{{.Dir}}' kubevirt.io/kubevirt)

# Debian trixie packages of the launcher and handler root filesystem.
pkgs=(
  libvirt-daemon libvirt-daemon-driver-qemu libvirt-daemon-log libvirt-clients
  qemu-system-x86 qemu-utils passt
  xorriso # xorrisofs: virt-launcher writes a VM's cloud-init NoCloud ISO with it
  nftables iptables iproute2 procps util-linux findutils tar
)

bins=(virt-operator virt-api virt-controller virt-handler virt-launcher virt-launcher-monitor virt-chroot
  virt-exportproxy synchronization-controller virtctl virt-tail virt-probe virt-freezer libvirt-hook-client kubevirt-oracle)
mapfile -t paths < <(bash test/tools/build.sh "${bins[@]}")
declare -A bin
for i in "${!bins[@]}"; do bin[${bins[$i]}]=${paths[$i]}; done

# The contents only: the script may be called by any path.
hash=$({
  cat "$0" "$src/cmd/container-disk-v2alpha/main.c"
  for b in "${bins[@]}"; do head -n1 ".tools/bin/.stamp/$(basename "${bin[$b]}")"; done
} | sha256sum | cut -c1-12)
base=.tools/kubevirt/images
out=$base/$hash
if [[ -s $out/images.txt ]]; then
  echo "$out"
  exit 0
fi
for tool in buildah mmdebstrap gcc setcap; do
  command -v $tool >/dev/null || { echo "kubevirt images: $tool is missing (make deps)" >&2; exit 1; }
done
start=$(date +%s)
mkdir -p "$base"
find "$base" -mindepth 1 -maxdepth 1 ! -name "$hash" -exec rm -rf {} +
tmp=$(mktemp -d "$base/build.XXXXXX")
store=$root/.tools/buildah
mkdir -p "$store"
printf '{"default":[{"type":"insecureAcceptAnything"}]}\n' >"$store/policy.json"
b=(buildah --root "$store/root" --runroot "$store/run" --storage-driver overlay)
ctrs=()
cleanup() {
  for c in "${ctrs[@]}"; do "${b[@]}" rm "$c" >/dev/null 2>&1 || true; done
  rm -rf "$tmp"
}
trap cleanup EXIT

# The references, as virt-operator's install strategy names them.
"${bin[kubevirt-oracle]}" images -operator-image "$registry/virt-operator:$version" -version "$version" >"$tmp/refs.json" 2>"$tmp/oracle.log" ||
  { cat "$tmp/oracle.log" >&2; exit 1; }
mapfile -t refs < <(python3 -c 'import json,sys; print("\n".join(json.load(open(sys.argv[1]))["references"]))' "$tmp/refs.json")

# container-disk: KubeVirt's C program that keeps a container-disk (here:
# the kernelBoot image) container alive; static, as it runs in the user's
# image.
gcc -static -O2 -o "$tmp/container-disk" "$src/cmd/container-disk-v2alpha/main.c"

# The mirror of this machine's own Debian suite, from its apt sources
# (deb822 or one-line), used for trixie.
host_suite=$(. /etc/os-release && echo "$VERSION_CODENAME")
mirror=$(
  cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk -v s="$host_suite" '
    /^URIs:/ {u=$2} /^Suites:/ {for (i = 2; i <= NF; i++) if ($i == s) {print u; exit}}'
)
if [[ -z $mirror ]]; then
  mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
    awk -v s="$host_suite" '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i == s) { print ($2 ~ /^\[/ ? $3 : $2); exit } }')
fi
[[ -n $mirror ]] || { echo "kubevirt images: no Debian mirror for $host_suite in the apt sources" >&2; exit 1; }

rootfs=$tmp/rootfs
# qemu (107) exists before any package is installed, so no package takes
# its ids.
mmdebstrap --quiet --variant=essential --include="$(IFS=,; echo "${pkgs[*]}")" \
  --aptopt='APT::Install-Recommends "false"' \
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' \
  --essential-hook='echo "qemu:x:107:107:qemu user:/home/qemu:/bin/bash" >>"$1/etc/passwd"; echo "qemu:x:107:" >>"$1/etc/group"; mkdir -p "$1/home/qemu"; chown 107:107 "$1/home/qemu"' \
  trixie "$rootfs" "deb $mirror trixie main" >&2
chroot "$rootfs" sh -c 'test -x /usr/sbin/libvirtd && test -x /usr/bin/qemu-system-x86_64 && test -x /usr/bin/passt && test -x /usr/bin/passt-repair && test -x /usr/bin/xorrisofs' ||
  { echo "kubevirt images: the trixie root filesystem lacks libvirtd, QEMU, passt or xorrisofs" >&2; exit 1; }
rm -rf "$rootfs"/var/cache/apt/* "$rootfs"/var/lib/apt/lists/*

# commit NAME DIR [buildah config flags...]: DIR as the image's one layer
# (ownership, modes and file capabilities kept), tagged NAME, written to
# $out/<short name>.tar.
commit() {
  local ref=$1 dir=$2 c mnt
  shift 2
  c=$("${b[@]}" from --signature-policy "$store/policy.json" scratch)
  ctrs+=("$c")
  mnt=$("${b[@]}" mount "$c")
  tar -C "$dir" --xattrs --xattrs-include='*' --numeric-owner -cf - . | tar -C "$mnt" --xattrs --xattrs-include='*' --numeric-owner -xpf -
  "${b[@]}" umount "$c" >/dev/null
  "${b[@]}" config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$@" "$c"
  "${b[@]}" commit --quiet --signature-policy "$store/policy.json" "$c" "$ref" >/dev/null
  local name=${ref##*/}
  name=${name%%:*}
  mkdir -p "$tmp/out"
  "${b[@]}" push --quiet --signature-policy "$store/policy.json" "$ref" "oci-archive:$tmp/out/$name.tar:$ref"
  "${b[@]}" rmi "$ref" >/dev/null
  echo "$ref $name.tar" >>"$tmp/out/images.txt"
}

# passwd KUBEVIRT_DIR: /etc/passwd and /etc/group as KubeVirt's images have
# them (root, qemu 107, nonroot-user 1001) and its nsswitch.conf.
passwd() {
  mkdir -p "$1/etc"
  printf 'root:x:0:0:root:/root:/bin/bash\nqemu:x:107:107:qemu user:/home/qemu:/bin/bash\nnonroot-user:x:1001:1001:nonroot-user:/home/nonroot-user:/bin/bash\n' >"$1/etc/passwd"
  printf 'root:x:0:\nqemu:x:107:\nnonroot-user:x:1001:\n' >"$1/etc/group"
  install -m 0644 "$src/cmd/virt-launcher/nsswitch.conf" "$1/etc/nsswitch.conf"
}

for ref in "${refs[@]}"; do
  name=${ref##*/}
  name=${name%%:*}
  d=$tmp/ctx-$name
  case $name in
    virt-operator | virt-api | virt-controller | virt-exportproxy | virt-synchronization-controller)
      exe=$name
      [[ $name != virt-synchronization-controller ]] || exe=synchronization-controller
      mkdir -p "$d/usr/bin" "$d/tmp" "$d/home/nonroot-user"
      chmod 1777 "$d/tmp"
      chown 1001:1001 "$d/home/nonroot-user"
      passwd "$d"
      install -m 0755 "${bin[$exe]}" "$d/usr/bin/$exe"
      commit "$ref" "$d" --entrypoint "[\"/usr/bin/$exe\"]" --user 1001
      ;;
    virt-launcher)
      cp -a "$rootfs" "$d"
      for x in virt-launcher virt-launcher-monitor virt-tail virt-probe virt-freezer libvirt-hook-client; do
        install -m 0755 "${bin[$x]}" "$d/usr/bin/$x"
      done
      install -m 0755 "$tmp/container-disk" "$d/usr/bin/container-disk"
      install -m 0755 "$src/cmd/virt-launcher/node-labeller/node-labeller.sh" "$d/usr/bin/node-labeller.sh"
      # KubeVirt's image sets this capability, so that the non-root launcher
      # can hand CAP_NET_BIND_SERVICE to virtqemud as an ambient one.
      setcap cap_net_bind_service=+ep "$d/usr/bin/virt-launcher-monitor"
      install -m 0644 "$src/cmd/virt-launcher/qemu.conf" "$src/cmd/virt-launcher/virtqemud.conf" "$d/etc/libvirt/"
      install -d -m 0755 "$d/etc/libvirt/hooks"
      install -m 0755 -o 107 -g 107 "$src/cmd/virt-launcher/qemu" "$d/etc/libvirt/hooks/qemu"
      install -m 0644 "$src/cmd/virt-launcher/nsswitch.conf" "$d/etc/nsswitch.conf"
      # virt-handler reaches the launcher's sockets through
      # /proc/<pid>/root/var/run: a relative link, as KubeVirt's image has.
      rm -rf "$d/var/run"
      ln -s ../run "$d/var/run"
      # The virtqemud stand-in. virt-launcher starts
      # "/usr/sbin/virtqemud -f /var/run/libvirt/virtqemud.conf" and connects
      # to <runtime dir>/libvirt/virtqemud-sock (as root qemu:///system,
      # whose client falls back to libvirt-sock; as qemu 107
      # qemu+unix:///session?socket=/var/run/libvirt/virtqemud-sock with
      # XDG_RUNTIME_DIR=/var/run). libvirtd serves the same QEMU driver and
      # reads the same keys; only its socket has another name, so the
      # wrapper links virtqemud's names to libvirtd's before it starts it.
      cat >"$d/usr/sbin/virtqemud" <<'EOF'
#!/bin/sh
# virtqemud stand-in (vmnic test bed): Debian ships libvirt's monolithic
# libvirtd, which serves the same QEMU driver, but no virtqemud. Link
# virtqemud's socket names to libvirtd's, then run libvirtd with the given
# arguments.
if [ "$(id -u)" = 0 ]; then
  dir=/run/libvirt
else
  dir=${XDG_RUNTIME_DIR:-/run/user/$(id -u)}/libvirt
fi
mkdir -p "$dir"
ln -sfn libvirt-sock "$dir/virtqemud-sock"
ln -sfn libvirt-sock-ro "$dir/virtqemud-sock-ro"
ln -sfn libvirt-admin-sock "$dir/virtqemud-admin-sock"
exec /usr/sbin/libvirtd "$@"
EOF
      chmod 0755 "$d/usr/sbin/virtqemud"
      commit "$ref" "$d" --entrypoint '["/usr/bin/virt-launcher"]' --user 0
      ;;
    virt-handler)
      cp -a "$rootfs" "$d"
      install -m 0755 "${bin[virt-handler]}" "$d/usr/bin/virt-handler"
      install -m 0755 "${bin[virt-chroot]}" "$d/usr/bin/virt-chroot"
      commit "$ref" "$d" --entrypoint '["/usr/bin/virt-handler"]' --user 0
      ;;
    sidecar-shim)
      echo "kubevirt images: $ref skipped (hook sidecars only; no test uses one)" >&2
      ;;
    *)
      echo "kubevirt images: virt-operator names $ref, which this script does not know how to build" >&2
      exit 1
      ;;
  esac
  rm -rf "$d"
done

rm -rf "$out"
mv "$tmp/out" "$out"
echo "kubevirt images: built $(wc -l <"$out/images.txt") images into $out in $(($(date +%s) - start))s" >&2
echo "$out"
