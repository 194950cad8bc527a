#!/usr/bin/env bash
# Builds the node VM's boot files into .tools/nodevm/<hash>/, once per
# machine: a Debian root filesystem made by mmdebstrap from the machine's own
# apt sources, packed into an ext4 image, and the kernel and initramfs that
# linux-image-amd64 put into it. The hash is of this script, so a change to
# the package list or the init below builds a new image; older ones are
# removed. Prints the directory. Needs root, mmdebstrap and e2fsprogs.
#
# The VM boots Debian's own kernel, which has the modules this machine's
# kernel lacks (ipvlan, openvswitch, 8021q). Nothing of the project is in
# the image: the test binaries and tools come in through a 9p share at boot
# (test/nodevm).
set -euo pipefail
cd "$(dirname "$0")/../.."

# What the tests inside the VM run, beyond Debian's essential set.
pkgs=(
  linux-image-amd64  # the kernel, its modules and (initramfs-tools) the initrd
  kmod mount util-linux procps iproute2 iputils-ping
  nftables openvswitch-switch passt
)

hash=$(sha256sum "$0" | cut -c1-12)
base=.tools/nodevm
out=$base/$hash
if [[ -s $out/rootfs.img && -s $out/vmlinuz && -s $out/initrd.img ]]; then
  echo "$out"
  exit 0
fi
for tool in mmdebstrap mke2fs; do
  command -v $tool >/dev/null || { echo "nodevm: $tool is missing (Debian: mmdebstrap, e2fsprogs)" >&2; exit 1; }
done
start=$(date +%s)
rm -rf "$base" && mkdir -p "$base"
tmp=$(mktemp -d "$base/build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
root=$tmp/root
suite=$(. /etc/os-release && echo "$VERSION_CODENAME")
# No mirror argument: mmdebstrap reads the machine's apt sources.
mmdebstrap --quiet --variant=essential --include="$(IFS=,; echo "${pkgs[*]}")" \
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' \
  "$suite" "$root" >&2

# Modules no test loads: graphics, sound, media, wireless, InfiniBand.
version=$(basename "$(ls -d "$root"/lib/modules/*/ | head -1)")
for d in drivers/gpu sound drivers/media drivers/net/wireless net/wireless drivers/infiniband drivers/staging; do
  rm -rf "$root/lib/modules/$version/kernel/$d"
done
chroot "$root" depmod "$version"

# The VM's init: mounts the kernel file systems, loads the 9p modules,
# mounts the share the test made (tag "vmnic") and runs its init.sh, which
# does the work; then powers off. A failure before init.sh says so on the
# console and powers off too, so QEMU always exits.
mkdir -p "$root/usr/local/sbin"
cat > "$root/usr/local/sbin/vmnic-init" <<'EOF'
#!/bin/sh
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# Debian's initramfs moves /proc, /sys and /dev over; without one, mount them.
mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sys /sys
mountpoint -q /dev || mount -t devtmpfs dev /dev
mkdir -p /dev/pts /dev/shm /run/nodevm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mount -t cgroup2 none /sys/fs/cgroup 2>/dev/null
mkdir -p /run/nodevm /run/netns
if modprobe 9pnet_virtio && modprobe 9p &&
  mount -t 9p -o trans=virtio,version=9p2000.L,msize=1048576 vmnic /run/nodevm; then
  echo "VMNIC-NODEVM: init.sh start $(cut -d' ' -f1 /proc/uptime)"
  sh /run/nodevm/init.sh
  echo "VMNIC-NODEVM: init.sh exit=$? $(cut -d' ' -f1 /proc/uptime)"
else
  echo "VMNIC-NODEVM: the vmnic share did not mount"
fi
sync
echo o > /proc/sysrq-trigger
sleep 10
EOF
chmod 0755 "$root/usr/local/sbin/vmnic-init"
echo nodevm > "$root/etc/hostname"
printf '127.0.0.1 localhost nodevm\n::1 localhost\n' > "$root/etc/hosts"

cp "$root/boot/vmlinuz-$version" "$tmp/vmlinuz"
cp "$root/boot/initrd.img-$version" "$tmp/initrd.img"
size=$(( $(du -sm "$root" | cut -f1) + 1024 ))
mke2fs -q -F -t ext4 -L vmnicroot -d "$root" "$tmp/rootfs.img" "${size}M"
rm -rf "$root"
mv "$tmp" "$out"
trap - EXIT
echo "nodevm: built $out (kernel $version) in $(($(date +%s) - start))s" >&2
echo "$out"
